"""The contract between the training loop and a flattening level.

The loop (``dpflat/train.py``) stays one readable screen; each level plugs into a
few fixed points of it. Default methods do nothing, so a level implements only the
points it needs. A step callback (``StepCallback``: set-up, step end, state) observes
the steps without changing them; a level (``FlatLevel``) is a callback that may.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..config import RunConfig
    from ..models import PrefixModel
    from ..engine import DPSetup
    from ..privacy import PrivacyLedger, PrivateSplit


@dataclass
class TrainContext:
    """What a level may see. Private data only through ``private`` (the ledger gate)."""

    cfg: "RunConfig"
    model: "PrefixModel"  # the raw model (not the Opacus wrapper)
    private: "PrivateSplit"
    public: Any  # tokenised public split (may be empty)
    eval: Any  # tokenised eval split
    ledger: "PrivacyLedger"
    device: torch.device
    total_steps: int = 0
    steps_per_epoch: int = 0
    dp: "DPSetup | None" = None
    info: dict[str, Any] = field(default_factory=dict)  # levels report here (goes to result.json)
    # what one level's setup leaves for a later one in this run (the layer scorer's fit, for the teacher)
    shared: dict[str, Any] = field(default_factory=dict)


class StepCallback:
    """What the training loop tells an observer of its steps: ``setup`` before the first step,
    ``step_end`` after each optimizer step, and its state in every checkpoint.

    A callback changes nothing the run computes (the sharpness trajectory, ``trajectory.py``:
    weights, gradients and RNG states are as they were after it). The loop calls the callbacks
    after the levels, at each of these points.
    """

    name = "callback"

    def setup(self, ctx: TrainContext) -> None:
        """Before private training (fresh runs only; resumed runs load ``state_dict``)."""

    def step_end(self, ctx: TrainContext, step: int) -> None:
        """After the optimizer step; ``p.grad`` still holds the (noisy) gradient used."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], ctx: TrainContext) -> None:
        pass


class FlatLevel(StepCallback):
    """Hook points called by the training loop, in this order per logical step:
    ``step_begin`` (first physical chunk) -> for each chunk: ``perturb`` -> forward with
    ``extra_loss`` -> backward -> ``restore`` -> optimizer step -> ``step_end``.
    Besides a callback's points, a level may change the step: perturb the weights, add a loss term.
    """

    name = "level"

    def step_begin(self, ctx: TrainContext, step: int, batch: dict[str, torch.Tensor]) -> None:
        """Start of a logical step, with its first physical chunk."""

    def perturb(self, ctx: TrainContext) -> None:
        """Move the trainable weights before a chunk's forward/backward."""

    def restore(self, ctx: TrainContext) -> None:
        """Undo ``perturb`` exactly, before the optimizer uses the gradient."""

    def extra_loss(self, ctx: TrainContext, prefix_out: torch.Tensor) -> torch.Tensor | None:
        """A per-example loss term (shape (B,)) added inside per-example clipping."""
        return None

    def step_state(self) -> dict[str, Any] | None:
        """What of this step every rank must hold identically under torchrun (rank 0's is sent).

        None when the level has nothing to share; the answer must not depend on the rank
        (it decides whether a collective runs), only on the config.
        """
        return None

    def load_step_state(self, state: dict[str, Any], ctx: TrainContext) -> None:
        """Take rank 0's ``step_state``."""


__all__ = ["FlatLevel", "StepCallback", "TrainContext"]
