"""Within-layer flattening for ``--peft lora``: AWP on each layer's adapter weights.

The same rule as the prefix's AWP (``awp.py``), with a layer's adapters (every ``lora_A`` and
``lora_B`` weight of its attention projections) in place of its prefix slice: during the first
``awp_epochs`` the DP gradient is taken at theta + v with, per layer l,
v_l = gamma * ||theta_l|| * d_l / ||d_l||, and theta is restored exactly before the step.

- safe (default): d = the previous step's noisy DP gradient of the adapters (post-processing of
  released noisy gradients: no privacy cost, no extra pass);
- paper: d = the raw gradient of the step's first private micro-batch (NOT accounted).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..evaluate import model_inputs
from .awp import PAPER_HOW, PAPER_WHO, AWP
from .base import TrainContext


def adapter_groups(model) -> list[list[torch.Tensor]]:
    """Each layer's trainable adapter weights (empty for a layer without adapters)."""
    return [[p for m in mods for p in (*m.lora_A.parameters(), *m.lora_B.parameters()) if p.requires_grad]
            for mods in model.adapters]


def perturbation(weights: list[list[torch.Tensor]], directions: list[list[torch.Tensor | None]],
                 gamma: float) -> list[list[torch.Tensor]]:
    """v_l = gamma * ||theta_l|| * d_l / ||d_l|| per layer (zero where d_l is zero or missing)."""
    out = []
    for ws, ds in zip(weights, directions):
        ds = [torch.zeros_like(w) if d is None else d for w, d in zip(ws, ds)]
        wn = torch.sqrt(sum((w.detach().float() ** 2).sum() for w in ws)) if ws else torch.tensor(0.0)
        dn = torch.sqrt(sum((d.float() ** 2).sum() for d in ds)) if ds else torch.tensor(0.0)
        scale = gamma * wn / dn if dn > 0 else torch.tensor(0.0)
        out.append([d * scale.to(d.dtype) for d in ds])
    return out


class LoraAWP(AWP):
    """AWP whose per-layer slices are the layers' adapters (the hook points and state are AWP's)."""

    name = "awp"

    def step_begin(self, ctx: TrainContext, step: int, batch: dict[str, torch.Tensor]) -> None:
        self._v = None
        if step >= self.active_steps(ctx) or self.cfg.awp_gamma == 0:
            return
        groups = adapter_groups(ctx.model)
        d = self._paper_direction(ctx, batch) if self.cfg.awp_mode == "paper" else self.direction
        if d is not None:
            self._v = perturbation(groups, d, self.cfg.awp_gamma)

    def _paper_direction(self, ctx: TrainContext, batch):
        if len(batch["labels"]) == 0:
            return None
        ctx.private.count(PAPER_WHO, PAPER_HOW, accounted=False, examples=len(batch["labels"]))
        groups = adapter_groups(ctx.model)
        flat = [p for g in groups for p in g]
        gsm = ctx.dp.model if ctx.dp is not None else None
        if gsm is not None:
            gsm.disable_hooks()
        try:
            logits = ctx.model(**model_inputs(batch, ctx.device))
            grads = torch.autograd.grad(F.cross_entropy(logits, batch["labels"].to(ctx.device)), flat,
                                        allow_unused=True)
        finally:
            if gsm is not None:
                gsm.enable_hooks()
        out, i = [], 0
        for grp in groups:  # the proxy's SGD ascent displacement, lr * g: g's direction
            out.append([None if grads[i + j] is None else self.cfg.awp_proxy_lr * grads[i + j].detach()
                        for j in range(len(grp))])
            i += len(grp)
        return out

    @torch.no_grad()
    def perturb(self, ctx: TrainContext) -> None:
        if self._v is None:
            return
        groups = adapter_groups(ctx.model)
        self._saved = [[p.detach().clone() for p in g] for g in groups]
        for g, vs in zip(groups, self._v):
            for p, v in zip(g, vs):
                p.add_(v)

    @torch.no_grad()
    def restore(self, ctx: TrainContext) -> None:
        if self._saved is not None:
            for g, saved in zip(adapter_groups(ctx.model), self._saved):
                for p, s in zip(g, saved):
                    p.copy_(s)
            self._saved = None

    def step_end(self, ctx: TrainContext, step: int) -> None:
        if self.cfg.awp_mode == "safe":
            self.direction = [[None if p.grad is None else p.grad.detach().clone() for p in g]
                              for g in adapter_groups(ctx.model)]

    def load_state_dict(self, state: dict[str, Any], ctx: TrainContext) -> None:
        d = state.get("direction")
        self.direction = None if d is None else [[None if t is None else t.to(ctx.device) for t in g] for g in d]

    def load_step_state(self, state: dict[str, Any], ctx: TrainContext) -> None:
        v = state.get("v")
        self._v = None if v is None else [[t.to(ctx.device) for t in g] for g in v]


__all__ = ["LoraAWP", "adapter_groups", "perturbation"]
