"""Run configuration: one validated dataclass per concern.

Every field is also a CLI flag (see ``cli.py``), so a bad value must fail here, at
construction, with one clear line (``ConfigError``) rather than deep inside a run.
Each field carries its help text in its metadata (the flag's ``--help`` comes from
there and nowhere else), and every value is checked against the field's annotation
(``bool``, ``int``, ``float``, ``Literal[...]``, ``X | None``) before the section's own
range checks: a JSON ``"enabled": "no"`` or ``"batch_size": "64"`` is refused by name
instead of being taken as true or reaching the DataLoader.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import types
import typing
import dataclasses
from dataclasses import FrozenInstanceError, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A bad configuration value; its message is one line the CLI prints as-is."""


def warn(msg: str) -> None:
    """One line on stderr: something was repaired or worked around, or looks wrong, and the run goes on."""
    import sys

    print(f"dpflat: warning: {msg}", file=sys.stderr, flush=True)


class UnknownName(ConfigError):
    """A section or field this version does not know: a typo, or a config.json a newer dpflat wrote."""

    def __init__(self, msg: str, name: str):
        super().__init__(msg)
        self.name = name


class FrozenConfigError(ConfigError, FrozenInstanceError):
    """An assignment to a validated config: configs are immutable, a changed copy comes from ``replace``."""


#: ``_opt(identity=WHEN_SET)``: in the run's identity only at a value other than its default
WHEN_SET = "when-set"

#: the largest number of points per axis of a 2D loss surface (``landscape --grid``): grid² evaluations
MAX_GRID = 201


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _opt(default: Any, help: str, identity: bool | str = True) -> Any:  # noqa: A002 - argparse's word
    """A config field: its default, its help text (the CLI flag's ``--help``) and whether it is
    part of the run's identity, in one place. ``identity=False``: where or how a run is shown or
    executed, never what it computes (left out of run ids and of config comparisons).
    ``identity=WHEN_SET``: part of the identity only when it differs from its default -- a field
    added after runs were recorded, so that their run ids stay what they were."""
    return field(default=default, metadata={"help": help, "identity": identity})


# --------------------------------------------------------------------------- type checks
_HINTS: dict[type, dict[str, Any]] = {}


def field_types(klass: type) -> dict[str, Any]:
    """The resolved annotations of a config dataclass (``typing.get_type_hints``, cached)."""
    if klass not in _HINTS:
        _HINTS[klass] = typing.get_type_hints(klass)
    return _HINTS[klass]


def _is_union(t: Any) -> bool:
    return typing.get_origin(t) in (typing.Union, types.UnionType)


