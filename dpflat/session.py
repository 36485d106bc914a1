"""What every training loop shares: one run's skeleton around a stepper.

The white-box DP-SGD loop (``train.py``) and the black-box zeroth-order loop
(``blackbox/loop.py``) differ only in how one step turns private examples into an
update. Everything around that lives here, once:

- ``run_in_folder``: the run folder's crash-safe dance (a finished run is returned,
  a failed fresh one leaves no folder, the lock keeps two processes apart);
- ``Session``: seeds and threads, the set-up phases it names to an ``on_phase`` callback
  (``"data"``, each level's name, ``"training"``: how a notebook shows a status line), the data (private split behind the ledger), the
  latest checkpoint, resume of the shared state (step, best-on-val, ledger counts),
  evaluate-and-select on the validation split, the per-step log row, checkpoints
  (the start of a run is one too: step 0, before the first secret draw), and the
  finish: the selected parameters, the one read of the test split, ledger, private
  diagnostics and result written through ``runs.finish_run``.

Under ``torchrun`` rank 0 alone writes, evaluates and holds the lock; the helpers of
``distributed.py`` are no-ops in a single process, so the black-box loop uses them too.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from . import data as data_mod
from . import splits as splits_mod
from . import tokens as tokens_mod
from . import distributed as dist_mod
from . import engine as engine_mod
from .config import ConfigError, RunConfig, check_device
from .engine import DPSetup, fill_ledger
from .evaluate import peak_memory_mb, reset_peak_memory
from . import decoders, lora
from .models import check_layers, load_tokenizer, resolve_head
from .privacy import PRIVATE_METRICS, SAMPLED_GAUSSIAN, PrivacyLedger, PrivateSplit, fill_release
from .runs import RunDir, finish_run, finished_result

#: the per-step loss of private batches: a private diagnostic, not covered by the guarantee
LOSS_KEY = PRIVATE_METRICS[0]  # "train_loss_private"
Tensors = dict[str, torch.Tensor]
#: called with the name of each slow set-up phase as it begins: ``"data"`` (tokeniser, loading,
#: splitting, tokenising), a flattening level's or step callback's name while its ``setup`` runs
#: (``"layers"``, ``"distill"``, ``"awp"``, ``"trajectory"``; the black box's teacher prompt is
#: ``"distill"`` too), then ``"training"``
#: when the steps start. Display only: nothing of the run depends on it.
PhaseCallback = Callable[[str], None]


class NonFiniteLoss(ConfigError):
    """The training loss became NaN or inf: the run stops, and no result is written."""


def check_finite(loss: float, step: int) -> None:
    """Stop a diverged run with one line (an argmax of NaN logits is not a result)."""
    if not math.isfinite(loss):
        raise NonFiniteLoss(f"training loss became non-finite ({loss}) at step {step}; lower --lr "
                            f"(the run is left unfinished, no result written)")


def reseed_step(seed: int, step: int, secret=None) -> None:
    """Per step, so a resumed run replays dropout exactly. A DP step passes its mechanism's
    secret generators (``engine.MechanismRNG.step_seed``: its dropout must not be public, see
    there); a non-private step is seeded from the public seed."""
    torch.manual_seed(secret.step_seed() if secret is not None else seed * 1_000_003 + step)


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


def prepare_data(cfg: RunConfig, tokenizer=None, extra_private=None):
    """Load, split and tokenise the task: returns (card, splits, tokenised dict).

    ``tokd["val"]`` is for checkpoint selection; ``tokd["eval"]`` is the test split,
    which a run reads once, at the end (``Session.finish``). ``extra_private``: raw rows
    (the task's columns + idx) appended to the private split, e.g. an audit's canaries;
    they are then private data like any other (the ledger counts them).
    """
    card = data_mod.get_task(cfg.data.task)
    raw = data_mod.load_raw(card, cfg.data.data_dir)
    splits = splits_mod.splits_for_config(raw, cfg.data, cfg.train.seed)
    tok = tokenizer or load_tokenizer(cfg.model)
    template = None
    if decoders.is_decoder(cfg.model.backbone):  # a causal LM: the prompt up to the next token (decoders.py)
        if resolve_head(cfg.model, card.name).head == "prompt":
            template = decoders.prompt_for(card, cfg.model.template, cfg.model.label_words)[0]
    elif cfg.model.head == "prompt":  # LM-BFF: one sequence per example with a mask token
        template = tokens_mod.prompt_for(card, cfg.model.template, cfg.model.label_words)[0]
    tokd = {
        name: tokens_mod.tokenize(getattr(splits, name), tok, cfg.data.max_length, cfg.data.cache_dir, template)
        for name in ("private", "public", "val", "eval")
    }
    if extra_private is not None and len(extra_private):
        splits, tokd = _with_extra_private(cfg, tok, splits, tokd, extra_private)
    return card, splits, tokd


def _with_extra_private(cfg: RunConfig, tok, splits, tokd, extra):
    """The private split (raw and tokenised) with ``extra``'s rows appended.

    Tokenised without the prompt template, as the audit scores its canaries (``audit.py``).
    """
    from datasets import concatenate_datasets

    can = tokens_mod.tokenize(extra, tok, cfg.data.max_length, cfg.data.cache_dir)
    priv = tokd["private"]
    merged = concatenate_datasets([priv.with_format(None), can.with_format(None)])
    tokd = {**tokd, "private": merged.with_format("torch", columns=priv.column_names)}
    # as the audit always built it: the private, public and test splits (a canary run reports no overlap counts)
    splits = splits_mod.Splits(private=concatenate_datasets([splits.private, extra]), public=splits.public,
                             eval=splits.eval)
    return splits, tokd


def check_before_work(cfg: RunConfig, max_steps: int | None = None) -> None:
    """What can be refused in seconds is refused before any folder, data or weights (the loops' first call).

    The device must exist here, ``max_steps`` be positive, and the layer counts fit the
    backbone (read from its config.json alone): a bad ``--n-drop`` used to surface only
    after a minute of loading and teacher training.
    """
    check_device(cfg.train.device)
    lora.check_run(cfg)  # --peft lora: what it does not do yet
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
        raise ConfigError(f"max_steps must be a whole number >= 1, got {max_steps!r}")
    if not cfg.blackbox.active:
        check_layers(cfg.model, cfg.flat.n_drop if cfg.flat.layers else None)


def run_in_folder(cfg: RunConfig, resume: bool, body: Callable[[RunDir], dict[str, Any]]) -> dict[str, Any]:
    """Run ``body(rd)`` in the config's run folder, holding its lock.

    A finished run of this same config is returned as is (a different config in the
    folder is refused); a fresh folder whose run fails is removed (no config-only
    folder left behind). Under torchrun rank 0 does the folder work, every rank learns it.
    """
    rd = RunDir.for_config(cfg)
    res = dist_mod.on_main(lambda: finished_result(rd, cfg) if resume else None)
    if res is not None:
        return res
    made = dist_mod.on_main(rd.create, cfg) and dist_mod.is_main()
    with rd.removed_on_failure(made), dist_mod.main_only(rd.lock):
        return body(rd)


class Session:
    """One run in progress: data, ledger, where the loop is, the selected parameters.

    The stepper builds its model and mechanism, then ``bind``s three callbacks: how to
    evaluate on val, what the trainable state is, and its own checkpoint entries. From
    there ``end_step`` does the bookkeeping of each logical step and ``finish`` the rest.
    """

    def __init__(self, cfg: RunConfig, rd: RunDir, *, resume: bool = True, max_steps: int | None = None,
                 on_step: Callable[[dict[str, Any]], None] | None = None, extra_private=None,
                 on_phase: PhaseCallback | None = None):
        self.cfg, self.rd, self.max_steps, self.on_step = cfg, rd, max_steps, on_step
        self.on_phase = on_phase
        self.device = start_run(cfg)
        self.t_start = time.time()
        reset_peak_memory(self.device)
        self.phase("data")
        self.tokenizer = load_tokenizer(cfg.model)
        self.card, self.splits, self.tokd = prepare_data(cfg, self.tokenizer, extra_private)
        self.n = len(self.tokd["private"])
        if cfg.train.batch_size > self.n:
            raise ConfigError(f"batch_size {cfg.train.batch_size} is larger than the private training split "
                              f"({self.n} examples)")
        if cfg.privacy.enabled:  # refused before any model, setup or folder work: δ < 1/N (the default's too)
            delta = cfg.privacy.resolve_delta(self.n)  # and a target ε the accountant can resolve
            _, q, steps = engine_mod.planned_mechanism(cfg, self.n)
            engine_mod.noise_for_target(cfg.privacy, q, steps, delta)
        self.ledger = PrivacyLedger()
        self.private = PrivateSplit(self.tokd["private"], self.ledger)
        self.main = dist_mod.is_main()  # under torchrun only rank 0 evaluates, logs and writes
        # the same checkpoint on every rank: (trainable tensors, private state) or None
        self.ckpt = dist_mod.on_main(lambda: rd.latest_checkpoint() if resume else None)
        if self.ckpt is None and self.main:
            rd.start_fresh()  # rows and files of an attempt that is not continued go (killed, or --no-resume)
        self.step, self.best = 0, {"accuracy": -1.0, "step": 0}
        self.best_params: Tensors | None = None  # the selected parameters so far (private state)
        # the step at which the current pass over the loader began: a run resumed in the middle of
        # a pass finishes that pass (same batches, same secret draws) instead of starting a new one
        self.pass_start: int | None = None
        self.seen, self.t0, self.step0 = 0, time.time(), 0
        self.training = False  # inside progress(): the train clock runs
        #: seconds of earlier processes of this run, up to their last checkpoint (a resumed run's
        #: train_s and wall_s are totals; without this they were the last process's only)
        self.before = {"train_s": 0.0, "wall_s": 0.0, "processes": 0}
        #: private statistics the stepper adds for private_diagnostics.json (e.g. the black box's queries)
        self.diagnostics: dict[str, Any] = {}

    def phase(self, name: str) -> None:
        """Say which set-up phase begins (``on_phase``; see :data:`PhaseCallback`)."""
        if self.on_phase is not None:
            self.on_phase(name)

    # --- plan and resume
    def plan(self, steps_per_epoch: int) -> None:
        """The run's length: total steps, when to evaluate, where this call stops."""
        tc = self.cfg.train
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = max(1, int(round(tc.epochs * steps_per_epoch)))
        self.eval_every = tc.eval_every or steps_per_epoch
        self.stop_at = self.total_steps if self.max_steps is None else min(self.total_steps, self.max_steps)

    def bind(self, evaluate: Callable[[], dict[str, Any]], trainable: Callable[[], Tensors],
             private_state: Callable[[], dict[str, Any]]) -> None:
        """The stepper's part: val evaluation, its trainable tensors, its checkpoint entries.

        Called when the stepper is set up (model, mechanism, levels; resumed or fresh) and before
        its first step. A fresh run then takes its step-0 checkpoint: the secret generators' state
        before their first draw, the setup's outcome and ledger. Why: a run killed before its
        first regular checkpoint resumes from there and replays every step bit for bit (same
        batches, same noise, one metrics row per step) instead of starting over with a new
        secret stream while the lost steps' releases go uncounted.
        """
        self.evaluate, self.trainable, self.private_state = evaluate, trainable, private_state
        if self.ckpt is None and self.step == 0:
            self.checkpoint()

    def resume_shared(self, state: dict[str, Any]) -> None:
        """Step, best-on-val and ledger counts of the checkpoint (the stepper restores the rest)."""
        self.step, self.best = state["step"], state["best"]
        self.best_params = state.get("best_params")
        self.pass_start = state.get("pass_start")  # None in checkpoints older than this key
        self.before = dict(state.get("elapsed") or {"train_s": 0.0, "wall_s": 0.0, "processes": 0})
        self.ledger.resume_counts(state["ledger"])
        dist_mod.keep_counts_on_main(self.ledger)  # torchrun: the saved counts are totals over ranks
        if self.main:
            self.rd.truncate_metrics(self.step)
            # best.safetensors as of this checkpoint: one written by the discarded steps must not survive
            if self.best_params is not None:
                self.rd.save_best(self.best_params)
            else:
                self.rd.drop_best()

    # --- every step
    @contextmanager
    def progress(self) -> Iterator[None]:
        """The progress bar and the throughput clock of the steps this call runs."""
        tc = self.cfg.train
        # a short label (the variant): the run folder's hashed name wrapped the bar in a notebook
        self.bar = tqdm(total=self.total_steps, initial=self.step, desc=f"train {self.cfg.variant}",
                        disable=not (tc.progress and self.main), leave=False)
        self.t0, self.seen, self.step0 = time.time(), 0, self.step
        self.training = True
        self.phase("training")
        try:
            yield
        finally:
            self.bar.close()

    def select(self) -> dict[str, Any]:
        """Evaluate on the validation split; keep the parameters if they are the best so far."""
        r = self.evaluate()
        if r["accuracy"] > self.best["accuracy"]:
            self.best = {"accuracy": r["accuracy"], "step": self.step}
            self.best_params = {k: v.detach().cpu().clone() for k, v in self.trainable().items()}
            self.rd.save_best(self.best_params)
        return r

    def end_step(self, row: dict[str, Any], dp: DPSetup | None,
                 tail: Callable[[], dict[str, Any]] | None = None) -> None:
        """After ``self.step`` was advanced: evaluate when due, ε, log the row, checkpoint when due.

        ``tail``: the stepper's last columns, read after the evaluation (e.g. the black box's query count).
        """
        tc, step = self.cfg.train, self.step
        self.bar.update(1)
        milestone = self.main and (step % self.eval_every == 0 or step == self.total_steps)
        if milestone:
            row.update({f"eval_{k}": v for k, v in self.select().items()})
        if self.main and dp and (milestone or step % tc.checkpoint_every == 0):
            # ε so far; not every step: one accountant call costs up to ~0.5 s. A run that
            # is not DP as a whole (paper mode) shows it only as the DP-SGD part's
            row["epsilon" if not self.ledger.unaccounted else "dpsgd_part_epsilon"] = dp.spent()
        row["examples_per_s"] = self.seen / max(time.time() - self.t0, 1e-9)  # this rank's
        row.update(tail() if tail else {})
        if self.main:
            self.rd.log(row)
        self.bar.set_postfix({k: round(v, 3) for k, v in row.items() if k in (LOSS_KEY, "eval_accuracy", "epsilon")
                              and isinstance(v, float) and math.isfinite(v)})
        if self.on_step:
            self.on_step(row)
        if step % tc.checkpoint_every == 0 or step == self.total_steps:
            self.checkpoint()

    def checkpoint(self) -> None:
        """The trainable tensors and the private state (shared entries + the stepper's)."""
        state = {"step": self.step, "pass_start": self.pass_start, "best": self.best, "elapsed": self.elapsed(),
                 "ledger": dist_mod.merged_ledger(self.ledger).to_dict(),
                 "best_params": self.best_params, **self.private_state()}
        if self.main:
            self.rd.save_checkpoint(self.step, self.trainable(), state)
        dist_mod.barrier()

    # --- the end
    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    def unfinished(self, dp: DPSetup | None) -> dict[str, Any]:
        """Stopped early (``max_steps``): the ledger so far, and no result."""
        fill_ledger(self.ledger, self.cfg.privacy, dp, self.step)
        return {"run_id": self.rd.path.name, "finished": False, "step": self.step, "run_dir": str(self.rd.path)}

    def elapsed(self) -> dict[str, float]:
        """Seconds so far over every process of this run (earlier ones up to their last checkpoint)."""
        now, b = time.time(), self.before
        return {"train_s": b["train_s"] + (now - self.t0 if self.training else 0.0),
                "wall_s": b["wall_s"] + now - self.t_start, "processes": b["processes"] + 1}

    def cost(self, setup_s: float) -> dict[str, float]:
        """Time and throughput of the run, for the results row.

        train_s and wall_s add up every process of a resumed run (to each one's last checkpoint);
        examples_per_s is this process's (its examples over its own train time).
        """
        this_s = time.time() - self.t0
        e = self.elapsed()
        return {"setup_s": setup_s, "train_s": e["train_s"], "examples_per_s": self.seen / max(this_s, 1e-9),
                "this_train_s": this_s, "processes": e["processes"], "wall_s": e["wall_s"]}

    def finish(self, dp: DPSetup | None, *, last: Tensors, load: Callable[[Tensors], Tensors],
               val: Callable[[], dict[str, Any]], test: Callable[[], tuple[dict[str, Any], dict[str, Any]]],
               keep: str, info: dict[str, Any], cost: dict[str, float] | None = None,
               overlap: dict[str, int] | None = None) -> dict[str, Any]:
        """Select the best-on-val parameters, read the test split once, write model, ledger, result and row.

        ``load(best)`` puts the selected tensors (None: keep the last) into the model and
        returns the state to release; ``val`` / ``test`` evaluate that model. ``overlap``: the
        splits' duplicate counts, which go to the private diagnostics with the batch sizes.
        """
        self.ledger = dist_mod.merged_ledger(self.ledger)  # torchrun: every rank's reads, counted once
        return dist_mod.on_main(self._finish, dp, last, load, val, test, keep, info, cost, overlap)

    def _finish(self, dp, last, load, val, test, keep, info, cost, overlap) -> dict[str, Any]:
        rd, cfg = self.rd, self.cfg
        rd.save_last(last)
        rd.save_model(load(rd.best_params()))
        v = val()
        final, per_example = test()  # the test split, once
        fill_ledger(self.ledger, cfg.privacy, dp, self.step)
        fill_release(self.ledger)
        rd.write_ledger(self.ledger.public_dict())
        if cost is not None:
            cost = self._public_cost(dict(cost))
            cost["wall_s"] = self.elapsed()["wall_s"]
            cost["peak_mem_mb"] = peak_memory_mb(self.device)
        rd.write_private_diagnostics({
            "note": "private diagnostics: functions of the private split outside the accountant, not covered by "
                    "the run's guarantee (see ledger.json release)",
            **self.ledger.private_dict(), "split_overlap": {k: int(v) for k, v in (overlap or {}).items()},
            **self.diagnostics})
        return finish_run(cfg, rd, self.card.metric, self.ledger, final, self.best["step"], self.step, keep, info,
                          val=v, test_examples=per_example, cost=cost)

    def _public_cost(self, cost: dict[str, Any]) -> dict[str, Any]:
        """The results row's throughput of a DP run: expected examples (qN per step) per second.

        Why: the exact count (``seen``) is the sum of the secret Poisson batch sizes, and
        examples_per_s x train_s gave it back; it goes to the private diagnostics instead.
        """
        led = self.ledger
        if "examples_per_s" in cost and led.mechanism in SAMPLED_GAUSSIAN and led.sample_rate:
            self.diagnostics["examples_per_s"] = cost["examples_per_s"]
            expected = (self.step - self.step0) * led.sample_rate * led.n_private
            cost["examples_per_s"] = expected / max(float(cost.get("this_train_s") or 0.0), 1e-9)
        cost.pop("this_train_s", None)
        return cost


__all__ = ["LOSS_KEY", "NonFiniteLoss", "PhaseCallback", "Session", "check_before_work", "check_finite", "prepare_data", "reseed_step", "run_in_folder",
           "start_run"]
