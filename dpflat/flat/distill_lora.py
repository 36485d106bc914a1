"""Cross-model flattening for ``--peft lora``: pull the private adapters toward a teacher's adapters.

The teacher is fitted as for the prefix (``distill.py``: a non-private fit to its val plateau on
the public split in safe mode, on the private split in paper mode -- not DP), with adapters. The
pull differs from the prefix's in one way, said here and in the README: the prefix's term
lambda * ||P - P_t|| is added to every example's loss *inside* the clipping, which works because
each example's prefix is its own activation that Opacus' hooks see; an adapter's weights are not
an activation, so a term on them would never reach the per-example gradients (Opacus' hooks
would drop it). So the pull is a decoupled step after each optimizer step, like decoupled weight
decay: theta <- theta - lr * lambda * (theta - theta_t) / ||theta - theta_t|| over the kept layers'
adapters (the gradient step of lambda * ||theta - theta_t|| at the run's ``--lr``, stopping at the
teacher rather than crossing it). It reads only theta and the teacher: in safe mode no private
data beyond what the DP step already released, so no privacy cost.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import ConfigError, FlatConfig
from .base import TrainContext
from .distill import Distillation


def _kept(model) -> dict[str, torch.Tensor]:
    """The adapter weights that train (the kept layers'), by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad and (".lora_A." in n or ".lora_B." in n)}


class LoraDistillation(Distillation):
    name = "distill"

    def __init__(self, cfg: FlatConfig, lr: float):
        super().__init__(cfg)
        self.lr = float(lr)

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        if not self.teacher:
            raise ConfigError("--peft lora distillation: the fitted teacher has no trainable adapters")
        ctx.info["distill_pull"] = "decoupled step lr * lambda toward the teacher's adapters, after each DP step"
        ctx.info["distill_teacher_adapters"] = len(self.teacher)

    def take(self, teacher) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in _kept(teacher).items()}

    def extra_loss(self, ctx: TrainContext, prefix_out) -> None:
        return None  # the pull is the decoupled step below, not a per-example loss term

    @torch.no_grad()
    def pull(self, model) -> float:
        """One decoupled step toward the teacher; returns the distance before it."""
        mine = _kept(model)
        names = [n for n in mine if n in self.teacher]
        if not names or self.cfg.distill_lambda == 0:
            return 0.0
        diffs = {n: mine[n] - self.teacher[n].to(mine[n].device) for n in names}
        dist = float(torch.sqrt(sum((d.float() ** 2).sum() for d in diffs.values())))
        if dist == 0.0:
            return 0.0
        # the gradient of lambda ||d|| is lambda d/||d||; of lambda ||d||^2 (--distill-squared) 2 lambda d
        frac = min(1.0, self.lr * self.cfg.distill_lambda * (2.0 if self.cfg.distill_squared else 1.0 / dist))
        for n in names:
            mine[n].sub_(frac * diffs[n])
        return dist

    def step_end(self, ctx: TrainContext, step: int) -> None:
        if self.teacher is not None:
            self.pull(ctx.model)

    def load_state_dict(self, state: dict[str, Any], ctx: TrainContext) -> None:
        t = state.get("teacher")
        self.teacher = None if t is None else {n: v.to(ctx.device) for n, v in t.items()}


__all__ = ["LoraDistillation"]
