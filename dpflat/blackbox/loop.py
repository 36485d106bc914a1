"""The black-box loop: the zeroth-order stepper (SPSA / DPZero on z) on the shared session.

What it shares with the white-box loop -- run folder, lock, resume, selection on val,
log rows, checkpoints, the finish -- is ``dpflat/session.py``; what is its own is one
step: a Poisson batch (secret sampler), 2k forward queries per example, the clipped
differences + Gaussian noise (``zo.zo_step``), and one accountant step per release.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import ConfigError, RunConfig, as_run_config, identity_dict
from ..engine import DPSetup, MechanismRNG, zeroth_order_setup
from ..evaluate import evaluate_test
from ..privacy import PrivateSplit
from ..session import check_before_work
from ..session import LOSS_KEY, PhaseCallback, Session, check_finite, run_in_folder
from .box import PromptModel, _accuracy, build_prompt_model, evaluate_prompt, readout_texts
from .zo import ZOState, _make_opt, _poisson, distill_grad, fit_prompt, fit_prompt_cma, take_rows, zo_step

TRAIN_WHO = "train/dpzero"
TRAIN_HOW = "per-example clipped zeroth-order differences (SPSA) + Gaussian noise (DPZero)"
NONPRIVATE_WHO = "train/non-private-zo"
NONPRIVATE_HOW = "plain zeroth-order differences (no DP)"
CMA_HOW = "CMA-ES on raw private mini-batch losses (no DP)"
PAPER_WHO = "bb-distill/paper-teacher"
PAPER_HOW = "non-private teacher prompt tuned on the private split"


def train(cfg: RunConfig, *, resume: bool = True, max_steps: int | None = None,
          on_step: Callable[[dict[str, Any]], None] | None = None, noise_seed: int | None = None,
          secure_rng: bool = False, extra_private=None, on_phase: PhaseCallback | None = None) -> dict[str, Any]:
    """Tune one black-box run into its folder and return its result row (as ``dpflat.train.train``).

    A finished run is returned as is; an unfinished one resumes from its last
    checkpoint (z, optimiser, accountant, ledger, teacher), so it ends at the same ε.
    """
    cfg = as_run_config(cfg)
    if not cfg.blackbox.active:
        raise ConfigError("dpflat.blackbox.train needs a black-box config (variant bb-*, or --blackbox)")
    check_before_work(cfg, max_steps)  # device and max_steps, before any folder or data
    return run_in_folder(cfg, resume, lambda rd: _train(
        Session(cfg, rd, resume=resume, max_steps=max_steps, on_step=on_step, extra_private=extra_private,
                on_phase=on_phase),
        noise_seed, secure_rng))


def _train(s: Session, noise_seed: int | None, secure_rng: bool) -> dict[str, Any]:
    """The body of :func:`train`, run while holding the run folder's lock."""
    cfg = s.cfg
    bb, tc, pc = cfg.blackbox, cfg.train, cfg.privacy
    model = build_prompt_model(cfg, s.card, s.tokenizer, s.device)
    accounted = pc.enabled
    who, how = (TRAIN_WHO, TRAIN_HOW) if accounted else (NONPRIVATE_WHO, NONPRIVATE_HOW)
    if bb.zo_optimizer == "cma":
        how = CMA_HOW
    train_ds = s.private.read(who, how, accounted=accounted)
    s.plan(max(1, -(-s.n // tc.batch_size)))
    q = tc.batch_size / s.n
    dp = None
    if accounted:  # the secret Poisson sampling and DPZero noise (CPU: both are drawn there)
        dp = zeroth_order_setup(pc, q, s.total_steps, s.n, MechanismRNG.create(noise_seed, secure_rng, "cpu"))
    info: dict[str, Any] = {"readout": readout_texts(cfg, s.card), "prompt_dim": bb.prompt_dim,
                            "prompt_tokens": bb.prompt_tokens}
    teacher: torch.Tensor | None = None
    if cfg.flat.distill and s.ckpt is None:
        s.phase("distill")
        teacher, tinfo = teacher_prompt(cfg, model, s.tokd["public"], s.private, s.tokd["val"])
        info.update(tinfo)
    if bb.zo_optimizer == "cma":
        return _train_cma(s, model, train_ds, info, (who, how))
    state = _make_opt(torch.zeros(model.proj.dim), bb.zo_optimizer, bb.zo_lr)
    if s.ckpt is not None:
        teacher = _resume(s, state, dp, info)
    last_eval: dict[str, Any] = {}

    def evaluate() -> dict[str, Any]:
        model.z.data.copy_(state.param.data)
        r = evaluate_prompt(model, s.tokd["val"], tc.eval_batch_size)  # selection reads val only
        last_eval.update(r, step=s.step)
        return r

    s.bind(evaluate=evaluate, trainable=lambda: {"z": state.param.data},
           private_state=lambda: {
               "optimizer": state.opt.state_dict(), "accountant": dp.accountant.state_dict() if dp else None,
               "teacher": teacher, "info": info,
               # secret: the generators' states (never the seed)
               "mechanism_rng": dp.rng.state_dict() if dp and dp.rng.source != "secure" else None})
    pull = None
    if teacher is not None and bb.prompt_lambda > 0:
        t = teacher.clone()
        pull = lambda z: distill_grad(z, t, bb.prompt_lambda, cfg.flat.distill_squared)  # noqa: E731
    q0 = model.box.queries
    with s.progress():
        _steps(s, model, state, train_ds, dp, pull, (who, how, accounted), q0)
    info["queries"] = info.get("queries", 0) + model.box.queries - q0
    if not s.done:
        return s.unfinished(dp)
    known = dict(last_eval) if last_eval.get("step") == s.step == s.best["step"] else None  # z_last is selected
    return _finish(s, model, state.param.data, dp, info, known)


def _resume(s: Session, state: ZOState, dp: DPSetup | None, info: dict[str, Any]) -> torch.Tensor | None:
    """Continue from the checkpoint: z, optimiser, accountant, secret generators; returns the teacher."""
    trainable, st = s.ckpt
    state.param.data.copy_(trainable["z"])
    state.opt.load_state_dict(st["optimizer"])
    if dp:
        dp.accountant.load_state_dict(st["accountant"])
        if st.get("mechanism_rng") is not None:  # replay: the same batches and noise as before the crash
            dp.rng.load_state_dict(st["mechanism_rng"])
        elif dp.rng.source == "secure":
            dp.rng.load_state_dict({"source": "secure"})  # refuses: nothing to replay from
    s.resume_shared(st)
    info.update(st.get("info", {}))
    return st.get("teacher")


def _steps(s: Session, model: PromptModel, state: ZOState, train_ds, dp: DPSetup | None,
           pull: Callable[[torch.Tensor], torch.Tensor] | None, read: tuple[str, str, bool], q0: int) -> None:
    """The steps of this call: one batch, one (DP)ZO update, one accountant step each."""
    tc, bb, n = s.cfg.train, s.cfg.blackbox, s.n
    q = tc.batch_size / n
    while s.step < s.stop_at:
        if dp:  # secret, and continued (not reseeded) across steps; its state is checkpointed
            idx = _poisson(n, q, dp.rng.sampler)
        else:  # non-private: public, resumable shuffle
            g = torch.Generator().manual_seed(tc.seed * 1_000_003 + s.step)
            idx = torch.randperm(n, generator=g)[:tc.batch_size]
        batch = take_rows(train_ds, idx) if len(idx) else None
        out = zo_step(model, state, batch, tc.seed * 1_000_003 + s.step + 500_009, bb.zo_directions, bb.zo_mu,
                      dp=(s.cfg.privacy.max_grad_norm, dp.sigma, q * n) if dp else None, pull=pull,
                      noise_generator=dp.rng.noise if dp else None)
        if dp:
            dp.accountant.step(noise_multiplier=dp.sigma, sample_rate=q)
            s.ledger.record_batch(out["batch"])
        s.private.count(*read, out["batch"])
        s.seen += out["batch"]
        s.step += 1
        if out["batch"]:
            check_finite(out["loss"], s.step)
        row: dict[str, Any] = {"step": s.step, "epoch": s.step / s.steps_per_epoch, LOSS_KEY: out["loss"],
                               "z_norm": float(state.param.data.norm())}
        if dp:
            row["clipped_fraction"] = out["clipped"]
        s.end_step(row, dp, tail=lambda: {"queries": model.box.queries - q0})


def _train_cma(s: Session, model: PromptModel, train_ds, info: dict, read: tuple[str, str]) -> dict[str, Any]:
    """Non-private CMA-ES baseline with the same query budget as SPSA (2 k B per step)."""
    bb, tc = s.cfg.blackbox, s.cfg.train
    s.phase("training")  # no progress bar of its own: the generations are logged as steps
    budget = 2 * bb.zo_directions * tc.batch_size * s.total_steps
    z, gens = fit_prompt_cma(model, train_ds, evaluations=budget, batch_size=tc.batch_size, sigma0=bb.zo_mu,
                             seed=tc.seed, on_batch=lambda nb: s.private.count(*read, False, nb),
                             on_generation=lambda g, l: s.rd.log({"step": g, LOSS_KEY: l}))
    info["cma_generations"] = gens
    info["queries"] = model.box.queries
    s.step, s.best = gens, {"accuracy": -1.0, "step": gens}
    return _finish(s, model, z, None, info)


def _finish(s: Session, model: PromptModel, z_last: torch.Tensor, dp: DPSetup | None, info: dict,
            known: dict[str, Any] | None = None) -> dict[str, Any]:
    """The session's finish with z: best-on-val (else the last) z released, test read once.

    ``known``: the validation of this same z at the last step (the black box is deterministic).
    """
    bs = s.cfg.train.eval_batch_size
    # 2k queries per sampled example: the count is a function of the secret batch sizes (private)
    s.diagnostics["queries"] = info.pop("queries", None)

    def load(best: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        model.z.data.copy_(best["z"] if best is not None else z_last)
        return {"z": model.z.data}

    return s.finish(dp, last={"z": z_last}, load=load,
                    val=lambda: known if known is not None else evaluate_prompt(model, s.tokd["val"], bs),
                    test=lambda: evaluate_test(model, s.tokd["eval"], bs), keep="", info=info)


def _teacher_key(cfg: RunConfig) -> str:
    """What the teacher depends on: the run's identity minus privacy, variant and the eval/checkpoint cadence."""
    d = identity_dict(cfg.to_dict())
    d.pop("privacy"), d.pop("variant")
    d["train"] = {k: v for k, v in d["train"].items() if k not in ("eval_every", "checkpoint_every", "eval_batch_size")}
    d["flat"] = {k: d["flat"][k] for k in ("distill_mode", "teacher_epochs")}
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def teacher_prompt(cfg: RunConfig, model: PromptModel, public, private: PrivateSplit, eval_ds) -> tuple[torch.Tensor, dict]:
    """The teacher z_t: non-private SPSA on the public (safe) or private (paper) split.

    Cached under ``<output_dir>/.bb-teachers/`` (it does not depend on ε), so a sweep
    tunes one teacher per seed and mode. A paper-mode teacher read the private split
    whether it was tuned now or loaded: the read is recorded in this run's ledger
    either way (with the counts of the original tuning).
    """
    fc, tc, bb = cfg.flat, cfg.train, cfg.blackbox
    paper = fc.distill_mode == "paper"
    if paper:
        data = private.read(PAPER_WHO, PAPER_HOW, accounted=False)
    else:
        data = public
        if data is None or len(data) == 0:
            raise ConfigError("black-box distillation in safe mode tunes its teacher on the public split: "
                              "set --public-size > 0")
    cache = Path(tc.output_dir) / ".bb-teachers" / f"{_teacher_key(cfg)}.pt"
    if cache.is_file():
        saved = torch.load(cache, weights_only=False)
        if paper:
            private.count_replayed(PAPER_WHO, PAPER_HOW, False, saved["batches"], saved["examples"])
        return saved["z"], {**saved["info"], "teacher_cached": True}
    steps = max(1, int(round(fc.teacher_epochs * max(1, -(-len(data) // tc.batch_size)))))
    counts = {"batches": 0, "examples": 0}

    def count(nb: int) -> None:
        counts["batches"] += 1
        counts["examples"] += nb
        if paper:
            private.count(PAPER_WHO, PAPER_HOW, False, nb)

    z = fit_prompt(model, data, steps=steps, batch_size=min(tc.batch_size, len(data)), lr=bb.zo_lr, mu=bb.zo_mu,
                   k=bb.zo_directions, optimizer=bb.zo_optimizer, seed=tc.seed + 17, on_batch=count)
    acc = _accuracy(model, z, eval_ds, tc.eval_batch_size)
    info = {"teacher_accuracy": acc, "teacher_steps": steps,
            "teacher_data": "public split" if not paper else "private split (not DP)"}
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp")
    torch.save({"z": z, "info": info, **counts}, tmp)
    tmp.replace(cache)
    return z, {**info, "teacher_cached": False}


__all__ = ["NONPRIVATE_WHO", "PAPER_WHO", "TRAIN_WHO", "teacher_prompt", "train"]
