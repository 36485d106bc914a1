"""The three flattening levels (within-layer AWP, cross-layer selection, cross-model
distillation), each in a DP-safe mode (default) and the paper's (not DP) mode."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from .base import FlatLevel, TrainContext

if TYPE_CHECKING:  # pragma: no cover
    from ..config import RunConfig


def _layers() -> type[FlatLevel]:
    from .layers import LayerSelection

    return LayerSelection


def _distill() -> type[FlatLevel]:
    from .distill import Distillation

    return Distillation


def _awp() -> type[FlatLevel]:
    from .awp import AWP

    return AWP


def _trajectory() -> type[FlatLevel]:
    from .trajectory import SharpnessTrajectory

    return SharpnessTrajectory


@dataclass(frozen=True)
class LevelEntry:
    """One level of the registry: when a config switches it on, its class (imported lazily:
    a plain DP run never loads the landscape tools) and the config section it is built from."""

    name: str
    active: Callable[["RunConfig"], bool]
    load: Callable[[], type[FlatLevel]]
    section: Callable[["RunConfig"], Any]


#: The levels in the order the loop calls them. Cross-layer first (it fixes the keep-mask),
#: then distillation (its teacher uses that mask), then AWP (it perturbs what the others leave
#: trainable); the sharpness trajectory last (a diagnostic: it sees the step the others shaped).
REGISTRY: list[LevelEntry] = [
    LevelEntry("layers", lambda c: c.flat.layers, _layers, lambda c: c.flat),
    LevelEntry("distill", lambda c: c.flat.distill, _distill, lambda c: c.flat),
    LevelEntry("awp", lambda c: c.flat.awp, _awp, lambda c: c.flat),
    LevelEntry("trajectory", lambda c: bool(c.train.sharpness_every), _trajectory, lambda c: c.train),
]


def build_levels(cfg: "RunConfig") -> list[FlatLevel]:
    """The levels a config switches on, in registry order."""
    return [e.load()(e.section(cfg)) for e in REGISTRY if e.active(cfg)]


__all__ = ["REGISTRY", "FlatLevel", "LevelEntry", "TrainContext", "build_levels"]
