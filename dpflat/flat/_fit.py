"""Non-private fits used by the flattening levels: the teacher and the layer scorer.

Why a separate small loop: these fits must not touch the DP optimizer or Opacus hooks, and
each caller must say which data it reads (public, or private through the ledger as an
unaccounted read). Two things make a fit fit for its purpose (issue 27):

- it trains to its **validation plateau** (early stopping on the val split within a step
  budget), so a teacher is a model that has learned its task, not 4 optimizer steps;
- it runs with **dropout off** and its batches grouped by length (``batching.split_batch``),
  so it is a function of its data, seed and settings: two runs of it agree, and what the layer
  selector measures is the landscape of a trained model, not a draw of the fit's dropout.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..batching import split_batch
from ..config import ConfigError
from ..evaluate import evaluate, model_inputs

#: examples per physical batch of a fit (memory only: the step is over the whole fit batch)
FIT_PHYSICAL = 64


@dataclass(frozen=True)
class FitReport:
    """What a fit did: its step budget and where it stopped, on the val split."""

    steps: int  # optimizer steps taken
    best_step: int  # the step of the returned parameters
    val_accuracy: float  # of the returned parameters
    seconds: float
    stopped: str  # "plateau" (no val gain in ``patience`` evaluations) or "budget"
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, val accuracy), step 0 included

    def to_info(self, prefix: str) -> dict[str, float | int | str]:
        return {f"{prefix}_val_accuracy": self.val_accuracy, f"{prefix}_steps": self.steps,
                f"{prefix}_best_step": self.best_step, f"{prefix}_seconds": round(self.seconds, 2),
                f"{prefix}_stopped": self.stopped}


def _step(student: nn.Module, opt: torch.optim.Optimizer, batch, device: torch.device) -> int:
    """One AdamW step on the batch's mean loss, computed in length groups (padding cut)."""
    n = len(batch["labels"])
    opt.zero_grad(set_to_none=True)
    for part in split_batch(batch, FIT_PHYSICAL):
        loss = F.cross_entropy(student(**model_inputs(part, device)), part["labels"].to(device), reduction="sum") / n
        loss.backward()
    opt.step()
    return n


def fit_to_plateau(
    model: nn.Module,
    dataset,
    val,
    *,
    max_steps: int,
    batch_size: int,
    lr: float,
    device: torch.device,
    seed: int,
    eval_every: int = 10,
    patience: int = 0,
    eval_batch_size: int = 256,
    on_batch: Callable[[int], None] | None = None,
    plateau_mean: bool = False,
) -> tuple[nn.Module, FitReport]:
    """A deep copy of ``model`` trained with AdamW on ``dataset``; ``model`` is untouched.

    With a ``val`` split: evaluates at step 0 and every ``eval_every`` steps, keeps the best
    parameters, and stops after ``patience`` evaluations without a gain (0: the whole
    ``max_steps``); returns the best-on-val copy. Without one (``val=None``): exactly
    ``max_steps`` steps, the last parameters (the scorer's fixed warm-up). Eval mode (no dropout).
    ``plateau_mean``: return instead the mean of the parameters at the evaluations from the best
    one to the stop (the plateau the early stopping waited on), evaluated on val: the fit's end
    point without most of the SGD noise of where it happened to stop (the layer scorer).
    """
    t0 = time.perf_counter()
    student = copy.deepcopy(model).eval()  # eval mode throughout: no dropout, so no draw to depend on
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=min(batch_size, len(dataset)), shuffle=True, generator=g)

    def trainable() -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in student.named_parameters() if p.requires_grad}

    def accuracy() -> float:
        return float("nan") if val is None else float(evaluate(student, val, eval_batch_size, device)["accuracy"])

    best_acc, best_step, best_state = accuracy(), 0, trainable()
    curve, since, done, stopped = [(0, best_acc)], 0, 0, "budget"
    plateau = [best_state]  # the states at the evaluations since the best one
    while done < max_steps and stopped == "budget":
        for b in loader:
            n = _step(student, opt, b, device)
            if on_batch:
                on_batch(n)
            done += 1
            if val is not None and (done % eval_every == 0 or done == max_steps):
                acc = accuracy()
                curve.append((done, acc))
                if acc > best_acc:
                    best_acc, best_step, best_state, since = acc, done, trainable(), 0
                    plateau = [best_state]
                else:
                    if plateau_mean:
                        plateau.append(trainable())
                    if patience and (since := since + 1) >= patience:
                        stopped = "plateau"
                        break
            if done >= max_steps:
                break
    if val is None:
        best_step, best_state = done, trainable()
    elif plateau_mean:
        best_state = {k: torch.stack([s[k] for s in plateau]).mean(0) for k in best_state}
    with torch.no_grad():
        named = dict(student.named_parameters())
        for k, v in best_state.items():
            named[k].copy_(v)
    if plateau_mean and val is not None:
        best_acc = accuracy()
    return student, FitReport(steps=done, best_step=best_step, val_accuracy=best_acc,
                              seconds=time.perf_counter() - t0, stopped=stopped, curve=curve)


