"""The sections of a run config, one validated frozen dataclass per concern: data, model, privacy,
the flattening levels, training, the black box."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from ._fields import WHEN_SET, ConfigError, LevelGated, _check, _opt, check_run_name, section


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
    layers_directions: int = _opt(3, "random directions of the indicator besides the gradient one",
                                  identity=LevelGated("layers", legacy=3))
    layers_scorer: Literal["plateau", "plateau-mean", "warmup"] = _opt(
        "plateau", "model the indicator is scored on: plateau = a non-private fit (all layers) to its val plateau "
                   "with the teacher's settings, its best-on-val parameters; plateau-mean = the same fit, the mean "
                   "of its parameters over the plateau (best val evaluation to the stop); warmup = "
                   "--layers-warmup-steps fixed steps (dropout off in all)", identity=LevelGated("layers", legacy="plateau"))
    layers_warmup_steps: int = _opt(30, "with --layers-scorer warmup: non-private steps before scoring (on allowed data)")
    layers_examples: int = _opt(128, "fixed subset the indicator is evaluated on")
    layers_stop_early: bool = _opt(False, "stop dropping when the indicator no longer decreases")
    distill: bool = _opt(False, "cross-model flattening: pull the prefix toward a non-private teacher")
    distill_mode: Mode = _opt("safe", "safe: teacher on public data; paper: teacher on private data (not DP)")
    # 1.0 chosen on val (SST-2, ε=3, seed 0, the study regime: best val 0.866 at λ=1, 0.864 at 0.1, and 0.808 at
    # step 64 of a 0.01 run, the authors' value, where the pull was ~1% of the per-step noise; RESULTS.md)
    distill_lambda: float = _opt(1.0, "weight λ of ||P - P_teacher||")
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