def split_optional(t: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (t, False)."""
    if _is_union(t):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(t)) == 2:
            return args[0], True
    return t, False


def _describe(t: Any) -> str:
    if typing.get_origin(t) is Literal:
        return "one of " + "|".join(str(a) for a in typing.get_args(t))
    return {bool: "true or false", int: "a whole number", float: "a finite number", str: "a string"}.get(
        t, getattr(t, "__name__", str(t)))


def _fits(value: Any, t: Any) -> bool:
    if typing.get_origin(t) is Literal:
        return any(type(value) is type(a) and value == a for a in typing.get_args(t))
    if t is bool:
        return isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if t is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if t is str:
        return isinstance(value, str)
    return True  # an annotation we do not check (none today)


def check_types(obj: Any, section: str) -> None:
    """Every field of a config section against its annotation; the message names ``section.field``."""
    for name, t in field_types(type(obj)).items():
        value = getattr(obj, name)
        base, optional = split_optional(t)
        if value is None and optional:
            continue
        if not _fits(value, base):
            want = _describe(base) + (" or null" if optional else "")
            raise ConfigError(f"{section}.{name} must be {want}, got {value!r}")


def _frozen(where: str):
    """``__setattr__``/``__delattr__`` of a frozen config: one line that says how to get a changed copy.

    Why frozen: a config is validated once, at construction; a later assignment (``cfg.privacy.epsilon
    = nan``) would reach the run, its config.json and its id unchecked.
    """

    def refuse(self, attr: str, *value: Any) -> None:
        how = (f"cfg.replace({attr}=...)" if where == "run" else
               f"cfg.replace({where}={{{attr!r}: ...}}) or cfg.{where}.replace({attr}=...)")
        raise FrozenConfigError(f"a validated config cannot be changed ({where + '.' if where != 'run' else ''}"
                                f"{attr}): make a changed copy with {how}")

    return refuse


def section(name: str):
    """Class decorator (over ``@dataclass(frozen=True)``): the section's ``__post_init__`` runs after
    the type check of every field; assignments are refused, ``replace`` makes a validated copy."""

    def wrap(klass: type) -> type:
        own = klass.__dict__.get("__post_init__")

        def __post_init__(self) -> None:
            check_types(self, name)
            if own is not None:
                own(self)

        def replace(self, **changes: Any):
            """A copy with some fields changed, validated like a new one."""
            return dataclasses.replace(self, **changes)

        klass.__post_init__ = __post_init__
        klass.replace = replace
        klass.__setattr__ = klass.__delattr__ = _frozen(name)
        klass.section_name = name
        return klass

    return wrap


# Run names become folder names next to the results table and its lock.
_RESERVED_NAME = re.compile(r"^(results\.parquet.*|.*\.tmp|.*\.lock)$")


def check_run_name(name: str) -> None:
    """A run name is one folder name inside the output folder, never a path out of it."""
    _check(bool(name) and name.strip() == name, f"run_name must be a non-empty name without surrounding spaces, got {name!r}")
    _check("/" not in name and "\\" not in name and (os.sep not in name) and "\0" not in name,
           f"run_name must be a folder name, not a path (no / or \\), got {name!r}")
    _check(name not in (".", "..") and not name.startswith("."),
           f"run_name must not be . or .. or start with a dot, got {name!r}")
    _check(not _RESERVED_NAME.match(name), f"run_name {name!r} is reserved for the results table's own files")
    _check(len(name.encode("utf-8")) <= 200,
           f"run_name is {len(name.encode('utf-8'))} bytes long; the limit is 200 (filesystems allow 255 per name)")


def check_device(device: str) -> None:
    """The device exists on this machine (not a config check: a GPU run's config.json loads on a laptop)."""
    dev = str(device)
    _check(re.fullmatch(r"cpu|mps|cuda(:\d+)?", dev) is not None, f"device must be cpu, cuda[:N] or mps, got {device!r}")
    if dev == "cpu":
        return
    import torch

    if dev == "mps":
        mps = getattr(torch.backends, "mps", None)
        _check(mps is not None and mps.is_available(), "device mps requested but MPS is not available on this machine; use --device cpu")
        return
    _check(torch.cuda.is_available(), f"device {dev} requested but CUDA is not available on this machine; use --device cpu")
    if ":" in dev:
        idx, n = int(dev.split(":")[1]), torch.cuda.device_count()
        _check(idx < n, f"device {dev} requested but this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")


@section("data")
@dataclass(frozen=True)
class DataConfig:
    """Which task, where its files are, and how to split/subsample it."""

    task: str = _opt("sst2", "task name (see `python -m dpflat tasks`)")
    data_dir: str | None = _opt(None, "folder holding <task>/ files; else $DPFLAT_DATA_DIR, ./data, then the HF hub")
    max_length: int = _opt(64, "tokens per example (padding and truncation)")
    # CPU-sized defaults (minutes on 2 cores); the README gives the GPU-scale values
    # the study regime (issue 27, chosen on val: benchmarks/bench_regime.py): ~10 min a run on 2 cores
    train_size: int | None = _opt(8000, "subsample the private training split to at most this many examples (a task with "
                                 "fewer uses all, with a note; 0: all)")
    eval_size: int | None = _opt(None, "subsample the test split (the task's eval file; 0: all)")
    # where the safe teacher's val accuracy stops rising with more public data (benchmarks/bench_teacher.py)
    public_size: float = _opt(2000, "public split carved from train (fraction <1 or count); DP-safe flattening reads only it")
    cache_dir: str | None = _opt(None, "tokenisation cache folder (default: in-process only)")
    val_size: int = _opt(500, "rows of the train file held out as the validation split (checkpoint selection reads "
                              "only it; the eval file is the test split, read once at the end)")

    def __post_init__(self) -> None:
        _check(bool(self.task), "task must be a non-empty name")
        _check(self.val_size >= 1, f"val_size must be a whole number >= 1, got {self.val_size!r}")
        _check(8 <= self.max_length <= 4096, f"max_length must be in [8, 4096], got {self.max_length}")
        for name in ("train_size", "eval_size"):
            if getattr(self, name) == 0:  # the CLI's way to say "all of it"
                object.__setattr__(self, name, None)  # still being constructed: frozen from here on
            v = getattr(self, name)
            _check(v is None or v >= 1, f"{name} must be >= 1 when given, got {v}")
        _check(self.public_size >= 0, f"public_size must be >= 0, got {self.public_size}")
        if self.public_size >= 1:
            _check(float(self.public_size).is_integer(), "public_size >= 1 must be a whole count")


@section("model")
@dataclass(frozen=True)
class ModelConfig:
    """Backbone and the trainable prefix + head on top of it."""

    backbone: str = _opt("minilm", "minilm (shipped offline), smollm2 (a decoder LLM shipped offline: SmolLM2-135M-Instruct, "
                                   "dequantised from 4-bit GGUF), tiny-bert, tiny-roberta, tiny-llama, tiny-qwen2, tiny-gpt2, "
                                   "a local HF model dir (encoder or causal LM), or a hub id")
    prefix_len: int = _opt(16, "prefix length m per layer (key/value prefix)")
    prefix_init: Literal["random", "tokens"] = _opt(
        "tokens", "random, or tokens: start from the backbone's keys/values of real tokens")
    pooling: Literal["mean", "cls"] = _opt("mean", "sentence representation fed to the head")
    head_dropout: float = _opt(0.0, "dropout before the linear head, in [0, 1)")
    backbone_dropout: bool = _opt(False, "the frozen backbone's own dropout (hidden, attention) while training; off: "
                                        "its layers run as in evaluation (faster, and a batch's examples share no draw)")
    attn: Literal["sdpa", "eager"] = _opt("sdpa", "attention kernel; eager supports double backward (Hessians) on CPU")
    keep_layers: str | None = _opt(None, "comma-separated layers that keep a prefix, e.g. 0,2,5 (default: all)")
    head: Literal["auto", "linear", "prompt", "readout"] = _opt(
        "auto", "auto: readout for a task with label descriptions (dpflat.tokens.READOUTS), else linear; "
                "linear: pooled hidden state -> linear layer; prompt: LM-BFF style, the masked-LM head's logits "
                  "of the label words at the template's mask (BERT/RoBERTa with an MLM head); readout: the frozen "
                  "zero-shot readout of a sentence embedder, cosine to each label's description, plus a per-class "
                  "bias (only the prefix and K numbers train)")
    label_description: str | None = _opt(None, "readout head: each label's description, e.g. 'a {} review' "
                                               "(default: the task's, dpflat.tokens.READOUTS)")
    cosine_scale: float = _opt(20.0, "readout head: logit scale of the cosine similarity")
    template: str | None = _opt(None, "prompt head: LM-BFF template, e.g. *cls**sent_0*_It_was*mask*.*sep+* "
                                      "(default: the task's, docs/PROTOCOL.md)")
    label_words: str | None = _opt(None, "prompt head: one word per class, comma-separated in class order, "
                                         "e.g. terrible,great (default: the task's)")
    peft: Literal["prefix", "lora"] = _opt(
        "prefix", "trainable family: prefix (per-layer key/value prefixes, the paper's method) or lora (low-rank "
                  "adapters on the attention projections through the peft library; the flattening levels act on the "
                  "adapters, distillation as a decoupled pull after each step)", identity=WHEN_SET)
    lora_rank: int = _opt(8, "LoRA rank r (--peft lora)", identity=WHEN_SET)
    lora_alpha: float = _opt(16.0, "LoRA scale alpha; the update is (alpha / r) B A (--peft lora)", identity=WHEN_SET)

    def __post_init__(self) -> None:
        _check(bool(self.backbone), "backbone must be given")
        _check(self.head in ("auto", "linear", "prompt", "readout"),
               f"head must be auto|linear|prompt|readout, got {self.head}")
        _check(self.cosine_scale > 0, f"cosine_scale must be > 0, got {self.cosine_scale}")
        if self.label_description is not None:
            _check("{}" in self.label_description,
                   f"label_description must contain {{}} for the label name, got {self.label_description!r}")
        if self.template is not None:
            _check("*mask*" in self.template and "*sent_0*" in self.template,
                   f"template must contain *mask* and *sent_0*, got {self.template!r}")
        if self.label_words is not None:
            words = [w.strip() for w in str(self.label_words).split(",")]
            _check(len(words) >= 2 and all(words), f"label_words must be >= 2 comma-separated words, got {self.label_words!r}")
        _check(1 <= self.prefix_len <= 512, f"prefix_len must be in [1, 512], got {self.prefix_len}")
        _check(1 <= self.lora_rank <= 1024, f"lora_rank must be in [1, 1024], got {self.lora_rank}")
        _check(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}")
        _check(0.0 <= self.head_dropout < 1.0, f"head_dropout must be in [0, 1), got {self.head_dropout}")
        if self.keep_layers is not None:
            self.keep_layer_ids()  # validates the format

    def keep_layer_ids(self) -> list[int] | None:
        if self.keep_layers is None:
            return None
        try:
            ids = [int(x) for x in str(self.keep_layers).split(",") if x.strip() != ""]
        except ValueError:
            raise ConfigError(f"keep_layers must be comma-separated layer numbers, got {self.keep_layers!r}") from None
        _check(all(i >= 0 for i in ids), f"keep_layers must be >= 0, got {self.keep_layers!r}")
        _check(bool(ids), f"keep_layers must name at least one layer (e.g. 0,1), got {self.keep_layers!r}")
        return ids


@section("privacy")
@dataclass(frozen=True)
class PrivacyConfig:
    """DP-SGD settings. ``enabled=False`` runs the same loop without clipping or noise."""

    enabled: bool = _opt(True, "train with DP-SGD (--no-dp: non-private, same loop)")
    epsilon: float = _opt(8.0, "target ε (the accountant's σ is searched so that ε_spent <= target)")
    delta: float | None = _opt(None, "δ (default: 1/N^1.1 for N private examples)")
    max_grad_norm: float = _opt(1.0, "per-example clipping norm C")
    accountant: Literal["rdp", "prv"] = _opt("rdp", "privacy accountant")
    # hooks: per-example gradients by module hooks (the fastest here: a prefix's per-example
    # gradient is small); ghost: Opacus' ghost clipping (per-example norms without
    # per-example gradients, two backward passes); functorch: vmap'd per-example gradients
    grad_sample_mode: Literal["hooks", "ghost", "functorch"] = _opt(
        "hooks", "Opacus per-example gradient mode: hooks, ghost (ghost clipping) or functorch (vmap)")
    poisson: bool = _opt(True, "Poisson sampling of batches (needed for the accounting)")

    def __post_init__(self) -> None:
        if self.enabled:
            _check(self.epsilon > 0, f"epsilon must be > 0, got {self.epsilon}")
            _check(self.delta is None or 0 < self.delta < 1, f"delta must be in (0, 1), got {self.delta}")
            _check(self.poisson, "DP needs Poisson sampling (--poisson): the accountant assumes it; shuffled "
                   "fixed-size batches (--no-poisson) are not DP, use them only with --no-dp")
        _check(self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm}")

    def resolve_delta(self, n_private: int) -> float:
        """δ = 1/N^1.1 by default: smaller than 1/N, the usual rule of thumb.

        Every δ, the default too, must be < 1/N: at δ >= 1/N the mechanism that publishes one
        random record in full is (0, δ)-DP, so such a "guarantee" protects no one. For N = 1 the
        default is 1 = 1/N, so a DP run needs N >= 2. Checked here because only the run knows N.
        """
        if self.delta is None:
            if n_private < 2:
                raise ConfigError(f"DP needs at least 2 private examples, got N = {n_private}: the default "
                                  "delta 1/N^1.1 is then not < 1/N (raise --train-size, or use --no-dp)")
            return 1.0 / (n_private**1.1)
        if n_private > 0 and self.delta >= 1.0 / n_private:
            raise ConfigError(f"delta {self.delta:g} must be < 1/N = {1.0 / n_private:.3g} "
                              f"(N = {n_private} private examples); omit --delta for the default 1/N^1.1")
        return self.delta


Mode = Literal["safe", "paper"]


@section("flat")
@dataclass(frozen=True)
class FlatConfig:
    """The three flattening levels, each on/off with its mode (see docs/ARCHITECTURE.md and the README)."""

    awp: bool = _opt(False, "within-layer flattening: adversarial weight perturbation on the prefixes")
    awp_mode: Mode = _opt("safe", "safe: direction from the previous noisy DP gradient; paper: raw private ascent (not DP)")
    awp_gamma: float = _opt(0.01, "relative perturbation size per layer (paper mode default: 1e-4)")
    awp_epochs: float = _opt(0.5, "AWP during this many epochs of warm-up (a value <1 is a fraction of training)")
    awp_proxy_lr: float = _opt(0.01, "paper mode: ascent step size on the proxy copy")
    layers: bool = _opt(False, "cross-layer flattening: drop the prefixes of the sharpest layers")
    layers_mode: Mode = _opt("safe", "safe: sharpness on the public split; paper: on private data (not DP)")
    n_drop: int = _opt(2, "number of layers whose prefix is removed (fewer than the backbone's layers)")
    layers_rho: float = _opt(0.05, "radius ρ of the sharpness indicator's ball")
    layers_directions: int = _opt(3, "random directions of the indicator besides the gradient one")
    layers_scorer: Literal["plateau", "warmup"] = _opt(
        "plateau", "model the indicator is scored on: plateau = a non-private fit (all layers) to its val plateau "
                   "with the teacher's settings; warmup = --layers-warmup-steps fixed steps (dropout off in both)")
    layers_warmup_steps: int = _opt(30, "with --layers-scorer warmup: non-private steps before scoring (on allowed data)")
    layers_examples: int = _opt(128, "fixed subset the indicator is evaluated on")
    layers_stop_early: bool = _opt(False, "stop dropping when the indicator no longer decreases")
    distill: bool = _opt(False, "cross-model flattening: pull the prefix toward a non-private teacher")
    distill_mode: Mode = _opt("safe", "safe: teacher on public data; paper: teacher on private data (not DP)")
    distill_lambda: float = _opt(0.01, "weight λ of ||P - P_teacher||")
    distill_squared: bool = _opt(False, "use λ||P - P_teacher||² instead of the norm")
    teacher_epochs: float = _opt(10.0, "step budget of the teacher's (and the plateau scorer's) fit, in epochs of its data")
    teacher_batch_size: int = _opt(64, "batch size of the teacher's (and the plateau scorer's) fit")
    teacher_lr: float | None = _opt(None, "learning rate of the teacher's fit (default: the run's --lr)")
    teacher_patience: int = _opt(3, "stop the teacher's fit after this many val evaluations without a gain (0: use the "
                                    "whole budget); the best-on-val parameters are kept")
    teacher_eval_every: int = _opt(10, "evaluate the teacher's fit on the val split every N steps")

    def __post_init__(self) -> None:
        _check(self.awp_gamma >= 0, f"awp_gamma must be >= 0, got {self.awp_gamma}")
        _check(self.awp_epochs >= 0, f"awp_epochs must be >= 0, got {self.awp_epochs}")
        _check(self.awp_proxy_lr > 0, f"awp_proxy_lr must be > 0, got {self.awp_proxy_lr}")
        _check(self.n_drop >= 0, f"n_drop must be >= 0, got {self.n_drop}")
        _check(self.layers_rho > 0, f"layers_rho must be > 0, got {self.layers_rho}")
        _check(self.layers_examples >= 1, f"layers_examples must be >= 1, got {self.layers_examples}")
        _check(self.layers_warmup_steps >= 0, f"layers_warmup_steps must be >= 0, got {self.layers_warmup_steps}")
        _check(self.layers_directions >= 0, f"layers_directions must be >= 0, got {self.layers_directions}")
        _check(self.distill_lambda >= 0, f"distill_lambda must be >= 0, got {self.distill_lambda}")
        _check(self.teacher_epochs > 0, f"teacher_epochs must be > 0, got {self.teacher_epochs}")
        _check(self.teacher_batch_size >= 1, f"teacher_batch_size must be >= 1, got {self.teacher_batch_size}")
        _check(self.teacher_lr is None or 0 < self.teacher_lr <= MAX_LR,
               f"teacher_lr must be in (0, {MAX_LR:g}] when given, got {self.teacher_lr}")
        _check(self.teacher_patience >= 0, f"teacher_patience must be >= 0, got {self.teacher_patience}")
        _check(self.teacher_eval_every >= 1, f"teacher_eval_every must be >= 1, got {self.teacher_eval_every}")

    @property
    def paper_levels(self) -> list[str]:
        """Levels that run in paper mode (they read private data outside DP accounting)."""
        out = []
        if self.awp and self.awp_mode == "paper":
            out.append("awp")
        if self.layers and self.layers_mode == "paper":
            out.append("layers")
        if self.distill and self.distill_mode == "paper":
            out.append("distill")
        return out


#: the largest learning rate accepted: any larger step diverges (to NaN) on every setup we know
MAX_LR = 100.0


@section("train")
@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, evaluation, checkpoints and where the run goes."""

    epochs: float = _opt(8.0, "passes over the private training split")
    batch_size: int = _opt(256, "logical (expected) batch size; the sampling rate q is 1/len(loader) ≈ batch_size/N")
    physical_batch_size: int = _opt(64, "largest batch held in memory at once (BatchMemoryManager)")
    # how a logical batch is cut into physical ones (dpflat/batching.py): the same examples, clipping and
    # noise either way; grouped by length, each physical batch computes ~3x fewer padded positions
    group_by_length: Literal["auto", "on", "off"] = _opt(
        "auto", "cut each logical batch into physical batches of similar length, padding cut: on, off, or auto "
                "(on, except with paper-mode AWP, whose ascent batch must be an arbitrary part of the logical batch)")
    lr: float = _opt(2e-2, f"learning rate, in (0, {MAX_LR:g}]")
    optimizer: Literal["adamw", "sgd"] = _opt("adamw", "optimizer of the trainable prefix + head")
    weight_decay: float = _opt(0.0, "weight decay of the optimizer")
    eval_every: int = _opt(0, "evaluate every N steps (0: once per epoch)")
    eval_batch_size: int = _opt(256, "batch size of evaluation")
    checkpoint_every: int = _opt(20, "checkpoint every N steps")
    seed: int = _opt(0, "public seed: initialisation and data splits (never the DP noise)")
    device: str = _opt("cpu", "cpu, cuda[:N] or mps", identity=False)
    output_dir: str = _opt("runs", "root folder of the runs and of results.parquet", identity=False)
    run_name: str | None = _opt(None, "folder name of the run (default: variant_task_eps_seed_hash)", identity=False)
    num_threads: int | None = _opt(None, "torch CPU threads (default: torch's choice)", identity=False)
    progress: bool = _opt(True, "show a progress bar", identity=False)
    # matmul precision of forward/backward: auto = bf16 autocast on a CUDA GPU that has it
    # (the frozen backbone dominates the cost; tensor cores), fp32 elsewhere. Clipping, noise,
    # the optimizer and the trainable weights stay fp32 in every case.
    precision: Literal["auto", "fp32", "bf16"] = _opt(
        "auto", "matmul precision: auto = bf16 autocast on a CUDA GPU that has it, fp32 elsewhere")
    # diagnostics (dpflat/flat/trajectory.py): sharpness over time, never on the private split
    sharpness_every: int = _opt(0, "record the top Hessian eigenvalue and SAM sharpness every N steps into "
                                   "sharpness.jsonl (0: off; a diagnostic)")
    sharpness_data: Literal["public", "eval"] = _opt("public", "split the sharpness trajectory is measured on "
                                                               "(never the private split)")
    sharpness_examples: int = _opt(64, "examples behind each trajectory point")

    def __post_init__(self) -> None:
        _check(self.epochs > 0, f"epochs must be > 0, got {self.epochs}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(self.physical_batch_size >= 1, f"physical_batch_size must be >= 1, got {self.physical_batch_size}")
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(self.lr <= MAX_LR, f"lr must be <= {MAX_LR:g}, got {self.lr:g}: a step this large diverges to NaN")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.eval_every >= 0, f"eval_every must be >= 0, got {self.eval_every}")
        _check(self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        _check(self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        _check(re.fullmatch(r"cpu|mps|cuda(:\d+)?", self.device) is not None,
               f"device must be cpu, cuda[:N] or mps, got {self.device}")
        _check(bool(self.output_dir), "output_dir must be a folder name")
        _check(self.num_threads is None or self.num_threads >= 1, f"num_threads must be >= 1, got {self.num_threads}")
        if self.run_name is not None:
            check_run_name(self.run_name)
        _check(self.sharpness_every >= 0, f"sharpness_every must be >= 0, got {self.sharpness_every}")
        _check(self.seed >= 0, f"seed must be a whole number >= 0, got {self.seed}")
        _check(self.sharpness_examples >= 1, f"sharpness_examples must be >= 1, got {self.sharpness_examples}")

    def resolved_precision(self) -> str:
        """fp32 or bf16: what ``auto`` means on this run's device."""
        if self.precision != "auto":
            return self.precision
        if str(self.device).startswith("cuda"):
            import torch

            return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
        return "fp32"


ZOOptimizer = Literal["sgd", "adam", "cma"]


@section("blackbox")
@dataclass(frozen=True)
class BlackBoxConfig:
    """Black-box DP-Flat (``dpflat/blackbox/``): a soft prompt tuned from forward queries only.

    An all-default section (every white-box run) is left out of ``config.json`` and of
    the run id, so white-box run folders are unchanged by its existence.
    """

    active: bool = _opt(False, "black-box path (dpflat/blackbox/): tune a soft prompt from forward queries "
                               "only (the bb-* variants set it)")
    prompt_tokens: int = _opt(8, "black box: soft prompt length in tokens (prepended after [CLS])")
    prompt_dim: int = _opt(50, "black box: dimension d of z (fixed random projection to the prompt embeddings)")
    proj_scale: float = _opt(1.0, "black box: prompt shift of a unit-scale z, in word-embedding standard deviations")
    zo_mu: float = _opt(0.5, "black box: SPSA perturbation size (losses at z +- mu*u)")
    zo_lr: float = _opt(0.1, "black box: step size on z")
    # adam: steadier than DPZero's plain SGD at the few hundred steps a CPU affords (post-processing:
    # the privacy cost is the same); sgd (momentum 0.9); cma (CMA-ES, non-private only)
    zo_optimizer: ZOOptimizer = _opt("adam", "black box: sgd (DPZero), adam, or cma (CMA-ES, non-private only)")
    zo_directions: int = _opt(1, "black box: random directions per step (their k differences are clipped jointly to C)")
    readout_template: str | None = _opt(
        None, "black box: label description for the zero-shot readout, e.g. 'a {} review' (default: per task)")
    readout_scale: float = _opt(20.0, "black box: logit scale of the cosine readout")
    readout_bias: bool = _opt(True, "black box: z also carries a per-class logit bias of the readout")
    prompt_lambda: float = _opt(0.05, "black box with --distill: λ of λ||z - z_teacher||")

    def __post_init__(self) -> None:
        _check(1 <= self.prompt_tokens <= 256, f"prompt_tokens must be in [1, 256], got {self.prompt_tokens}")
        _check(1 <= self.prompt_dim <= 100_000, f"prompt_dim must be in [1, 100000], got {self.prompt_dim}")
        _check(self.proj_scale > 0, f"proj_scale must be > 0, got {self.proj_scale}")
        _check(self.zo_mu > 0, f"zo_mu must be > 0, got {self.zo_mu}")
        _check(self.zo_lr > 0, f"zo_lr must be > 0, got {self.zo_lr}")
        _check(1 <= self.zo_directions <= 64, f"zo_directions must be in [1, 64], got {self.zo_directions}")
        _check(self.readout_scale > 0, f"readout_scale must be > 0, got {self.readout_scale}")
        _check(self.prompt_lambda >= 0, f"prompt_lambda must be >= 0, got {self.prompt_lambda}")
        if self.readout_template is not None:
            _check("{}" in self.readout_template,
                   f"readout_template must contain {{}} for the label name, got {self.readout_template!r}")


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs; serialised as the run folder's config.json."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    flat: FlatConfig = field(default_factory=FlatConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    variant: str = "custom"
    blackbox: BlackBoxConfig = field(default_factory=BlackBoxConfig)

    def __post_init__(self) -> None:
        for sect, klass in SECTIONS.items():
            _check(isinstance(getattr(self, sect), klass), f"RunConfig.{sect} must be a {klass.__name__}, got "
                   f"{type(getattr(self, sect)).__name__} (RunConfig.from_dict reads a dict)")
        _check(isinstance(self.variant, str) and bool(self.variant), f"variant must be a name, got {self.variant!r}")
        _check(not (self.paper_awp and self.train.group_by_length == "on"),
               "paper-mode AWP takes its ascent step on a logical batch's first physical batch, which grouping by "
               "length would make its shortest sentences: use --group-by-length auto or off")
        bb = self.blackbox
        if not bb.active:
            return
        _check(self.train.sharpness_every == 0,
               "the sharpness trajectory (--sharpness-every) needs white-box access to the Hessian of the prefix; "
               "the black-box path has none: leave it out")
        _check(not (self.flat.awp or self.flat.layers),
               "black-box runs support only cross-model flattening (--distill): --awp and --layers need "
               "white-box access to the prefix layers")
        _check(not (self.privacy.enabled and not self.privacy.poisson),
               "black-box DP needs Poisson sampling (--poisson): the accountant assumes it")
        _check(not (bb.zo_optimizer == "cma" and self.privacy.enabled),
               "zo_optimizer cma is non-private only (CMA-ES has no per-example clipping); use sgd or adam with DP")
        _check(not (bb.zo_optimizer == "cma" and self.flat.distill),
               "zo_optimizer cma does not take the distillation term; use sgd or adam with --distill")

    @property
    def paper_awp(self) -> bool:
        return self.flat.awp and self.flat.awp_mode == "paper"

    @property
    def grouped(self) -> bool:
        """Whether training cuts its logical batches by length (``train.group_by_length`` resolved)."""
        return self.train.group_by_length == "on" or (self.train.group_by_length == "auto" and not self.paper_awp)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.blackbox == BlackBoxConfig():  # white-box configs (and their run ids) stay as before
            d.pop("blackbox")
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "RunConfig":
        """A config from its JSON form; misspelt sections or fields and wrong types are refused by name."""
        _check(isinstance(d, dict), f"a run config must be a JSON object with the sections "
                                    f"{', '.join(SECTIONS)}, got a {type(d).__name__}")
        unknown = [k for k in d if k not in SECTIONS and k != "variant"]
        if unknown:
            raise UnknownName(f"unknown config section {_unknown(unknown, [*SECTIONS, 'variant'])}",
                              f"section {unknown[0]!r}")
        kwargs: dict[str, Any] = {}
        for sect, klass in SECTIONS.items():
            sub = d.get(sect, {})
            _check(isinstance(sub, dict), f"config section {sect} must be an object of fields, got {sub!r}")
            known = [f.name for f in fields(klass)]
            unknown = [k for k in sub if k not in known]
            if unknown:
                raise UnknownName(f"unknown {sect} field {_unknown(unknown, known)}", f"{sect}.{unknown[0]}")
            kwargs[sect] = klass(**sub)
        if "variant" in d:
            _check(isinstance(d["variant"], str) and bool(d["variant"]), f"variant must be a name, got {d['variant']!r}")
            kwargs["variant"] = d["variant"]
        return cls(**kwargs)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        """Read a JSON config file; every way it can be unreadable is one line naming the file."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except IsADirectoryError:
            raise ConfigError(f"{p} is a folder, not a JSON config file") from None
        except FileNotFoundError:
            raise ConfigError(f"{p} does not exist") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{p} is not UTF-8 text: is it a JSON config file?") from None
        except OSError as e:
            raise ConfigError(f"cannot read {p}: {e.strerror}") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        try:
            return cls.from_dict(d)
        except UnknownName as e:  # kept apart: a run folder's reader says "written by a newer dpflat"
            raise UnknownName(f"{p}: {e}", e.name) from None
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
        except TypeError as e:  # pragma: no cover - a bug of ours, never of the file
            raise ConfigError(f"{p}: {e}") from None

    def replace(self, **sections: dict[str, Any]) -> "RunConfig":
        """Copy with some fields of some sections changed: ``cfg.replace(privacy={"epsilon": 3})``."""
        d = self.to_dict()
        for sect, changes in sections.items():
            if sect == "variant":
                d["variant"] = changes
            else:
                d.setdefault(sect, {}).update(changes)  # "blackbox" is absent from white-box dicts
        return RunConfig.from_dict(d)


RunConfig.__setattr__ = RunConfig.__delattr__ = _frozen("run")


def as_run_config(cfg: Any) -> RunConfig:
    """The run config an entry point was given: a ``RunConfig``, or its dict form (validated by name).

    Why: ``train({"privacy": {...}})`` died with an AttributeError deep inside; anything else is
    one line that says what is expected.
    """
    if isinstance(cfg, RunConfig):
        return cfg
    if isinstance(cfg, dict):
        return RunConfig.from_dict(cfg)
    raise ConfigError(f"a run needs a RunConfig (or its dict form), got a {type(cfg).__name__}")


def _unknown(names: list[str], known: list[str]) -> str:
    """``'privac' (did you mean 'privacy'?; known: ...)``: the first unknown name and the way out."""
    name = str(names[0])
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"
    more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
    return f"{name!r}{more}: {hint}"


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "privacy": PrivacyConfig,
    "flat": FlatConfig,
    "train": TrainConfig,
    "blackbox": BlackBoxConfig,
}


def non_identity_fields() -> dict[str, tuple[str, ...]]:
    """Per section, the fields marked ``identity=False`` (the one list of them)."""
    return {name: tuple(f.name for f in fields(klass) if not f.metadata.get("identity", True))
            for name, klass in SECTIONS.items()}


def identity_dict(d: dict[str, Any]) -> dict[str, Any]:
    """A config's JSON form (``RunConfig.to_dict``) without its non-identity fields: what run
    ids hash and what two configs of one run folder must agree on."""
    d = json.loads(json.dumps(d))
    for sect, names in non_identity_fields().items():
        for k in names:
            if isinstance(d.get(sect), dict):
                d[sect].pop(k, None)
    for sect, klass in SECTIONS.items():  # fields added later: only a value other than the default counts
        for f in fields(klass):
            if f.metadata.get("identity") == WHEN_SET and isinstance(d.get(sect), dict) \
                    and f.name in d[sect] and d[sect][f.name] == f.default:
                d[sect].pop(f.name)
    return d



# --------------------------------------------------------------------------- variants
VARIANTS: dict[str, dict[str, Any]] = {
    "nonprivate": {"privacy": {"enabled": False}, "flat": {}},
    "dp": {"privacy": {"enabled": True}, "flat": {}},
    "dp+awp": {"privacy": {"enabled": True}, "flat": {"awp": True}},
    "dp+layers": {"privacy": {"enabled": True}, "flat": {"layers": True}},
    "dp+distill": {"privacy": {"enabled": True}, "flat": {"distill": True}},
    "dpflat": {"privacy": {"enabled": True}, "flat": {"awp": True, "layers": True, "distill": True}},
    # black-box DP-Flat (dpflat/blackbox/): forward queries only; cross-model flattening (distill)
    # pulls z toward a teacher prompt with weight blackbox.prompt_lambda
    "bb-nonprivate": {"privacy": {"enabled": False}, "flat": {}, "blackbox": {"active": True}},
    "bb-dp": {"privacy": {"enabled": True}, "flat": {}, "blackbox": {"active": True}},
    "bb-dpflat": {"privacy": {"enabled": True}, "flat": {"distill": True}, "blackbox": {"active": True}},
}
#: variants without flattening: their name carries no mode, and sweeps run them once per ε
NO_MODE_VARIANTS = ("nonprivate", "dp", "bb-nonprivate", "bb-dp")
#: variants whose result does not depend on ε (one run per seed in a sweep)
NONPRIVATE_VARIANTS = ("nonprivate", "bb-nonprivate")
MODES = ("safe", "paper")
# The authors' AWP perturbation size; our safe mode perturbs along a noisy gradient,
# whose direction is far less aligned with the true ascent, so it uses a larger gamma.
PAPER_AWP_GAMMA = 1e-4


def variant_name(variant: str, mode: str) -> str:
    """Display name: flattening variants carry their mode ("dpflat-paper")."""
    return variant if variant in NO_MODE_VARIANTS else f"{variant}-{mode}"


def levels_names(cfg: RunConfig) -> set[str]:
    """The variant names that describe what ``cfg`` computes (``variant_name`` style, as the ablation
    panel names its mixes: ``dp+awp.safe+layers.paper`` when the levels' modes differ).

    Two when hand-picked layers (``model.keep_layers``, as ``--preset paper`` sets them) stand in
    for the cross-layer level: with and without it.
    """
    fc = cfg.flat
    out = set()
    for hand_picked in {False, cfg.model.keep_layers is not None}:
        on = [lv for lv in ("awp", "layers", "distill") if getattr(fc, lv) or (lv == "layers" and hand_picked)]
        modes = {lv: getattr(fc, f"{lv}_mode") for lv in on}
        if cfg.blackbox.active:  # only distillation runs there (RunConfig refuses the others)
            if not fc.distill:
                out.add("bb-dp" if cfg.privacy.enabled else "bb-nonprivate")
            else:
                out.add(("bb-dpflat" if cfg.privacy.enabled else "bb-nonprivate+distill") + f"-{fc.distill_mode}")
            continue
        base = "dp" if cfg.privacy.enabled else "nonprivate"
        if not on:
            out.add(base)
        elif len(set(modes.values())) > 1:
            out.add(base + "+" + "+".join(f"{lv}.{modes[lv]}" for lv in on))
        else:
            mode = modes[on[0]]
            out.add(("dpflat" if len(on) == 3 and cfg.privacy.enabled else base + "+" + "+".join(on)) + f"-{mode}")
    return out


def check_variant(cfg: RunConfig) -> None:
    """A run's variant name must say what it computes: it goes into the run id and the results table.

    ``custom`` names any config. Any other name (settings suffixes after ``_`` aside, as the
    ablation panel appends them) must be one of :func:`levels_names`: ``{"variant": "dpflat"}`` over
    a plain DP config, or ``"nope"``, is refused. The command line checks every run it trains (a
    ``--config`` file's variant, or ``--variant`` with flags that switch its levels); not part of
    ``RunConfig``'s own validation, so a config.json of an older run still reads.
    """
    if cfg.variant == "custom":
        return
    names = levels_names(cfg)
    if cfg.variant.split("_", 1)[0] in names:
        return
    if cfg.variant not in {*VARIANTS, *(variant_name(v, m) for v in VARIANTS for m in MODES)}:
        raise ConfigError(f"unknown variant {cfg.variant!r}: a preset name ({', '.join(VARIANTS)}; flattening ones "
                          "with -safe or -paper) or custom")
    raise ConfigError(f"variant {cfg.variant!r} does not describe this config (its levels make it "
                      f"{' or '.join(sorted(names))}): use --variant to set a preset's levels, or name it custom")


def apply_variant(cfg: RunConfig, variant: str, mode: str = "safe") -> RunConfig:
    """A copy of ``cfg`` switched to a named variant, every level in ``mode``."""
    _check(variant in VARIANTS, f"unknown variant {variant!r}; choose one of: {', '.join(VARIANTS)}")
    _check(mode in MODES, f"mode must be safe|paper, got {mode!r}")
    preset = VARIANTS[variant]
    flat = {"awp": False, "layers": False, "distill": False, **preset["flat"]}
    flat.update({"awp_mode": mode, "layers_mode": mode, "distill_mode": mode})
    if mode == "paper" and flat["awp"]:
        flat["awp_gamma"] = PAPER_AWP_GAMMA
    blackbox = {"active": False, **preset.get("blackbox", {})}
    # the sharpness trajectory needs the white-box Hessian: a black-box variant of a base that records
    # one (the notebooks' sizes) turns it off rather than carry a setting that does nothing
    train = {"sharpness_every": 0} if blackbox["active"] else {}
    return cfg.replace(privacy=preset["privacy"], flat=flat, blackbox=blackbox, train=train,
                       variant=variant_name(variant, mode))


# --------------------------------------------------------------------------- presets
PRESETS = ("paper",)
#: The authors' hand-picked *dropped* prefix layers for roberta-base (12 layers), per task:
#: ``sparse_list`` in tiejin98/Privacy_Flatness run_classification_pretuning_final.py.
PAPER_DROPPED_LAYERS: dict[str, tuple[int, ...]] = {"sst2": (11, 5, 10), "qnli": (11, 10, 9), "qqp": (11, 10, 9)}
PAPER_DROPPED_OTHER = (1, 4, 9)
PAPER_N_LAYERS = 12
#: Each value of ``--preset paper`` and where it comes from (docs/PROTOCOL.md has the table).
#: R = the authors' repo tiejin98/Privacy_Flatness (README commands; classification/
#: run_wrapper_pretuning_final.py = W; run_classification_pretuning_final.py = F), P = the
#: paper (Chen et al., arXiv 2403.04124).
PAPER_PRESET: dict[str, dict[str, Any]] = {
    "model": {
        "backbone": "roberta-base",  # R README: --model_name_or_path roberta-base
        "prefix_len": 50,  # F: PrefixTuningConfig(num_virtual_tokens=50)
        "head": "prompt",  # W/README: --few_shot_type prompt (LM-BFF templates, label words per task: F)
        "template": None,  # None: the task's template (W's template table; dpflat.tokens.PROMPTS)
        "label_words": None,  # None: the task's label words (F's mapping; dpflat.tokens.PROMPTS)
    },
    "data": {"max_length": 256, "train_size": None},  # W: --max_seq_len 256; the full training file
    "privacy": {"max_grad_norm": 0.1},  # W: --per_example_max_grad_norm 0.1
    "train": {"batch_size": 1024, "epochs": 30.0, "lr": 5e-5,  # README: --batch_size 1024 --num_train_epochs 30
              "optimizer": "adamw", "weight_decay": 0.0},  # --learning_rate 5e-5; F: AdamW; W: weight_decay 0
    "flat": {"awp_gamma": 1e-4,  # F: AdvWeightPerturb(gamma=1e-4)
             "awp_epochs": 15.0,  # P / F's Trainer_awp: AWP during the first half (15 of 30 epochs)
             "distill_lambda": 0.01, "distill_squared": False,  # F: trainer.train(emb=..., lamb=0.01), ||.||
             "teacher_epochs": 10.0,  # README: the non-private teacher run, --num_train_epochs 10
             "teacher_patience": 0, "teacher_batch_size": 1024},  # all 10 epochs, at the run's batch size
}


def paper_keep_layers(task: str, n_layers: int = PAPER_N_LAYERS) -> str:
    """The complement of the authors' dropped layers for ``task`` (as ``--keep-layers``)."""
    drop = PAPER_DROPPED_LAYERS.get(task, PAPER_DROPPED_OTHER)
    return ",".join(str(i) for i in range(n_layers) if i not in drop)


def apply_preset(cfg: RunConfig, name: str, choose_variant: bool = True) -> RunConfig:
    """A copy of ``cfg`` with a named preset's values; ``paper`` = the authors' protocol.

    Without a variant (``cfg.variant == "custom"``) the preset is the authors' DP-Flat:
    variant dpflat in paper mode (``choose_variant=False``, as for a sweep's base config,
    leaves the variant alone). With one, the variant decides which levels run and the
    preset gives their values. Where the cross-layer level is on, the authors' hand-picked
    layers for roberta-base (``paper_keep_layers``) replace our selector. Explicit flags
    given after the preset (the CLI applies them last) override any of these values.
    """
    _check(name in PRESETS, f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    if cfg.variant == "custom" and choose_variant:
        cfg = apply_variant(cfg, "dpflat", "paper")
    sections = {k: dict(v) for k, v in PAPER_PRESET.items()}
    if cfg.flat.layers:
        sections["model"]["keep_layers"] = paper_keep_layers(cfg.data.task)
        sections["flat"]["layers"] = False
    return cfg.replace(**sections)


__all__ = [
    "PRESETS",
    "PAPER_PRESET",
    "apply_preset",
    "paper_keep_layers",
    "ConfigError",
    "check_device",
    "check_run_name",
    "field_types",
    "split_optional",
    "DataConfig",
    "ModelConfig",
    "PrivacyConfig",
    "FlatConfig",
    "TrainConfig",
    "BlackBoxConfig",
    "RunConfig",
    "SECTIONS",
    "VARIANTS",
    "MODES",
    "NO_MODE_VARIANTS",
    "NONPRIVATE_VARIANTS",
    "apply_variant",
    "as_run_config",
    "check_variant",
    "levels_names",
    "variant_name",
    "FrozenConfigError",
    "MAX_GRID",
    "UnknownName",
]
