"""The three flattening levels (within-layer AWP, cross-layer selection, cross-model
distillation), each in a DP-safe mode (default) and the paper's (not DP) mode."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import FlatLevel, TrainContext

if TYPE_CHECKING:  # pragma: no cover
    from ..config import RunConfig


def build_levels(cfg: "RunConfig") -> list[FlatLevel]:
    """The levels a config switches on, in the order the loop calls them.

    Cross-layer first (it fixes the keep-mask), then distillation (its teacher uses
    that mask), then AWP (it perturbs what the others leave trainable).
    """
    levels: list[FlatLevel] = []
    f = cfg.flat
    if f.layers:
        from .layers import LayerSelection

        levels.append(LayerSelection(f))
    if f.distill:
        from .distill import Distillation

        levels.append(Distillation(f))
    if f.awp:
        from .awp import AWP

        levels.append(AWP(f))
    if cfg.train.sharpness_every:  # a diagnostic, last: it sees the step the others shaped
        from .trajectory import SharpnessTrajectory

        levels.append(SharpnessTrajectory(cfg.train))
    return levels


__all__ = ["FlatLevel", "TrainContext", "build_levels"]
