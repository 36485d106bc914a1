"""The contract between the training loop and a flattening level.

The loop (``dpflat/train.py``) stays one readable screen; each level plugs into a
few fixed points of it. Default methods do nothing, so a level implements only the
points it needs.
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


class FlatLevel:
    """Hook points called by the training loop, in this order per logical step:
    ``step_begin`` (first physical chunk) -> for each chunk: ``perturb`` -> forward with
    ``extra_loss`` -> backward -> ``restore`` -> optimizer step -> ``step_end``.
    """

    name = "level"

    def setup(self, ctx: TrainContext) -> None:
        """Before private training (fresh runs only; resumed runs load ``state_dict``)."""

    def step_begin(self, ctx: TrainContext, step: int, batch: dict[str, torch.Tensor]) -> None:
        """Start of a logical step, with its first physical chunk."""

    def perturb(self, ctx: TrainContext) -> None:
        """Move the trainable weights before a chunk's forward/backward."""

    def restore(self, ctx: TrainContext) -> None:
        """Undo ``perturb`` exactly, before the optimizer uses the gradient."""

    def extra_loss(self, ctx: TrainContext, prefix_out: torch.Tensor) -> torch.Tensor | None:
        """A per-example loss term (shape (B,)) added inside per-example clipping."""
        return None

    def step_end(self, ctx: TrainContext, step: int) -> None:
        """After the optimizer step; ``p.grad`` still holds the (noisy) gradient used."""

    def step_state(self) -> dict[str, Any] | None:
        """What of this step every rank must hold identically under torchrun (rank 0's is sent).

        None when the level has nothing to share; the answer must not depend on the rank
        (it decides whether a collective runs), only on the config.
        """
        return None

    def load_step_state(self, state: dict[str, Any], ctx: TrainContext) -> None:
        """Take rank 0's ``step_state``."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], ctx: TrainContext) -> None:
        pass


__all__ = ["FlatLevel", "TrainContext"]
