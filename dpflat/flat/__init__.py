"""The three flattening levels (within-layer AWP, cross-layer selection, cross-model
distillation), each in a DP-safe mode (default) and the paper's (not DP) mode; and the
step callbacks that observe training without changing it (the sharpness trajectory)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from .. import distributed as dist_mod
from .base import FlatLevel, StepCallback, TrainContext

if TYPE_CHECKING:  # pragma: no cover
    from ..config import RunConfig


def _layers() -> type[FlatLevel]:
    from .layers import LayerSelection

    return LayerSelection


def _distill() -> Callable[["RunConfig"], FlatLevel]:
    """Distillation toward a teacher's prefix, or its adapters under --peft lora (``distill_lora.py``)."""

    def build(cfg: "RunConfig") -> FlatLevel:
        if cfg.model.peft == "lora":
            from .distill_lora import LoraDistillation

            return LoraDistillation(cfg.flat, cfg.train.lr)
        from .distill import Distillation

        return Distillation(cfg.flat)

    return build


def _awp() -> Callable[["RunConfig"], FlatLevel]:
    """AWP on the prefix, or on the adapters under --peft lora (``awp_lora.py``); built from the whole config."""

    def build(cfg: "RunConfig") -> FlatLevel:
        if cfg.model.peft == "lora":
            from .awp_lora import LoraAWP

            return LoraAWP(cfg.flat)
        from .awp import AWP

        return AWP(cfg.flat)

    return build


def _trajectory() -> type[StepCallback]:
    from .trajectory import SharpnessTrajectory

    return SharpnessTrajectory


@dataclass(frozen=True)
class LevelEntry:
    """One level (or step callback) of a registry: when a config switches it on, its class or builder
    (imported lazily: a plain DP run never loads the landscape tools) and what it is built from (a
    config section, or the whole config where the form depends on another section: ``--peft lora``)."""

    name: str
    active: Callable[["RunConfig"], bool]
    load: Callable[[], Callable[[Any], StepCallback]]
    section: Callable[["RunConfig"], Any]


#: The levels in the order the loop calls them. Cross-layer first (it fixes the keep-mask),
#: then distillation (its teacher uses that mask), then AWP (it perturbs what the others leave
#: trainable).
REGISTRY: list[LevelEntry] = [
    LevelEntry("layers", lambda c: c.flat.layers, _layers, lambda c: c.flat),
    LevelEntry("distill", lambda c: c.flat.distill, _distill, lambda c: c),
    LevelEntry("awp", lambda c: c.flat.awp, _awp, lambda c: c),
]
#: The step callbacks, called after the levels at each of their points: the sharpness trajectory
#: (a diagnostic: it sees the step the levels shaped, and changes nothing).
CALLBACKS: list[LevelEntry] = [
    LevelEntry("trajectory", lambda c: bool(c.train.sharpness_every), _trajectory, lambda c: c.train),
]


def build_levels(cfg: "RunConfig") -> list[FlatLevel]:
    """The levels a config switches on, in registry order."""
    return [e.load()(e.section(cfg)) for e in REGISTRY if e.active(cfg)]


def build_callbacks(cfg: "RunConfig") -> list[StepCallback]:
    """The step callbacks a config switches on, in registry order."""
    return [e.load()(e.section(cfg)) for e in CALLBACKS if e.active(cfg)]


# --------------------------------------------------------------------------- torchrun: one state on every rank
def share_levels(levels: list[StepCallback], ctx: TrainContext) -> None:
    """Rank 0 ran the levels' (and callbacks') setup; the other ranks load its outcome.

    Setup (teacher training, greedy layer selection) is computed once rather than
    on every rank because GPU kernels are not bit-reproducible across processes, and
    so that its private-data reads (paper mode) are counted once in the ledger.
    """
    if not dist_mod.is_distributed():
        return
    got = dist_mod.broadcast({"levels": {lv.name: lv.state_dict() for lv in levels}, "info": ctx.info})
    if not dist_mod.is_main():
        for lv in levels:
            lv.load_state_dict(got["levels"].get(lv.name, {}), ctx)
        ctx.info.update(got["info"])


def share_step_state(levels: list[FlatLevel], ctx: TrainContext) -> None:
    """Make a logical step's level state (e.g. paper-mode AWP's perturbation) rank 0's on every rank.

    Each level says what it needs shared (``FlatLevel.step_state``); paper-mode AWP takes
    its ascent direction from "the step's first private micro-batch", and each rank has
    its own, so rank 0's (the first of the global batch) is used everywhere.
    """
    if not dist_mod.is_distributed():
        return
    for lv in levels:
        mine = lv.step_state()
        if mine is not None:
            lv.load_step_state(dist_mod.broadcast(mine), ctx)


__all__ = ["CALLBACKS", "REGISTRY", "FlatLevel", "LevelEntry", "StepCallback", "TrainContext", "build_callbacks",
           "build_levels", "share_levels", "share_step_state"]