def level_data(ctx, mode: str, who: str, how: str, safe_needs: str):
    """What a level's set-up fits on, and how its batches are counted: ``(data, on_batch)``.

    safe: the public split (``on_batch`` None: nothing private is read); an empty one is refused
    with ``safe_needs`` (what the level does there). paper: the private split, read outside the
    DP accounting as ``who``/``how``, each batch counted in the ledger.
    """
    if mode == "safe":
        data = ctx.public
        if data is None or len(data) == 0:
            raise ConfigError(f"{safe_needs}: set --public-size > 0")
        return data, None
    data = ctx.private.read(who, how, accounted=False)
    return data, lambda nb: ctx.private.count(who, how, False, nb)


def steps_for_epochs(epochs: float, n: int, batch_size: int) -> int:
    return max(1, int(round(epochs * max(1, -(-n // max(1, batch_size))))))


def level_fit(ctx, data, *, kind: str, seed: int, cache: bool, on_batch: Callable[[int], None] | None = None,
              init: nn.Module | None = None, plateau_mean: bool = False) -> tuple[nn.Module, FitReport, bool]:
    """A level's fit to its val plateau (the run's teacher settings), cached when its data is public.

    ``data``: what the fit reads (the public split; in paper mode the private split, read through
    the ledger by the caller, and ``cache`` False). ``init``: start from this model's trainable
    state instead of the run's (the teacher continues the layer scorer's fit under the chosen
    keep-mask). Returns (fitted copy, report, whether it came from the cache). The cache key
    holds everything the fit depends on: the model (backbone, starting prefix + head, keep-mask),
    the data and val content, the seed and every setting.
    """
    from . import _cache  # the levels' cache of public-only work

    c, tc = ctx.cfg.flat, ctx.cfg.train
    start = init if init is not None else ctx.model
    lr = c.teacher_lr if c.teacher_lr is not None else tc.lr
    max_steps = steps_for_epochs(c.teacher_epochs, len(data), c.teacher_batch_size)
    settings = {"max_steps": max_steps, "batch_size": c.teacher_batch_size, "lr": lr, "seed": seed,
                "eval_every": c.teacher_eval_every, "patience": c.teacher_patience,
                "eval_batch_size": tc.eval_batch_size, "physical": FIT_PHYSICAL}
    if plateau_mean:  # only then in the key: the caches of best-on-val fits stay valid
        settings["plateau_mean"] = True
    k = None
    if cache and _cache.enabled():
        k = _cache.key(f"fit-{kind}", {
            "model": _cache.fingerprint_model(start), "data": _cache.fingerprint_dataset(data),
            "val": _cache.fingerprint_dataset(ctx.eval), "device": ctx.device.type, "torch": torch.__version__,
            **settings})
        hit = _cache.load(tc.output_dir, k)
        if hit is not None:
            student = copy.deepcopy(start).eval()
            student.load_trainable_state({n: t.to(ctx.device) for n, t in hit["state"].items()})
            r = hit["report"]
            return student, FitReport(**{**r, "curve": [tuple(x) for x in r["curve"]]}), True
    student, report = fit_to_plateau(start, data, ctx.eval, max_steps=max_steps, batch_size=c.teacher_batch_size,
                                     lr=lr, device=ctx.device, seed=seed, eval_every=c.teacher_eval_every,
                                     patience=c.teacher_patience, eval_batch_size=tc.eval_batch_size,
                                     on_batch=on_batch, plateau_mean=plateau_mean)
    if k is not None:
        _cache.save(tc.output_dir, k, {"state": {n: t.cpu() for n, t in student.trainable_state().items()},
                                       "report": {**report.__dict__, "curve": [list(x) for x in report.curve]}})
    return student, report, False
