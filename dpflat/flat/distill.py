"""Cross-model flattening: pull the private prefix toward a non-privately trained teacher.

Each example's loss gets lambda * ||P - P_t|| (unsquared, as the authors' code; squared
optional). It is computed from the prefix the example's forward produced, so Opacus
sees it in that example's gradient and clips it together with the cross-entropy.
The teacher prefix P_t is one broadcast tensor, never copied per example.

- safe (default): the teacher is trained on the public split only.
- paper: the teacher is trained on the private training set (as the authors do): NOT DP.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import ConfigError, FlatConfig
from ._fit import fit_nonprivate, steps_for_epochs
from .base import FlatLevel, TrainContext

PAPER_WHO = "distill/paper-teacher"
PAPER_HOW = "non-private teacher training on the private split"


def distill_term(prefix_out: torch.Tensor, teacher: torch.Tensor, keep_cols: torch.Tensor | None,
                 lam: float, squared: bool) -> torch.Tensor:
    """Per-example lambda * ||P_b - P_t|| over the kept layers' coordinates; shape (B,)."""
    diff = prefix_out - teacher.unsqueeze(0)
    if keep_cols is not None:
        diff = diff * keep_cols
    sq = diff.pow(2).flatten(1).sum(1)
    return lam * (sq if squared else (sq + 1e-12).sqrt())


class Distillation(FlatLevel):
    name = "distill"

    def __init__(self, cfg: FlatConfig):
        self.cfg = cfg
        self.teacher: torch.Tensor | None = None

    def setup(self, ctx: TrainContext) -> None:
        c, tc = self.cfg, ctx.cfg.train
        if c.distill_mode == "safe":
            data = ctx.public
            if data is None or len(data) == 0:
                raise ConfigError("distillation in safe mode trains its teacher on the public split: set --public-size > 0")
            count = None
        else:
            data = ctx.private.read(PAPER_WHO, PAPER_HOW, accounted=False)
            count = lambda nb: ctx.private.count(PAPER_WHO, PAPER_HOW, False, nb)  # noqa: E731
        steps = steps_for_epochs(c.teacher_epochs, len(data), tc.batch_size)
        teacher = fit_nonprivate(ctx.model, data, steps=steps, batch_size=tc.batch_size, lr=tc.lr,
                                 device=ctx.device, seed=tc.seed + 17, on_batch=count)
        self.teacher = teacher.prefix.embedding.weight.detach().clone()
        from ..evaluate import evaluate

        ctx.info["teacher_accuracy"] = evaluate(teacher, ctx.eval, tc.eval_batch_size, ctx.device)["accuracy"]
        ctx.info["teacher_data"] = "public split" if c.distill_mode == "safe" else "private split (not DP)"
        ctx.info["teacher_steps"] = steps

    def _keep_cols(self, ctx: TrainContext) -> torch.Tensor | None:
        keep = ctx.model.prefix.keep_mask
        if bool(keep.all()):
            return None
        pe = ctx.model.prefix
        cols = keep.view(pe.n_layers, 1).expand(pe.n_layers, 2 * pe.hidden).reshape(-1)
        return cols.to(torch.float32)

    def extra_loss(self, ctx: TrainContext, prefix_out: torch.Tensor) -> torch.Tensor | None:
        if self.teacher is None or self.cfg.distill_lambda == 0:
            return None
        return distill_term(prefix_out, self.teacher, self._keep_cols(ctx), self.cfg.distill_lambda,
                            self.cfg.distill_squared)

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher}

    def load_state_dict(self, state: dict[str, Any], ctx: TrainContext) -> None:
        t = state.get("teacher")
        self.teacher = None if t is None else t.to(ctx.device)
