"""Cross-model flattening: pull the private prefix toward a non-privately trained teacher.

Each example's loss gets lambda * ||P - P_t|| (unsquared, as the authors' code; squared
optional). It is computed from the prefix the example's forward produced, so Opacus
sees it in that example's gradient and clips it together with the cross-entropy.
The teacher prefix P_t is one broadcast tensor, never copied per example.

- safe (default): the teacher is trained on the public split only.
- paper: the teacher is trained on the private training set (as the authors do): NOT DP.

A safe teacher reads only public data, so it is cached under the output dir, keyed by
everything it depends on (``_cache``: model state incl. keep-mask, public and eval
split content, seed, fit settings); runs that share it (a sweep over ε) train it once.
A paper-mode teacher is never cached: it would carry private data into later runs.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import ConfigError, FlatConfig
from . import _cache
from ._fit import fit_nonprivate, steps_for_epochs
from .base import FlatLevel, TrainContext

PAPER_WHO = "distill/paper-teacher"
PAPER_HOW = "non-private teacher training on the private split"


def distill_term(prefix_out: torch.Tensor, teacher: torch.Tensor, keep_cols: torch.Tensor | None,
                 lam: float, squared: bool) -> torch.Tensor:
    """Per-example lambda * ||P_b - P_t|| over the kept layers' coordinates; shape (B,)."""
    diff = prefix_out - teacher.unsqueeze(0)
    if keep_cols is not None:
        diff = diff * keep_cols
    sq = diff.pow(2).flatten(1).sum(1)
    return lam * (sq if squared else (sq + 1e-12).sqrt())


class Distillation(FlatLevel):
    name = "distill"

    def __init__(self, cfg: FlatConfig):
        self.cfg = cfg
        self.teacher: torch.Tensor | None = None

    def setup(self, ctx: TrainContext) -> None:
        c, tc = self.cfg, ctx.cfg.train
        if c.distill_mode == "safe":
            data = ctx.public
            if data is None or len(data) == 0:
                raise ConfigError("distillation in safe mode trains its teacher on the public split: set --public-size > 0")
            count = None
        else:
            data = ctx.private.read(PAPER_WHO, PAPER_HOW, accounted=False)
            count = lambda nb: ctx.private.count(PAPER_WHO, PAPER_HOW, False, nb)  # noqa: E731
        steps = steps_for_epochs(c.teacher_epochs, len(data), tc.batch_size)
        ctx.info["teacher_data"] = "public split" if c.distill_mode == "safe" else "private split (not DP)"
        ctx.info["teacher_steps"] = steps
        cache_key = None
        if c.distill_mode == "safe" and _cache.enabled():  # public data only: safe to reuse across runs
            cache_key = _cache.key("teacher", {
                "model": _cache.fingerprint_model(ctx.model), "public": _cache.fingerprint_dataset(data),
                "eval": _cache.fingerprint_dataset(ctx.eval), "seed": tc.seed, "steps": steps,
                "batch_size": tc.batch_size, "lr": tc.lr, "eval_batch_size": tc.eval_batch_size,
                "device": ctx.device.type, "torch": torch.__version__,
            })
            hit = _cache.load(ctx.cfg.train.output_dir, cache_key)
            if hit is not None:
                self.teacher = hit["teacher"].to(ctx.device)
                ctx.info["teacher_accuracy"] = float(hit["accuracy"])
                ctx.info["teacher_cached"] = True
                return
        teacher = fit_nonprivate(ctx.model, data, steps=steps, batch_size=tc.batch_size, lr=tc.lr,
                                 device=ctx.device, seed=tc.seed + 17, on_batch=count)
        self.teacher = teacher.prefix.embedding.weight.detach().clone()
        from ..evaluate import evaluate

        ctx.info["teacher_accuracy"] = evaluate(teacher, ctx.eval, tc.eval_batch_size, ctx.device)["accuracy"]
        if cache_key is not None:
            _cache.save(ctx.cfg.train.output_dir, cache_key,
                        {"teacher": self.teacher.cpu(), "accuracy": float(ctx.info["teacher_accuracy"])})
        ctx.info["teacher_cached"] = False

    def _keep_cols(self, ctx: TrainContext) -> torch.Tensor | None:
        keep = ctx.model.prefix.keep_mask
        if bool(keep.all()):
            return None
        pe = ctx.model.prefix
        cols = keep.view(pe.n_layers, 1).expand(pe.n_layers, 2 * pe.hidden).reshape(-1)
        return cols.to(torch.float32)

    def extra_loss(self, ctx: TrainContext, prefix_out: torch.Tensor) -> torch.Tensor | None:
        if self.teacher is None or self.cfg.distill_lambda == 0:
            return None
        return distill_term(prefix_out, self.teacher, self._keep_cols(ctx), self.cfg.distill_lambda,
                            self.cfg.distill_squared)

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher}

    def load_state_dict(self, state: dict[str, Any], ctx: TrainContext) -> None:
        t = state.get("teacher")
        self.teacher = None if t is None else t.to(ctx.device)
