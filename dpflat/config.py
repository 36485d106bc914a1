"""Run configuration: one validated dataclass per concern.

Every field is also a CLI flag (see ``cli.py``), so a bad value must fail here, at
construction, with one clear line (``ConfigError``) rather than deep inside a run.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A bad configuration value; its message is one line the CLI prints as-is."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class DataConfig:
    """Which task, where its files are, and how to split/subsample it."""

    task: str = "sst2"
    data_dir: str | None = None  # explicit dir; else $DPFLAT_DATA_DIR, data/, then the hub
    max_length: int = 64  # tokens per example (padding and truncation)
    # CPU-sized defaults (minutes on 2 cores); the README gives the GPU-scale values
    train_size: int | None = 2000  # subsample the private split (None: all of it)
    eval_size: int | None = None  # subsample the eval split
    public_size: float = 500  # fraction (<1) or count (>=1) of train carved out as public
    cache_dir: str | None = None  # tokenisation cache; None = in-process only

    def __post_init__(self) -> None:
        _check(isinstance(self.task, str) and bool(self.task), "task must be a non-empty name")
        _check(8 <= self.max_length <= 4096, f"max_length must be in [8, 4096], got {self.max_length}")
        for name in ("train_size", "eval_size"):
            if getattr(self, name) == 0:  # the CLI's way to say "all of it"
                setattr(self, name, None)
            v = getattr(self, name)
            _check(v is None or v >= 1, f"{name} must be >= 1 when given, got {v}")
        _check(self.public_size >= 0, f"public_size must be >= 0, got {self.public_size}")
        if self.public_size >= 1:
            _check(float(self.public_size).is_integer(), "public_size >= 1 must be a whole count")


@dataclass
class ModelConfig:
    """Backbone and the trainable prefix + head on top of it."""

    backbone: str = "minilm"  # "minilm" (shipped), "tiny-bert", "tiny-roberta", a local dir or hub id
    prefix_len: int = 16  # m: key/value prefix length per layer
    prefix_init: Literal["random", "tokens"] = "tokens"
    pooling: Literal["mean", "cls"] = "mean"
    head_dropout: float = 0.1
    attn: Literal["sdpa", "eager"] = "sdpa"  # eager is needed for double backward (Hessians) on CPU
    keep_layers: str | None = None  # e.g. "0,2,5": layers that keep a prefix; None = all

    def __post_init__(self) -> None:
        _check(bool(self.backbone), "backbone must be given")
        _check(1 <= self.prefix_len <= 512, f"prefix_len must be in [1, 512], got {self.prefix_len}")
        _check(self.prefix_init in ("random", "tokens"), f"prefix_init must be random|tokens, got {self.prefix_init}")
        _check(self.pooling in ("mean", "cls"), f"pooling must be mean|cls, got {self.pooling}")
        _check(0.0 <= self.head_dropout < 1.0, f"head_dropout must be in [0, 1), got {self.head_dropout}")
        _check(self.attn in ("sdpa", "eager"), f"attn must be sdpa|eager, got {self.attn}")
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
        return ids


@dataclass
class PrivacyConfig:
    """DP-SGD settings. ``enabled=False`` runs the same loop without clipping or noise."""

    enabled: bool = True
    epsilon: float = 8.0
    delta: float | None = None  # None: 1 / N^1.1 for N private examples
    max_grad_norm: float = 1.0  # C: per-example clip
    accountant: Literal["rdp", "prv"] = "rdp"
    # hooks: per-example gradients by module hooks (the fastest here: a prefix's per-example
    # gradient is small); ghost: Opacus' ghost clipping (per-example norms without
    # per-example gradients, two backward passes); functorch: vmap'd per-example gradients
    grad_sample_mode: Literal["hooks", "ghost", "functorch"] = "hooks"
    poisson: bool = True

    def __post_init__(self) -> None:
        if self.enabled:
            _check(
                isinstance(self.epsilon, (int, float)) and math.isfinite(self.epsilon) and self.epsilon > 0,
                f"epsilon must be > 0, got {self.epsilon}",
            )
            _check(self.delta is None or 0 < self.delta < 1, f"delta must be in (0, 1), got {self.delta}")
        _check(self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        _check(self.accountant in ("rdp", "prv"), f"accountant must be rdp|prv, got {self.accountant}")
        _check(
            self.grad_sample_mode in ("hooks", "ghost", "functorch"),
            f"grad_sample_mode must be hooks|ghost|functorch, got {self.grad_sample_mode}",
        )

    def resolve_delta(self, n_private: int) -> float:
        """δ = 1/N^1.1 by default: smaller than 1/N, the usual rule of thumb."""
        return self.delta if self.delta is not None else 1.0 / (n_private**1.1)


Mode = Literal["safe", "paper"]


@dataclass
class FlatConfig:
    """The three flattening levels, each on/off with its mode (see DESIGN.md)."""

    awp: bool = False
    awp_mode: Mode = "safe"
    awp_gamma: float = 0.01  # relative perturbation size per layer (paper mode default: 1e-4)
    awp_epochs: float = 0.5  # fraction (<1) of training or a number of epochs of warm-up with AWP
    awp_proxy_lr: float = 0.01  # paper mode: ascent step size on the proxy copy
    layers: bool = False
    layers_mode: Mode = "safe"
    n_drop: int = 2
    layers_rho: float = 0.05
    layers_directions: int = 3  # random directions besides the gradient one
    layers_warmup_steps: int = 30  # non-private prefix warm-up before scoring (on allowed data)
    layers_examples: int = 128  # fixed subset the indicator is evaluated on
    layers_stop_early: bool = False  # stop dropping when S no longer decreases
    distill: bool = False
    distill_mode: Mode = "safe"
    distill_lambda: float = 0.01
    distill_squared: bool = False
    teacher_epochs: float = 1.0

    def __post_init__(self) -> None:
        for name in ("awp_mode", "layers_mode", "distill_mode"):
            _check(getattr(self, name) in ("safe", "paper"), f"{name} must be safe|paper, got {getattr(self, name)}")
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


@dataclass
class TrainConfig:
    """Optimisation, evaluation, checkpoints and where the run goes."""

    epochs: float = 2.0
    batch_size: int = 128  # logical (expected) batch size; q = batch_size / N
    physical_batch_size: int = 64  # what fits in memory (BatchMemoryManager)
    lr: float = 2e-2
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = 0.0
    eval_every: int = 0  # steps; 0 = once per epoch
    eval_batch_size: int = 256
    checkpoint_every: int = 20  # steps
    seed: int = 0
    device: str = "cpu"
    output_dir: str = "runs"
    run_name: str | None = None  # default: derived from the config
    num_threads: int | None = None
    progress: bool = True
    # matmul precision of forward/backward: auto = bf16 autocast on a CUDA GPU that has it
    # (the frozen backbone dominates the cost; tensor cores), fp32 elsewhere. Clipping, noise,
    # the optimizer and the trainable weights stay fp32 in every case.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # diagnostics (dpflat/flat/trajectory.py): sharpness over time, never on the private split
    sharpness_every: int = field(default=0, metadata={"help": "record the top Hessian eigenvalue and SAM "
                                 "sharpness every N steps into sharpness.jsonl (0: off; a diagnostic)"})
    sharpness_data: Literal["public", "eval"] = field(default="public", metadata={"help": "split the sharpness "
                                                      "trajectory is measured on (never the private split)"})
    sharpness_examples: int = field(default=64, metadata={"help": "examples behind each trajectory point"})

    def __post_init__(self) -> None:
        _check(self.epochs > 0, f"epochs must be > 0, got {self.epochs}")
        _check(self.precision in ("auto", "fp32", "bf16"), f"precision must be auto|fp32|bf16, got {self.precision}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(self.physical_batch_size >= 1, f"physical_batch_size must be >= 1, got {self.physical_batch_size}")
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(self.optimizer in ("adamw", "sgd"), f"optimizer must be adamw|sgd, got {self.optimizer}")
        _check(self.eval_every >= 0, f"eval_every must be >= 0, got {self.eval_every}")
        _check(self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        _check(self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        dev = str(self.device)
        _check(
            dev == "cpu" or dev == "mps" or dev.startswith("cuda"),
            f"device must be cpu, cuda[:N] or mps, got {self.device}",
        )
        _check(self.sharpness_every >= 0, f"sharpness_every must be >= 0, got {self.sharpness_every}")
        _check(self.sharpness_data in ("public", "eval"),
               f"sharpness_data must be public|eval (never the private split), got {self.sharpness_data}")
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


@dataclass
class BlackBoxConfig:
    """Black-box DP-Flat (``dpflat/blackbox.py``): a soft prompt tuned from forward queries only.

    An all-default section (every white-box run) is left out of ``config.json`` and of
    the run id, so white-box run folders are unchanged by its existence.
    """

    active: bool = False  # the black-box path: z -> prompt, zeroth-order (SPSA / DPZero) updates
    prompt_tokens: int = 8  # soft prompt length (tokens prepended after [CLS])
    prompt_dim: int = 50  # d: dimension of z (fixed random projection A: R^d -> tokens x hidden)
    proj_scale: float = 1.0  # per-coordinate std of A z for ||z||^2 = d, in units of the word embeddings' std
    zo_mu: float = 0.5  # SPSA smoothing: losses at z +- mu * u, u ~ N(0, I_d)
    zo_lr: float = 0.1  # step size on z
    # adam: steadier than DPZero's plain SGD at the few hundred steps a CPU affords (post-processing:
    # the privacy cost is the same); sgd (momentum 0.9); cma (CMA-ES, non-private only)
    zo_optimizer: ZOOptimizer = "adam"
    zo_directions: int = 1  # random directions per step (k scalars per example, clipped jointly)
    readout_template: str | None = None  # label description, e.g. "a {} review"; None: per-task default
    readout_scale: float = 20.0  # logits = scale * cos(embedding, label-description embedding)
    readout_bias: bool = True  # z also carries a per-class logit bias of the readout (K numbers, tuned by ZO)
    prompt_lambda: float = 0.05  # with --distill: λ of λ||z - z_teacher|| (prompt-space --distill-lambda)

    def __post_init__(self) -> None:
        _check(1 <= self.prompt_tokens <= 256, f"prompt_tokens must be in [1, 256], got {self.prompt_tokens}")
        _check(1 <= self.prompt_dim <= 100_000, f"prompt_dim must be in [1, 100000], got {self.prompt_dim}")
        _check(self.proj_scale > 0, f"proj_scale must be > 0, got {self.proj_scale}")
        _check(self.zo_mu > 0, f"zo_mu must be > 0, got {self.zo_mu}")
        _check(self.zo_lr > 0, f"zo_lr must be > 0, got {self.zo_lr}")
        _check(self.zo_optimizer in ("sgd", "adam", "cma"), f"zo_optimizer must be sgd|adam|cma, got {self.zo_optimizer}")
        _check(1 <= self.zo_directions <= 64, f"zo_directions must be in [1, 64], got {self.zo_directions}")
        _check(self.readout_scale > 0, f"readout_scale must be > 0, got {self.readout_scale}")
        _check(self.prompt_lambda >= 0, f"prompt_lambda must be >= 0, got {self.prompt_lambda}")
        if self.readout_template is not None:
            _check("{}" in self.readout_template,
                   f"readout_template must contain {{}} for the label name, got {self.readout_template!r}")


@dataclass
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
        bb = self.blackbox
        if not bb.active:
            return
        _check(not (self.flat.awp or self.flat.layers),
               "black-box runs support only cross-model flattening (--distill): --awp and --layers need "
               "white-box access to the prefix layers")
        _check(not (self.privacy.enabled and not self.privacy.poisson),
               "black-box DP needs Poisson sampling (--poisson): the accountant assumes it")
        _check(not (bb.zo_optimizer == "cma" and self.privacy.enabled),
               "zo_optimizer cma is non-private only (CMA-ES has no per-example clipping); use sgd or adam with DP")
        _check(not (bb.zo_optimizer == "cma" and self.flat.distill),
               "zo_optimizer cma does not take the distillation term; use sgd or adam with --distill")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.blackbox == BlackBoxConfig():  # white-box configs (and their run ids) stay as before
            d.pop("blackbox")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        kwargs: dict[str, Any] = {}
        for sect, klass in SECTIONS.items():
            sub = dict(d.get(sect, {}))
            known = {f.name for f in fields(klass)}
            unknown = set(sub) - known
            _check(not unknown, f"unknown {sect} fields: {sorted(unknown)}")
            kwargs[sect] = klass(**sub)
        if "variant" in d:
            kwargs["variant"] = d["variant"]
        return cls(**kwargs)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def replace(self, **sections: dict[str, Any]) -> "RunConfig":
        """Copy with some fields of some sections changed: ``cfg.replace(privacy={"epsilon": 3})``."""
        d = self.to_dict()
        for sect, changes in sections.items():
            if sect == "variant":
                d["variant"] = changes
            else:
                d.setdefault(sect, {}).update(changes)  # "blackbox" is absent from white-box dicts
        return RunConfig.from_dict(d)


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "privacy": PrivacyConfig,
    "flat": FlatConfig,
    "train": TrainConfig,
    "blackbox": BlackBoxConfig,
}



# --------------------------------------------------------------------------- variants
VARIANTS: dict[str, dict[str, Any]] = {
    "nonprivate": {"privacy": {"enabled": False}, "flat": {}},
    "dp": {"privacy": {"enabled": True}, "flat": {}},
    "dp+awp": {"privacy": {"enabled": True}, "flat": {"awp": True}},
    "dp+layers": {"privacy": {"enabled": True}, "flat": {"layers": True}},
    "dp+distill": {"privacy": {"enabled": True}, "flat": {"distill": True}},
    "dpflat": {"privacy": {"enabled": True}, "flat": {"awp": True, "layers": True, "distill": True}},
    # black-box DP-Flat (dpflat/blackbox.py): forward queries only; cross-model flattening (distill)
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
    return cfg.replace(privacy=preset["privacy"], flat=flat, blackbox=blackbox, variant=variant_name(variant, mode))


__all__ = [
    "ConfigError",
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
    "variant_name",
]
