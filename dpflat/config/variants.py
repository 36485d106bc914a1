"""Named variants (which levels run, in which mode) and the authors' preset (``--preset paper``)."""

from __future__ import annotations

from typing import Any

from ._fields import ConfigError, _check
from .run import RunConfig


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
