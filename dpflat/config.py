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
    val_size: int = field(default=500, metadata={"help": "rows of the train file held out as the validation "
                                                          "split (checkpoint selection reads only it; the eval "
                                                          "file is the test split, read once at the end)"})

    def __post_init__(self) -> None:
        _check(isinstance(self.task, str) and bool(self.task), "task must be a non-empty name")
        _check(isinstance(self.val_size, int) and not isinstance(self.val_size, bool) and self.val_size >= 1,
               f"val_size must be a whole number >= 1, got {self.val_size!r}")
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
    head: Literal["linear", "prompt"] = field(
        default="linear", metadata={"help": "linear: pooled hidden state -> linear layer; prompt: LM-BFF style, "
                                            "the masked-LM head's logits of the label words at the template's "
                                            "mask (BERT/RoBERTa with an MLM head)"})
    template: str | None = field(
        default=None, metadata={"help": "prompt head: LM-BFF template, e.g. *cls**sent_0*_It_was*mask*.*sep+* "
                                        "(None: the task's default, docs/PROTOCOL.md)"})
    label_words: str | None = field(
        default=None, metadata={"help": "prompt head: one word per class, comma-separated in class order, "
                                        "e.g. terrible,great (None: the task's default)"})

    def __post_init__(self) -> None:
        _check(bool(self.backbone), "backbone must be given")
        _check(self.head in ("linear", "prompt"), f"head must be linear|prompt, got {self.head}")
        if self.template is not None:
            _check("*mask*" in self.template and "*sent_0*" in self.template,
                   f"template must contain *mask* and *sent_0*, got {self.template!r}")
        if self.label_words is not None:
            words = [w.strip() for w in str(self.label_words).split(",")]
            _check(len(words) >= 2 and all(words), f"label_words must be >= 2 comma-separated words, got {self.label_words!r}")
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
        "template": None,  # None: the task's template (W's template table; dpflat.data.PROMPTS)
        "label_words": None,  # None: the task's label words (F's mapping; dpflat.data.PROMPTS)
    },
    "data": {"max_length": 256, "train_size": None},  # W: --max_seq_len 256; the full training file
    "privacy": {"max_grad_norm": 0.1},  # W: --per_example_max_grad_norm 0.1
    "train": {"batch_size": 1024, "epochs": 30.0, "lr": 5e-5,  # README: --batch_size 1024 --num_train_epochs 30
              "optimizer": "adamw", "weight_decay": 0.0},  # --learning_rate 5e-5; F: AdamW; W: weight_decay 0
    "flat": {"awp_gamma": 1e-4,  # F: AdvWeightPerturb(gamma=1e-4)
             "awp_epochs": 15.0,  # P / F's Trainer_awp: AWP during the first half (15 of 30 epochs)
             "distill_lambda": 0.01, "distill_squared": False,  # F: trainer.train(emb=..., lamb=0.01), ||.||
             "teacher_epochs": 10.0},  # README: the non-private teacher run, --num_train_epochs 10
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
