"""The white-box loop: (DP-)SGD on prefix + head, with the flattening levels plugged in.

Read top to bottom: session (data, ledger, checkpoint) -> model -> levels.setup ->
privacy wrapping -> resume -> steps (perturb, forward + extra loss, backward, restore,
step) -> the session's finish (selection on val, one test read, ledger, results row).
What the two loops share (folder, resume, selection, logging) is in ``session.py``;
the black-box loop is ``blackbox/loop.py``, and ``sweep.trainer`` picks between them.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import distributed as dist_mod
from .batching import dataset_lengths, grouped_loader, split_batch
from .config import ConfigError, RunConfig, as_run_config
from .engine import DPSetup, MechanismRNG, backward_private, make_private
from .evaluate import autocast, evaluate, evaluate_test, model_inputs
from .decoders import prefixes_removed
from .flat import build_callbacks, build_levels, share_levels, share_step_state
from .flat.base import FlatLevel, StepCallback, TrainContext
from .models import build_model
from .session import check_before_work
from .session import (LOSS_KEY, NonFiniteLoss, PhaseCallback, Session, check_finite, prepare_data, reseed_step, run_in_folder,
                      start_run)

TRAIN_WHO = "train/dp-sgd"
NONPRIVATE_WHO = "train/non-private"


def train(cfg: RunConfig, *, resume: bool = True, max_steps: int | None = None,
          on_step: Callable[[dict[str, Any]], None] | None = None, noise_seed: int | None = None,
          secure_rng: bool = False, extra_private=None, on_phase: PhaseCallback | None = None) -> dict[str, Any]:
    """Train one run into its folder and return its result row.

    A finished run is returned as is; an unfinished one resumes from its last
    checkpoint (same accountant state, so the same final ε). ``max_steps`` stops
    early without finishing (tests and interactive use).

    Under ``torchrun`` every rank calls this with the same config: rank 0 alone
    writes the run folder and holds its lock, the others learn its outcome
    (``dpflat/distributed.py``); ``on_step`` runs on every rank.

    The DP mechanism's randomness (Poisson sampling, noise) is secret: seeded from OS
    entropy, or from ``noise_seed`` (tests, reproducible research; not part of the config
    or the run id, never written to the run folder). ``secure_rng``: Opacus' secure_mode.
    ``extra_private``: raw rows appended to the private split (an audit's canaries).
    ``on_phase``: told each set-up phase as it begins (``session.PhaseCallback``: a status line).
    """
    cfg = as_run_config(cfg)  # a dict is read (and validated) as RunConfig.from_dict; anything else is one line
    if cfg.blackbox.active:
        raise ConfigError("a black-box (bb-*) config trains with dpflat.blackbox.train; "
                          "dpflat.sweep.trainer(cfg) picks the loop for any config")
    check_before_work(cfg, max_steps)  # device, layer count, max_steps: seconds, before any folder or data
    with dist_mod.process_group(cfg.train.device):
        cfg = dist_mod.rank_config(cfg)  # under torchrun: this rank's GPU
        return run_in_folder(cfg, resume, lambda rd: _train(
            Session(cfg, rd, resume=resume, max_steps=max_steps, on_step=on_step, extra_private=extra_private,
                    on_phase=on_phase),
            noise_seed, secure_rng))


def _train(s: Session, noise_seed: int | None, secure_rng: bool) -> dict[str, Any]:
    """The body of :func:`train`, run while holding the run folder's lock."""
    cfg, device = s.cfg, s.device
    model = build_model(cfg.model, len(s.card.labels), seed=cfg.train.seed, task=s.card.name,
                        tokenizer=s.tokenizer).to(device)
    # ctx.eval is the validation split: nothing during training (selection, teacher checks) sees test
    ctx = TrainContext(cfg, model, s.private, s.tokd["public"], s.tokd["val"], s.ledger, device)
    levels = build_levels(cfg)
    # the levels, then the step callbacks (the sharpness trajectory: it observes the step, changes nothing):
    # both are set up, told of each step's end and checkpointed, in this order
    hooks: list[StepCallback] = [*levels, *build_callbacks(cfg)]
    ctx.info["precision"] = cfg.train.resolved_precision()  # bf16 autocast or fp32 matmuls
    t_setup = time.time()
    if s.ckpt is None:
        if s.main:
            for lv in hooks:
                s.phase(lv.name)
                lv.setup(ctx)  # may set the keep-mask, train a teacher (reads go through the ledger)
        share_levels(hooks, ctx)  # torchrun: the other ranks load rank 0's outcome
    setup_s = time.time() - t_setup

    # the prefix the run starts from (the levels' setup leaves it alone; a resumed run loads its
    # checkpoint only below, so this is the built model's prefix in both cases)
    init_prefix = model.prefix.embedding.weight.detach().clone()
    if s.ckpt is not None and model.adapters is not None:  # --peft lora, resumed: the saved keep-mask decides
        model.load_trainable_state({k: v.to(device) for k, v in s.ckpt[0].items()})  # which adapters train
    # --- optimiser and privacy
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(cfg, params)
    accounted = cfg.privacy.enabled
    who, how = (TRAIN_WHO, "per-example clipped gradients + Gaussian noise") if accounted else (
        NONPRIVATE_WHO, "plain gradients (no DP)")
    train_ds = s.private.read(who, how, accounted=accounted)
    rng = MechanismRNG.create(noise_seed, secure_rng, device, rank=dist_mod.rank()) if accounted else None
    # DP: Opacus' Poisson loader draws from this loader's generator, the secret sampler
    loader = torch.utils.data.DataLoader(train_ds, batch_size=cfg.train.batch_size, shuffle=True,
                                         generator=rng.sampler if rng else None)
    s.plan(len(loader))
    ctx.total_steps, ctx.steps_per_epoch = s.total_steps, s.steps_per_epoch
    dp = None
    if accounted:
        model.train()
        dp = make_private(model, opt, loader, cfg.privacy, s.total_steps, s.n, rng)
        train_model, opt, loader = dp.model, dp.optimizer, dp.loader
    else:
        train_model = model
        dist_mod.broadcast_parameters(model)  # torchrun: DPDDP does this on the private path
    ctx.dp = dp
    base_opt = opt.original_optimizer if dp else opt
    if s.ckpt is not None:
        _resume(s, model, base_opt, dp, hooks, ctx)
        setup_s = float(s.ckpt[1].get("setup_s", setup_s))  # the first process's setup, not this one's 0 s
    prec = cfg.train.resolved_precision()
    s.bind(evaluate=lambda: evaluate(model, ctx.eval, cfg.train.eval_batch_size, device, prec),  # val only
           trainable=model.trainable_state,
           private_state=lambda: {
               "optimizer": base_opt.state_dict(), "accountant": dp.accountant.state_dict() if dp else None,
               "levels": {lv.name: lv.state_dict() for lv in hooks},
               # what the setup found (kept layers, teacher accuracy...): a resumed run reports it too
               "info": dict(ctx.info), "setup_s": setup_s,
               # secret: the generator states, per rank (never the seed)
               "mechanism_rng": dist_mod.gathered(rng.state_dict()) if dp and rng.source != "secure" else None})

    lengths = dataset_lengths(train_ds) if cfg.grouped else None  # how to cut, not what
    with s.progress():
        _steps(s, ctx, train_model, opt, loader, dp, levels, hooks, params, (who, how, accounted), lengths)
    if not s.done:
        return s.unfinished(dp)
    return s.finish(dp, last=model.trainable_state(), load=lambda best: _load(model, best, device),
                    val=lambda: _val_and_prefix_share(model, ctx, init_prefix, prec),
                    test=lambda: evaluate_test(model, s.tokd["eval"], cfg.train.eval_batch_size, device, prec),
                    keep=",".join(str(i) for i, k in enumerate(model.prefix.keep_mask.tolist()) if k),
                    info=ctx.info, cost=s.cost(setup_s), overlap=getattr(s.splits, "overlap", None))


def _val_and_prefix_share(model, ctx: TrainContext, init_prefix: torch.Tensor, prec: str) -> dict[str, Any]:
    """The selected model on val, and on val with its prefix put back to where it started.

    Why: the head alone (a linear probe on the frozen encoder) does most of the learning at small
    sizes, and every flattening level acts on the prefix; the difference says how much the
    prefix itself learned (``info.val_accuracy_prefix_reset``; ``--peft lora``: every adapter off,
    ``info.val_accuracy_adapters_off``). A decoder with its label-word head also reports the
    prompt's zero-shot accuracy, no prefix or adapter at all (``info.zero_shot_val_accuracy``: the
    floor). Val only: no private or test read.
    """
    tc = ctx.cfg.train
    r = evaluate(model, ctx.eval, tc.eval_batch_size, ctx.device, prec)
    acc = lambda: evaluate(model, ctx.eval, tc.eval_batch_size, ctx.device, prec)["accuracy"]  # noqa: E731
    if getattr(model, "adapters", None) is not None:  # --peft lora: the same question with every adapter off (where B = 0 started)
        with prefixes_removed(model):
            ctx.info["val_accuracy_adapters_off"] = off = acc()
    else:
        w = model.prefix.embedding.weight
        trained = w.detach().clone()
        with torch.no_grad():
            w.copy_(init_prefix)
        try:
            ctx.info["val_accuracy_prefix_reset"] = acc()
        finally:
            with torch.no_grad():
                w.copy_(trained)
        off = None
    if getattr(model, "causal", False) and model.cfg.head == "prompt":  # a decoder's floor: the prompt alone
        if off is None:
            with prefixes_removed(model):
                off = acc()
        ctx.info["zero_shot_val_accuracy"] = off
    return r


def _optimizer(cfg: RunConfig, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if cfg.train.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    return torch.optim.SGD(params, lr=cfg.train.lr, momentum=0.9, weight_decay=cfg.train.weight_decay)


def _resume(s: Session, model, opt, dp: DPSetup | None, levels: list[StepCallback], ctx: TrainContext) -> None:
    """Continue from the checkpoint: parameters, optimizer, accountant, secret generators, levels and callbacks."""
    trainable, state = s.ckpt
    model.load_trainable_state({k: v.to(s.device) for k, v in trainable.items()})
    opt.load_state_dict(state["optimizer"])
    if dp:
        dp.accountant.load_state_dict(state["accountant"])
        if state.get("mechanism_rng") is not None:  # replay: the same batches and noise as before the crash
            dp.rng.load_state_dict(state["mechanism_rng"][dist_mod.rank()])
        elif dp.rng.source == "secure":
            dp.rng.load_state_dict({"source": "secure"})  # refuses: nothing to replay from
    s.resume_shared(state)
    for lv in levels:
        lv.load_state_dict(state["levels"].get(lv.name, {}), ctx)
    ctx.info.update(state.get("info") or {})  # checkpoints older than this key: the setup's info is lost


def _load(model, best: dict[str, torch.Tensor] | None, device) -> dict[str, torch.Tensor]:
    """The selected parameters into the model (None: keep the last); the state to release."""
    if best is not None:
        model.load_trainable_state({k: v.to(device) for k, v in best.items()})
    return model.trainable_state()


def _chunks(batch: dict[str, torch.Tensor], size: int):
    n = len(batch["labels"])
    for i in range(0, max(n, 1), size):
        yield {k: v[i : i + size] for k, v in batch.items()}


def _per_example_loss(ctx: TrainContext, model, levels: list[FlatLevel], batch) -> torch.Tensor:
    """Each example's loss: CE plus the levels' per-example terms (inside the clip)."""
    with autocast(ctx.device, ctx.cfg.train.resolved_precision()):
        logits, prefix_out = model(**model_inputs(batch, ctx.device), return_prefix=True)
    per_ex = F.cross_entropy(logits.float(), batch["labels"].to(ctx.device), reduction="none")
    for lv in levels:
        extra = lv.extra_loss(ctx, prefix_out)
        if extra is not None:
            per_ex = per_ex + extra
    return per_ex


class _Logical:
    """One logical step in progress over its physical chunks."""

    def __init__(self) -> None:
        self.new, self.examples, self.finite, self.loss_sum = True, 0, True, 0.0

    def mean_loss(self) -> float:
        """The logical batch's mean per-example loss (CE + the levels' terms), over its chunks."""
        return self.loss_sum / self.examples if self.examples else 0.0


def _steps(s: Session, ctx: TrainContext, model, opt, loader, dp: DPSetup | None, levels: list[FlatLevel],
           hooks: list[StepCallback], params: list[torch.Tensor], read: tuple[str, str, bool],
           lengths: torch.Tensor | None) -> None:
    """The logical steps of this call: a (Poisson) batch in physical chunks, one optimizer step each.
    ``levels`` act on each chunk; ``hooks`` (the levels, then the step callbacks) hear each step's end.

    ``lengths`` (the private rows' real lengths): cut each logical batch by length, padding
    trimmed (``batching.py``); None: Opacus' split in arrival order (``--group-by-length off``).
    """
    P = min(s.cfg.train.physical_batch_size, s.cfg.train.batch_size)
    per_pass = len(loader)  # logical batches of one pass (DP: the Poisson sampler's steps)
    while s.step < s.stop_at:
        # a pass begins here, or -- resumed from a checkpoint taken inside a pass -- it began earlier
        start = s.pass_start if s.pass_start is not None and s.step < s.pass_start + per_pass else s.step
        s.pass_start, done = start, s.step - start
        # public randomness of the pass (the non-private loader's shuffle); DP batches, noise and
        # dropout come from the secret generators (dropout is reseeded per step: reseed_step)
        torch.manual_seed(s.cfg.train.seed * 1_000_003 + start)
        if dp and lengths is not None:
            mem = nullcontext(grouped_loader(loader, lengths, P, opt))
        elif dp:
            from opacus.utils.batch_memory_manager import BatchMemoryManager

            mem = BatchMemoryManager(data_loader=loader, max_physical_batch_size=P, optimizer=opt)
        else:
            mem = nullcontext(loader)
        with mem as it:
            it = _resume_pass(it, dp, done)
            lg = _Logical()
            for batch in it:
                if dp:
                    chunks = [batch]
                elif lengths is not None:
                    chunks = split_batch(dist_mod.shard(batch), P)
                else:
                    chunks = list(_chunks(dist_mod.shard(batch), P))
                for i, chunk in enumerate(chunks):
                    _forward_backward(s, ctx, model, levels, dp, chunk, len(batch["labels"]), lg, read)
                    if _optimizer_step(opt, dp, params, hooks, ctx, s.step, last=i == len(chunks) - 1):
                        _close_step(s, dp, lg)
                        lg = _Logical()
                        if s.step >= s.stop_at:
                            return
                        if s.step >= start + per_pass:  # a resumed pass ends where the original one would
                            break
                else:
                    continue
                break


def _resume_pass(loader, dp: DPSetup | None, done: int):
    """An iterator over the pass that continues after its first ``done`` logical batches.

    Why: a crashed run is accounted by replaying its lost steps bit for bit (docs/ARCHITECTURE.md), and a
    new iterator draws its base seed from the loader's generator -- for DP the secret sampler,
    whose state the checkpoint holds *after* that pass's draw. So: DP restores the sampler's
    state after the iterator is made (the next Poisson batch is the one the crashed run drew);
    a non-private loader re-creates the pass's shuffle (the caller reseeded it) and skips the
    batches already trained on.
    """
    if not done:
        return iter(loader)
    if dp:
        saved = dp.rng.sampler.get_state()
        itr = iter(loader)
        dp.rng.sampler.set_state(saved)
        return itr
    itr = iter(loader)
    for _ in range(done):
        next(itr)
    return itr


def _forward_backward(s: Session, ctx: TrainContext, model, levels: list[FlatLevel], dp: DPSetup | None,
                      chunk, batch_n: int, lg: _Logical, read: tuple[str, str, bool]) -> None:
    """One physical chunk: (first chunk: the levels' step start) perturb, loss, backward, restore;
    its examples and loss are added to the logical step ``lg``."""
    nb = len(chunk["labels"])
    if lg.new:
        reseed_step(s.cfg.train.seed, s.step, dp.rng if dp else None)  # DP: dropout from the secret stream
        for lv in levels:
            lv.step_begin(ctx, s.step, chunk)
        share_step_state(levels, ctx)
        lg.new = False
    for lv in levels:
        lv.perturb(ctx)
    per_ex = _per_example_loss(ctx, model, levels, chunk)
    if dp:
        loss = backward_private(dp, per_ex)  # ghost clipping: Opacus' two passes
    else:
        loss = (per_ex.mean() if nb else per_ex.sum()) * (nb / max(batch_n, 1))
        loss.backward()
    for lv in reversed(levels):
        lv.restore(ctx)
    s.private.count(*read, nb)
    s.seen += nb
    lg.examples += nb
    lg.loss_sum += float(per_ex.detach().sum())
    lg.finite = lg.finite and math.isfinite(float(loss.detach()))


def _optimizer_step(opt, dp: DPSetup | None, params: list[torch.Tensor], hooks: list[StepCallback],
                    ctx: TrainContext, step: int, last: bool) -> bool:
    """Opacus steps on every physical chunk (it skips all but a logical batch's last); plain SGD on the last."""
    if dp:
        opt.step()
        stepped = not opt._is_last_step_skipped
    else:
        stepped = last
        if stepped:
            dist_mod.sum_gradients(params)  # torchrun: the ranks' shares of the batch
            opt.step()
    if stepped:
        for lv in hooks:
            lv.step_end(ctx, step)  # p.grad is still the (noisy) gradient used
    if dp or stepped:
        opt.zero_grad(set_to_none=True)  # Opacus: after every physical step
    return stepped


def _close_step(s: Session, dp: DPSetup | None, lg: _Logical) -> None:
    """A logical step is done: count it, stop on a non-finite loss, then the session's bookkeeping."""
    s.step += 1
    if dp:  # the logical batch (over ranks): the ledger's Poisson check
        s.ledger.record_batch(dist_mod.total(lg.examples))
    check_finite(lg.mean_loss() if dist_mod.total(0 if lg.finite else 1) == 0 else math.nan, s.step)
    s.end_step({"step": s.step, "epoch": s.step / s.steps_per_epoch, LOSS_KEY: lg.mean_loss()}, dp)


__all__ = ["LOSS_KEY", "NonFiniteLoss", "TRAIN_WHO", "check_finite", "prepare_data", "reseed_step",
           "start_run", "train"]
