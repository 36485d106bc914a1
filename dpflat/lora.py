"""LoRA as a second trainable family (``--peft lora``), through the ``peft`` library.

Low-rank adapters ``W + (alpha / r) B A`` on each layer's attention projections (peft's default
targets for the architecture: BERT/RoBERTa ``query, value``; Llama/Qwen2 ``q_proj, v_proj``;
GPT-2 ``c_attn``), injected in place into the frozen backbone (``peft.inject_adapter_in_model``,
so the backbone keeps its type and our registered attention function). ``B`` starts at zero, so
the model starts as the pretrained one (for a decoder with its label-word head: the zero-shot
prompt). The adapters' ``lora_A`` / ``lora_B`` are plain ``nn.Linear`` modules: Opacus computes
their per-example gradients natively (hooks or ghost clipping), as in its LoRA tutorial.

The prefix model's keep-mask is the adapters' switch: a layer whose mask is off runs its
projections without the adapter (peft's ``disable_adapters``: the adapter is not computed,
so it is exactly absent), and ``keep_layers`` puts adapters on the named layers only.
The three flattening levels act on adapters: AWP on each layer's adapter weights
(``flat/awp_lora.py``); the layer selector, which chooses the layers that keep their adapters
(``flat/layers.py`` scores its indicator over the adapter weights, :func:`scored_params`; the
dropped layers' adapters are switched off and frozen, :func:`train_kept`); distillation toward a
teacher's adapters (``flat/distill_lora.py``: a decoupled pull after each step, not a term inside
the clipping -- see there why).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .config import ConfigError, ModelConfig


def target_names(backbone: nn.Module) -> list[str]:
    """peft's default LoRA targets for the backbone's architecture."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as TARGETS

    mt = backbone.config.model_type
    if mt not in TARGETS:
        raise ConfigError(f"--peft lora: peft has no default target modules for model type {mt!r}")
    return list(TARGETS[mt])


def inject(backbone: nn.Module, attn_layers: Sequence[nn.Module], cfg: ModelConfig,
           keep: Sequence[bool]) -> list[list[nn.Module]]:
    """Adapters on the attention projections of the kept layers; returns each layer's LoRA modules
    (empty for a layer without adapters). Only the adapters' weights require gradients."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer
    except ImportError as e:  # pragma: no cover - a project dependency
        raise ConfigError("--peft lora needs the peft package (pip install peft)") from e
    names = target_names(backbone)
    targets = []
    by_layer: dict[int, str] = {}
    prefix_of = {id(m): None for m in attn_layers}
    for n, m in backbone.named_modules():
        if id(m) in prefix_of:
            prefix_of[id(m)] = n
    for l, att in enumerate(attn_layers):
        base = prefix_of[id(att)]
        by_layer[l] = base
        if not keep[l]:
            continue
        for n, _ in att.named_modules():
            if n and n.split(".")[-1] in names:
                targets.append(f"{base}.{n}")
    if not targets:
        raise ConfigError(f"--peft lora: none of {names} found in the attention layers of {type(backbone).__name__}")
    conf = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, bias="none",
                      target_modules=targets, fan_in_fan_out=backbone.config.model_type == "gpt2")
    inject_adapter_in_model(conf, backbone)
    for p in backbone.parameters():
        p.requires_grad_(False)
    layers: list[list[nn.Module]] = []
    for l, att in enumerate(attn_layers):
        mods = [m for m in att.modules() if isinstance(m, LoraLayer)]
        for m in mods:
            for p in list(m.lora_A.parameters()) + list(m.lora_B.parameters()):
                p.requires_grad_(True)
        layers.append(mods)
    return layers


def switch(layers: list[list[nn.Module]], keep: torch.Tensor) -> None:
    """Adapters on for the kept layers, off (not computed) for the others. Not peft's
    ``enable_adapters``: that also flips ``requires_grad``, which would change the parameter set
    Opacus was given."""
    for mods, k in zip(layers, keep.tolist()):
        for m in mods:
            m._disable_adapters = not k


def train_mode(layers: list[list[nn.Module]]) -> None:
    """The adapters' own modules in training mode inside a backbone left in evaluation mode: Opacus
    records activations (per-example gradients) only of modules in training mode. Their dropout is
    0, so nothing else changes."""
    for mods in layers:
        for m in mods:
            m.lora_A.train()
            m.lora_B.train()


def scored_params(model: nn.Module) -> list[str]:
    """The parameters the cross-layer indicator moves: the prefix, or under LoRA every adapter weight."""
    if getattr(model, "adapters", None) is None:
        return ["prefix.embedding.weight"]
    return [n for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def train_kept(model: nn.Module) -> None:
    """Under LoRA, the adapters of the layers the keep-mask keeps train, the others are frozen (a
    switched-off adapter gets no gradient, and Opacus wants one per-example gradient for every
    parameter it is given). Nothing happens for a prefix model."""
    if getattr(model, "adapters", None) is None:
        return
    for mods, k in zip(model.adapters, model.prefix.keep_mask.tolist()):
        for m in mods:
            for p in (*m.lora_A.parameters(), *m.lora_B.parameters()):
                p.requires_grad_(bool(k))


def check_run(cfg) -> None:
    """What ``--peft lora`` does not do yet, refused in one line before any work."""
    if cfg.model.peft != "lora":
        return
    if getattr(cfg, "blackbox", None) is not None and cfg.blackbox.active:
        raise ConfigError("--peft lora trains adapters by gradients: the black-box (bb-*) variants tune a soft prompt")


__all__ = ["check_run", "inject", "scored_params", "switch", "target_names", "train_kept", "train_mode"]
