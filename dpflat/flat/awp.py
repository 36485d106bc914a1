"""Within-layer flattening: adversarial weight perturbation (AWP) of each layer's prefix.

During the first ``awp_epochs`` the DP gradient is taken at P + v with, per layer l,
v_l = gamma * ||P_l|| * d_l / ||d_l||, then P is restored exactly before the step.

- safe (default): d = the previous step's *noisy* DP gradient (as DP-SAT). It is
  post-processing of already-released noisy gradients: no privacy cost, no extra
  forward/backward.
- paper: d = the gradient of the raw (unclipped, noiseless) loss on the step's first
  private micro-batch, as the authors' proxy ascent step. That read is NOT accounted.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..config import FlatConfig
from ..evaluate import model_inputs
from .base import FlatLevel, TrainContext

PAPER_WHO = "awp/paper-ascent"
PAPER_HOW = "raw gradient of a private micro-batch (no clipping, no noise)"


def perturbation(weight: torch.Tensor, direction: torch.Tensor, layer_view, gamma: float) -> torch.Tensor:
    """v with v_l = gamma * ||P_l|| * d_l / ||d_l|| for each layer slice (zero where d_l = 0)."""
    P, D = layer_view(weight), layer_view(direction)  # (L, m, 2H)
    pn = P.flatten(1).norm(dim=1)
    dn = D.flatten(1).norm(dim=1)
    scale = torch.where(dn > 0, gamma * pn / dn.clamp_min(1e-30), torch.zeros_like(dn))
    v = D * scale.view(-1, 1, 1)
    return v.transpose(0, 1).reshape(weight.shape)


class AWP(FlatLevel):
    name = "awp"

    def __init__(self, cfg: FlatConfig):
        self.cfg = cfg
        self.direction: torch.Tensor | None = None  # safe: last noisy gradient of the prefix
        self._saved: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def active_steps(self, ctx: TrainContext) -> int:
        e = self.cfg.awp_epochs
        return int(round(e * ctx.total_steps)) if e < 1 else int(round(e * ctx.steps_per_epoch))

    def setup(self, ctx: TrainContext) -> None:
        if self.cfg.awp_mode == "paper":
            ctx.ledger.declare(PAPER_WHO, PAPER_HOW, accounted=False)
        ctx.info["awp_mode"] = self.cfg.awp_mode

    def step_begin(self, ctx: TrainContext, step: int, batch: dict[str, torch.Tensor]) -> None:
        self._v = None
        if step >= self.active_steps(ctx) or self.cfg.awp_gamma == 0:
            return
        w = ctx.model.prefix.embedding.weight
        d = self._paper_direction(ctx, batch) if self.cfg.awp_mode == "paper" else self.direction
        if d is not None:
            self._v = perturbation(w.detach(), d, ctx.model.prefix.layer_view, self.cfg.awp_gamma)

    def _paper_direction(self, ctx: TrainContext, batch) -> torch.Tensor | None:
        """One ascent gradient on the raw private micro-batch (the authors' proxy step)."""
        if len(batch["labels"]) == 0:
            return None
        ctx.private.count(PAPER_WHO, PAPER_HOW, accounted=False, examples=len(batch["labels"]))
        gsm = ctx.dp.model if ctx.dp is not None else None
        if gsm is not None:
            gsm.disable_hooks()  # this pass must not leave per-example grads behind
        try:
            w = ctx.model.prefix.embedding.weight
            logits = ctx.model(**model_inputs(batch, ctx.device))
            loss = F.cross_entropy(logits, batch["labels"].to(ctx.device))
            (g,) = torch.autograd.grad(loss, [w])
        finally:
            if gsm is not None:
                gsm.enable_hooks()
        # The proxy takes one SGD ascent step of size awp_proxy_lr; its displacement
        # (lr * g) has g's direction, which is all the normalised perturbation uses.
        return self.cfg.awp_proxy_lr * g.detach()

    @torch.no_grad()
    def perturb(self, ctx: TrainContext) -> None:
        if self._v is None:
            return
        w = ctx.model.prefix.embedding.weight
        self._saved = w.detach().clone()
        w.add_(self._v)

    @torch.no_grad()
    def restore(self, ctx: TrainContext) -> None:
        if self._saved is not None:
            ctx.model.prefix.embedding.weight.copy_(self._saved)
            self._saved = None

    def step_end(self, ctx: TrainContext, step: int) -> None:
        if self.cfg.awp_mode == "safe":
            g = ctx.model.prefix.embedding.weight.grad
            self.direction = None if g is None else g.detach().clone()

    def step_state(self) -> dict[str, Any] | None:
        """Paper mode: the step's perturbation comes from one rank's micro-batch, so all use rank 0's.

        Safe mode shares nothing: the direction is the previous noisy gradient, which the
        optimizer's all-reduce already made identical on every rank.
        """
        return {"v": self._v} if self.cfg.awp_mode == "paper" else None

    def load_step_state(self, state: dict[str, Any], ctx: TrainContext) -> None:
        v = state.get("v")
        self._v = None if v is None else v.to(ctx.device)

    def state_dict(self) -> dict[str, Any]:
        return {"direction": self.direction}

    def load_state_dict(self, state: dict[str, Any], ctx: TrainContext) -> None:
        d = state.get("direction")
        self.direction = None if d is None else d.to(ctx.device)
