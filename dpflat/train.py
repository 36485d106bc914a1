"""One training loop: (DP-)SGD on prefix + head, with the flattening levels plugged in.

Read top to bottom: data -> model -> levels.setup -> privacy wrapping -> resume ->
steps (perturb, forward+extra loss, backward, restore, step) -> final selection,
ledger and results row.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import data as data_mod
from . import splits as splits_mod
from . import tokens as tokens_mod
from . import distributed as dist_mod
from .config import ConfigError, RunConfig
from .evaluate import autocast, evaluate, evaluate_test, model_inputs, peak_memory_mb, reset_peak_memory
from .flat import build_levels
from .flat.base import FlatLevel, TrainContext
from .models import build_model, load_tokenizer
from .privacy import (DP, MechanismRNG, PrivacyLedger, PrivateSplit, backward_private, fill_ledger, fill_release,
                      make_private, spent_epsilon)
from .runs import RunDir, check_before_work, finish_run

TRAIN_WHO = "train/dp-sgd"
#: the per-step loss of private batches: a private diagnostic, not covered by the guarantee
LOSS_KEY = "train_loss_private"


class NonFiniteLoss(ConfigError):
    """The training loss became NaN or inf: the run stops, and no result is written."""


def check_finite(loss: float, step: int) -> None:
    """Stop a diverged run with one line (an argmax of NaN logits is not a result)."""
    if not math.isfinite(loss):
        raise NonFiniteLoss(f"training loss became non-finite ({loss}) at step {step}; lower --lr "
                            f"(the run is left unfinished, no result written)")


def split_overlap(splits) -> dict[str, Any]:
    """Duplicate counts the data module reports between the splits (empty if it reports none)."""
    summary = getattr(splits, "summary", None)
    d = summary() if callable(summary) else {}
    return {k: v for k, v in dict(d or {}).items() if "dup" in k or "overlap" in k}


def reseed_step(seed: int, step: int) -> None:
    """Per step, so a resumed run replays dropout exactly; public randomness only (the
    mechanism's sampling and noise come from the secret ``MechanismRNG``)."""
    torch.manual_seed(seed * 1_000_003 + step)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def start_run(cfg: RunConfig) -> torch.device:
    """Threads, device check and seeds: what every training loop does first."""
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    device = torch.device(cfg.train.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but CUDA is not available on this machine")
    _seed_all(cfg.train.seed)
    return device


def prepare_data(cfg: RunConfig, tokenizer=None):
    """Load, split and tokenise the task: returns (card, splits, tokenised dict).

    ``tokd["val"]`` is for checkpoint selection; ``tokd["eval"]`` is the test split,
    which a run reads once, at the end (``_finish``).
    """
    card = data_mod.get_task(cfg.data.task)
    raw = data_mod.load_raw(card, cfg.data.data_dir)
    splits = splits_mod.splits_for_config(raw, cfg.data, cfg.train.seed)
    tok = tokenizer or load_tokenizer(cfg.model)
    template = None
    if cfg.model.head == "prompt":  # LM-BFF: one sequence per example with a mask token
        template = tokens_mod.prompt_for(card, cfg.model.template, cfg.model.label_words)[0]
    tokd = {
        name: tokens_mod.tokenize(getattr(splits, name), tok, cfg.data.max_length, cfg.data.cache_dir, template)
        for name in ("private", "public", "val", "eval")
    }
    return card, splits, tokd


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


def _forward_loss(ctx: TrainContext, model, levels: list[FlatLevel], batch) -> torch.Tensor:
    """Mean over the chunk of each example's loss."""
    per_ex = _per_example_loss(ctx, model, levels, batch)
    return per_ex.mean() if per_ex.numel() else per_ex.sum()


def train(
    cfg: RunConfig,
    *,
    resume: bool = True,
    max_steps: int | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    noise_seed: int | None = None,
    secure_rng: bool = False,
) -> dict[str, Any]:
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
    """
    if cfg.blackbox.active:  # a bb-* config: the forward-only loop, never a white-box prefix
        from .blackbox import train as bb_train

        return bb_train(cfg, resume=resume, max_steps=max_steps, on_step=on_step, noise_seed=noise_seed,
                        secure_rng=secure_rng)
    check_before_work(cfg, max_steps)  # device, layer count, max_steps: seconds, before any folder or data
    with dist_mod.process_group(cfg.train.device):
        cfg = dist_mod.rank_config(cfg)  # under torchrun: this rank's GPU
        rd = RunDir.for_config(cfg)
        # a finished run of this same config (a different one is refused) with its row made sure of
        res = dist_mod.on_main(lambda: rd.finished_result(cfg) if resume else None)
        if res is not None:
            return res
        made = dist_mod.on_main(rd.create, cfg) and dist_mod.is_main()
        with rd.removed_on_failure(made), dist_mod.main_only(rd.lock):  # no config-only folder left by a failure
            return _train(cfg, rd, resume, max_steps, on_step, noise_seed, secure_rng)


def _train(cfg: RunConfig, rd: RunDir, resume: bool, max_steps: int | None,
           on_step: Callable[[dict[str, Any]], None] | None, noise_seed: int | None = None,
           secure_rng: bool = False) -> dict[str, Any]:
    """The body of :func:`train`, run while holding the run folder's lock."""
    device = start_run(cfg)
    t_start = time.time()
    reset_peak_memory(device)

    # --- data and model
    tokenizer = load_tokenizer(cfg.model)
    card, splits, tokd = prepare_data(cfg, tokenizer)
    n = len(tokd["private"])
    B = cfg.train.batch_size
    if B > n:
        raise ConfigError(f"batch_size {B} is larger than the private training split ({n} examples)")
    ledger = PrivacyLedger()
    ledger.split_overlap = split_overlap(splits)
    private = PrivateSplit(tokd["private"], ledger)
    model = build_model(cfg.model, len(card.labels), seed=cfg.train.seed, task=card.name, tokenizer=tokenizer).to(device)
    # ctx.eval is the validation split: nothing during training (selection, teacher checks) sees test
    ctx = TrainContext(cfg, model, private, tokd["public"], tokd["val"], ledger, device)
    levels = build_levels(cfg)
    ctx.info["precision"] = cfg.train.resolved_precision()  # bf16 autocast or fp32 matmuls

    ckpt = dist_mod.on_main(lambda: rd.latest_checkpoint() if resume else None)  # the same one on every rank
    t_setup = time.time()
    if ckpt is None:
        if dist_mod.is_main():
            for lv in levels:
                lv.setup(ctx)  # may set the keep-mask, train a teacher (reads go through the ledger)
        dist_mod.share_levels(levels, ctx)  # torchrun: the other ranks load rank 0's outcome
    setup_s = time.time() - t_setup

    # --- optimiser and privacy
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.train.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=cfg.train.lr, momentum=0.9, weight_decay=cfg.train.weight_decay)
    accounted = cfg.privacy.enabled
    how = "per-example clipped gradients + Gaussian noise" if accounted else "plain gradients (no DP)"
    train_ds = private.read(TRAIN_WHO if accounted else "train/non-private", how, accounted=accounted)
    rng = MechanismRNG.create(noise_seed, secure_rng, device, rank=dist_mod.rank()) if accounted else None
    # DP: Opacus' Poisson loader draws from this loader's generator, the secret sampler
    loader = torch.utils.data.DataLoader(train_ds, batch_size=B, shuffle=True, generator=rng.sampler if rng else None)
    steps_per_epoch = len(loader)
    total_steps = max(1, int(round(cfg.train.epochs * steps_per_epoch)))
    ctx.total_steps, ctx.steps_per_epoch = total_steps, steps_per_epoch
    dp = None
    if accounted:
        model.train()
        dp = make_private(model, opt, loader, cfg.privacy, total_steps, n, rng)
        train_model, opt, loader = dp.model, dp.optimizer, dp.loader
    else:
        train_model = model
        dist_mod.broadcast_parameters(model)  # torchrun: DPDDP does this on the private path
    ctx.optimizer, ctx.dp = opt, dp

    # --- resume
    step, best = 0, {"accuracy": -1.0, "step": 0}
    best_params: dict[str, torch.Tensor] | None = None  # the selected parameters so far (private state)
    best_file = rd.path / "best.safetensors"
    if ckpt is not None:
        trainable, state = ckpt
        model.load_trainable_state({k: v.to(device) for k, v in trainable.items()})
        (opt.original_optimizer if dp else opt).load_state_dict(state["optimizer"])
        if dp:
            dp.engine.accountant.load_state_dict(state["accountant"])
            if state.get("mechanism_rng") is not None:  # replay: the same batches and noise as before the crash
                rng.load_state_dict(state["mechanism_rng"][dist_mod.rank()])
            elif rng.source == "secure":
                rng.load_state_dict({"source": "secure"})  # refuses: nothing to replay from
        step, best = state["step"], state["best"]
        best_params = state.get("best_params")
        restored = PrivacyLedger.from_dict(state["ledger"])
        ledger.reads = restored.reads
        ledger.batch_sizes = restored.batch_sizes
        dist_mod.keep_counts_on_main(ledger)  # torchrun: the saved counts are totals over ranks
        for lv in levels:
            lv.load_state_dict(state["levels"].get(lv.name, {}), ctx)
        if dist_mod.is_main():
            rd.truncate_metrics(step)
            # best.safetensors as of this checkpoint: one written by the discarded steps must not survive
            if best_params is not None:
                rd.save_tensors(best_file, best_params)
            else:
                best_file.unlink(missing_ok=True)

    def checkpoint() -> None:
        rng_states = dist_mod.gathered(rng.state_dict()) if dp and rng.source != "secure" else None
        state = {
            "step": step,
            "optimizer": (opt.original_optimizer if dp else opt).state_dict(),
            "accountant": dp.engine.accountant.state_dict() if dp else None,
            "best": best,
            "ledger": dist_mod.merged_ledger(ledger).to_dict(),
            "levels": {lv.name: lv.state_dict() for lv in levels},
            "best_params": best_params,
            "mechanism_rng": rng_states,  # secret: the generator states, per rank (never the seed)
        }
        if dist_mod.is_main():
            rd.save_checkpoint(step, model.trainable_state(), state)
        dist_mod.barrier()

    def run_eval() -> dict[str, Any]:
        """Selection reads the validation split only (ctx.eval = tokd["val"])."""
        nonlocal best, best_params
        r = evaluate(model, ctx.eval, cfg.train.eval_batch_size, device, cfg.train.resolved_precision())
        if r["accuracy"] > best["accuracy"]:
            best = {"accuracy": r["accuracy"], "step": step}
            best_params = {k: v.detach().cpu().clone() for k, v in model.trainable_state().items()}
            rd.save_tensors(best_file, best_params)
        return r

    eval_every = cfg.train.eval_every or steps_per_epoch
    P = min(cfg.train.physical_batch_size, B)
    main = dist_mod.is_main()  # under torchrun only rank 0 evaluates, logs and writes
    bar = tqdm(total=total_steps, initial=step, desc=rd.path.name, disable=not (cfg.train.progress and main), leave=False)
    t0, seen = time.time(), 0
    stop_at = total_steps if max_steps is None else min(total_steps, max_steps)
    try:
        while step < stop_at:
            # public randomness of the pass (the non-private loader's shuffle); DP batches and noise
            # come from the secret generators, dropout is reseeded per step (reseed_step)
            torch.manual_seed(cfg.train.seed * 1_000_003 + step)
            if dp:
                from opacus.utils.batch_memory_manager import BatchMemoryManager

                mem = BatchMemoryManager(data_loader=loader, max_physical_batch_size=P, optimizer=opt)
            else:
                mem = nullcontext(loader)
            with mem as it:
                new_step, step_examples, finite = True, 0, True
                for batch in it:
                    chunks = [batch] if dp else list(_chunks(dist_mod.shard(batch), P))
                    for i, chunk in enumerate(chunks):
                        nb = len(chunk["labels"])
                        if new_step:
                            reseed_step(cfg.train.seed, step)
                            for lv in levels:
                                lv.step_begin(ctx, step, chunk)
                            dist_mod.share_step_state(levels, ctx)
                            new_step = False
                        for lv in levels:
                            lv.perturb(ctx)
                        per_ex = _per_example_loss(ctx, train_model, levels, chunk)
                        if dp:
                            loss = backward_private(dp, per_ex)  # ghost clipping: Opacus' two passes
                        else:
                            loss = (per_ex.mean() if nb else per_ex.sum()) * (nb / max(len(batch["labels"]), 1))
                            loss.backward()
                        for lv in reversed(levels):
                            lv.restore(ctx)
                        private.count(TRAIN_WHO if accounted else "train/non-private", how, accounted, nb)
                        seen += nb
                        step_examples += nb
                        finite = finite and math.isfinite(float(loss.detach()))
                        if dp:
                            opt.step()
                            stepped = not opt._is_last_step_skipped
                        else:
                            stepped = i == len(chunks) - 1
                            if stepped:
                                dist_mod.sum_gradients(params)  # torchrun: the ranks' shares of the batch
                                opt.step()
                        if stepped:
                            for lv in levels:
                                lv.step_end(ctx, step)  # p.grad is still the (noisy) gradient used
                        if dp or stepped:
                            opt.zero_grad(set_to_none=True)  # Opacus: after every physical step
                        if not stepped:
                            continue
                        step += 1
                        if dp:  # the logical batch (over ranks): the ledger's Poisson check
                            ledger.record_batch(dist_mod.total(step_examples))
                        check_finite(float(loss.detach()) if dist_mod.total(0 if finite else 1) == 0 else math.nan, step)
                        new_step, step_examples, finite = True, 0, True
                        bar.update(1)
                        row: dict[str, Any] = {"step": step, "epoch": step / steps_per_epoch, LOSS_KEY: float(loss.detach())}
                        milestone = main and (step % eval_every == 0 or step == total_steps)
                        if milestone:
                            row.update({f"eval_{k}": v for k, v in run_eval().items()})
                        if main and dp and (milestone or step % cfg.train.checkpoint_every == 0):
                            # ε so far; not every step: one accountant call costs up to ~0.5 s. A run that
                            # is not DP as a whole (paper mode) shows it only as the DP-SGD part's
                            key = "epsilon" if not ledger.unaccounted else "dpsgd_part_epsilon"
                            row[key] = spent_epsilon(dp.engine.accountant, dp.delta)
                        row["examples_per_s"] = seen / max(time.time() - t0, 1e-9)  # this rank's
                        if main:
                            rd.log(row)
                        bar.set_postfix({k: round(v, 3) for k, v in row.items() if k in (LOSS_KEY, "eval_accuracy", "epsilon")})
                        if on_step:
                            on_step(row)
                        if step % cfg.train.checkpoint_every == 0 or step == total_steps:
                            checkpoint()
                        if step >= stop_at:
                            break
                    if step >= stop_at:
                        break
    except KeyboardInterrupt:
        bar.close()
        raise
    bar.close()
    if step < total_steps:
        fill_ledger(ledger, cfg.privacy, dp, step)
        return {"run_id": rd.path.name, "finished": False, "step": step, "run_dir": str(rd.path)}
    ledger = dist_mod.merged_ledger(ledger)  # torchrun: every rank's reads, counted once
    train_s = time.time() - t0
    cost = {"setup_s": setup_s, "train_s": train_s, "examples_per_s": seen / max(train_s, 1e-9), "t_start": t_start}
    return dist_mod.on_main(_finish, cfg, rd, ctx, model, ledger, dp, best, best_file, step, card,
                            tokd["eval"], splits, cost)


def _finish(cfg, rd: RunDir, ctx: TrainContext, model, ledger, dp, best, best_file, step, card,
            test=None, splits=None, cost=None) -> dict[str, Any]:
    """Select the best-on-val parameters, read the test split once, write model, ledger, result and row."""
    from safetensors.torch import load_file

    last = model.trainable_state()
    rd.save_tensors(rd.path / "last.safetensors", last)
    if best_file.exists():
        model.load_trainable_state({k: v.to(ctx.device) for k, v in load_file(str(best_file)).items()})
    rd.save_tensors(rd.model_file, model.trainable_state())
    prec = cfg.train.resolved_precision()
    val = evaluate(model, ctx.eval, cfg.train.eval_batch_size, ctx.device, prec)
    final, per_example = evaluate_test(model, ctx.eval if test is None else test, cfg.train.eval_batch_size,
                                       ctx.device, prec)
    fill_ledger(ledger, cfg.privacy, dp, step)
    fill_release(ledger)
    rd.write_json(rd.ledger_file, ledger.to_dict())
    keep = ",".join(str(i) for i, k in enumerate(model.prefix.keep_mask.tolist()) if k)
    cost = dict(cost or {})
    if "t_start" in cost:
        cost["wall_s"] = time.time() - cost.pop("t_start")
    cost["peak_mem_mb"] = peak_memory_mb(ctx.device)
    return finish_run(cfg, rd, card.metric, ledger, final, best["step"], step, keep, ctx.info, val=val,
                      test_examples=per_example, cost=cost, overlap=getattr(splits, "overlap", None))


__all__ = ["LOSS_KEY", "NonFiniteLoss", "check_finite", "prepare_data", "reseed_step", "split_overlap", "train"]
