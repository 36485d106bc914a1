"""Cross-model flattening: pull the private prefix toward a non-privately trained teacher.

Each example's loss gets lambda * ||P - P_t|| (unsquared, as the authors' code; squared
optional). It is computed from the prefix the example's forward produced, so Opacus
sees it in that example's gradient and clips it together with the cross-entropy.
The teacher prefix P_t is one broadcast tensor, never copied per example.

- safe (default): the teacher is trained on the public split only.
- paper: the teacher is trained on the private training set (as the authors do): NOT DP.

The teacher is a non-private fit to its validation plateau (``_fit.level_fit``: early
stopping on the val split within ``--teacher-epochs``, dropout off), so it is a model that
has learned its task; ``result.json`` records its val accuracy, steps and seconds, and a
teacher not clearly above the majority class prints one warning line. With the cross-layer
level on, it continues the layer scorer's fit under the chosen keep-mask.

A safe teacher reads only public data, so it is cached under the output dir, keyed by
everything it depends on (``_cache``: model state incl. keep-mask, public and val
split content, seed, fit settings); runs that share it (a sweep over ε) train it once.
A paper-mode teacher is never cached: it would carry private data into later runs.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from .. import lora
from ..config import FlatConfig, warn
from ._fit import level_data, level_fit
from .base import FlatLevel, TrainContext

PAPER_WHO = "distill/paper-teacher"
PAPER_HOW = "non-private teacher training on the private split"
#: a teacher whose val accuracy is not this far above the majority class gets a warning line
TEACHER_MARGIN = 0.05


def _majority_share(val) -> float:
    """The majority class's share of the val split (what a constant prediction scores)."""
    labels = torch.as_tensor(val[:]["labels"]) if len(val) else torch.zeros(0, dtype=torch.long)
    return float(torch.bincount(labels).max() / len(labels)) if len(labels) else 0.0


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
        data, count = level_data(ctx, c.distill_mode, PAPER_WHO, PAPER_HOW,
                                 "distillation in safe mode trains its teacher on the public split")
        ctx.info["teacher_data"] = "public split" if c.distill_mode == "safe" else "private split (not DP)"
        # the layer scorer's fit on the same data, when there is one: the teacher continues it under the
        # chosen keep-mask (its prefix then starts where a trained model is, not at the initial one)
        scorer = ctx.shared.get(f"scorer/{c.distill_mode}")
        init = None
        if scorer is not None:
            init = copy.deepcopy(scorer)
            init.prefix.set_keep(ctx.model.prefix.keep_mask)
            lora.train_kept(init)  # --peft lora: the dropped layers' adapters stay out of the fit
        teacher, report, cached = level_fit(ctx, data, kind="teacher", seed=tc.seed + 17, on_batch=count,
                                            cache=c.distill_mode == "safe", init=init)
        self.teacher = self.take(teacher)
        ctx.info.update(report.to_info("teacher"))
        ctx.info["teacher_accuracy"] = report.val_accuracy  # the name older results use (val split)
        ctx.info["teacher_cached"] = cached
        ctx.info["teacher_warm_start"] = init is not None
        majority = _majority_share(ctx.eval)
        if report.val_accuracy < majority + TEACHER_MARGIN:
            warn(f"the {ctx.info['teacher_data']} teacher reaches {report.val_accuracy:.3f} val accuracy, not "
                      f"clearly above the majority class ({majority:.3f}): distillation pulls toward a model that has "
                      f"not learned the task (more public data: --public-size; a longer fit: --teacher-epochs)")

    def take(self, teacher) -> Any:
        """What of the fitted teacher the student is pulled toward: its prefix."""
        return teacher.prefix.embedding.weight.detach().clone()

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
