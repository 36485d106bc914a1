"""Opacus wiring and the privacy ledger.

The ledger is the single gate to the private training split: code that wants
private examples asks ``PrivateSplit.read(who, accounted=...)`` and the read is
recorded. A run's guarantee is "(ε, δ)-DP" only if *every* read was accounted by
the DP-SGD accountant; one unaccounted read (paper-mode flattening, non-private
training) makes the run "not DP", and nothing downstream may claim an ε for it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .config import ConfigError, PrivacyConfig

# Expected with a frozen backbone: the prefix lookup's inputs are indices, which never
# require grad, so Opacus' full backward hooks fire on outputs only (that is all they need).
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
# Opacus reminds on every engine that its RNG is not cryptographically secure; the ledger
# records that instead (``secure_rng``), once per run.
warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)

DP = "(ε, δ)-DP"
NOT_DP_PAPER = "not DP (paper mode)"
NOT_DP_NONPRIVATE = "not DP (non-private)"
# Both are the Poisson-subsampled Gaussian mechanism (per-example contribution clipped to C,
# noise σC on the sum), so the same accountants apply: DP-SGD on gradients, DPZero on the
# scalar finite differences of the black-box path.
SAMPLED_GAUSSIAN = ("dp-sgd", "dpzero")


@dataclass
class Read:
    """One kind of access to the private split (aggregated over steps)."""

    who: str  # e.g. "train/dp-sgd", "awp/paper-ascent", "teacher/paper"
    how: str  # short description of what was computed from the data
    accounted: bool  # covered by the DP-SGD accountant?
    count: int = 0  # number of accesses (batches)
    examples: int = 0  # examples touched (with multiplicity)


@dataclass
class PrivacyLedger:
    """What touched private data, and the guarantee that follows."""

    mechanism: str = "none"
    accountant: str | None = None
    sample_rate: float | None = None
    noise_multiplier: float | None = None
    max_grad_norm: float | None = None
    steps: int = 0
    target_epsilon: float | None = None
    epsilon: float | None = None
    delta: float | None = None
    n_private: int = 0
    reads: list[Read] = field(default_factory=list)
    nonprivate: bool = False
    secure_rng: bool = False  # Opacus secure_mode (csprng) off: fine for research, not production

    def record(self, who: str, how: str, accounted: bool, examples: int) -> None:
        for r in self.reads:
            if r.who == who and r.how == how and r.accounted == accounted:
                r.count += 1
                r.examples += int(examples)
                return
        self.reads.append(Read(who, how, accounted, 1, int(examples)))

    def declare(self, who: str, how: str, accounted: bool) -> None:
        """Register a read path before it happens (so a run that dies early still says it)."""
        if not any(r.who == who and r.how == how and r.accounted == accounted for r in self.reads):
            self.reads.append(Read(who, how, accounted, 0, 0))

    @property
    def unaccounted(self) -> list[Read]:
        return [r for r in self.reads if not r.accounted]

    @property
    def is_dp(self) -> bool:
        return self.mechanism in SAMPLED_GAUSSIAN and not self.unaccounted and self.epsilon is not None

    @property
    def guarantee(self) -> str:
        if self.mechanism not in SAMPLED_GAUSSIAN:
            return NOT_DP_NONPRIVATE
        if self.unaccounted:
            return NOT_DP_PAPER
        return DP

    @property
    def claimed_epsilon(self) -> float | None:
        """The ε a run may claim: None unless the whole run is DP."""
        return self.epsilon if self.guarantee == DP else None

    def label(self) -> str:
        """Short text for plots and tables, e.g. "(ε, δ)-DP, ε=2.98"."""
        if self.guarantee == DP and self.epsilon is not None:
            return f"{DP}, ε={self.epsilon:.2f}, δ={self.delta:.1e}"
        return self.guarantee

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["guarantee"] = self.guarantee
        d["claimed_epsilon"] = self.claimed_epsilon
        d["unaccounted_reads"] = len(self.unaccounted)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PrivacyLedger":
        d = dict(d)
        for k in ("guarantee", "claimed_epsilon", "unaccounted_reads"):
            d.pop(k, None)
        d["reads"] = [Read(**r) for r in d.get("reads", [])]
        return cls(**d)


class PrivateSplit:
    """The only handle on the private training data: every read goes through the ledger."""

    def __init__(self, dataset, ledger: PrivacyLedger):
        self._dataset = dataset
        self.ledger = ledger
        ledger.n_private = len(dataset)

    def __len__(self) -> int:
        return len(self._dataset)

    def read(self, who: str, how: str, accounted: bool):
        """Hand out the dataset for a declared purpose; per-batch use is counted by ``count``."""
        self.ledger.declare(who, how, accounted)
        return self._dataset

    def count(self, who: str, how: str, accounted: bool, examples: int) -> None:
        self.ledger.record(who, how, accounted, examples)


def default_delta(n: int) -> float:
    """δ = 1/N^1.1 (strictly below 1/N)."""
    return 1.0 / (n**1.1)


def noise_for_target(cfg: PrivacyConfig, sample_rate: float, steps: int, delta: float) -> float:
    """σ for (target ε, δ) after ``steps`` Poisson steps at rate q, under the chosen accountant.

    Why not ``make_private_with_epsilon``: it derives steps as int(epochs / q), which
    for fractional epochs can round to fewer steps than we run and overshoot ε. We
    pass the exact step count to the same Opacus search instead.
    """
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(
            get_noise_multiplier(
                target_epsilon=cfg.epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=cfg.accountant,
                epsilon_tolerance=0.01,
            )
        )
    except ValueError as e:
        raise ConfigError(f"cannot reach ε={cfg.epsilon} with q={sample_rate:.4g}, {steps} steps: {e}") from e


def epsilon_for(accountant: str, sample_rate: float, sigma: float, steps: int, delta: float) -> float:
    """ε after ``steps`` steps: the same computation the training accountant does."""
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = [(sigma, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta))


@dataclass
class DPSetup:
    model: nn.Module
    optimizer: Any
    loader: Any
    engine: Any
    sigma: float
    sample_rate: float
    delta: float
    ghost: bool = False  # ghost clipping: the loss must go through ``backward_private``


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader,
    cfg: PrivacyConfig,
    total_steps: int,
    n_private: int,
) -> DPSetup:
    """Wrap model/optimizer/loader with Opacus for DP-SGD at the config's target ε.

    Under torchrun the model is wrapped in Opacus' DPDDP first, which makes Opacus
    pick its ``DistributedDPOptimizer`` (clipped sums all-reduced, noise added once on
    rank 0) and distributed Poisson sampling; q, σ and the accountant stay those of
    the global logical batch (``dpflat/distributed.py``).
    """
    from opacus import PrivacyEngine

    from .distributed import is_distributed, rank_poisson_loader

    q = 1.0 / len(loader)  # Opacus' sample rate for Poisson sampling of this loader
    delta = cfg.resolve_delta(n_private)
    sigma = noise_for_target(cfg, q, total_steps, delta)
    engine = PrivacyEngine(accountant=cfg.accountant)
    model.train()
    module = model
    if is_distributed():
        from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

        module = DPDDP(model)  # broadcasts rank 0's parameters
    ghost = cfg.grad_sample_mode == "ghost"
    if ghost and is_distributed():
        raise ConfigError("grad_sample_mode ghost is not supported under torchrun; use hooks (the default)")
    wrapped = engine.make_private(
        module=module,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=sigma,
        max_grad_norm=cfg.max_grad_norm,
        poisson_sampling=cfg.poisson,
        grad_sample_mode=cfg.grad_sample_mode,
        **({"criterion": nn.CrossEntropyLoss()} if ghost else {}),
    )
    # ghost returns (module, optimizer, criterion, loader); we build the loss wrapper
    # ourselves from per-example losses (CE + the levels' terms), see backward_private
    dp_model, dp_opt, dp_loader = (wrapped[0], wrapped[1], wrapped[3]) if ghost else wrapped
    if is_distributed():
        dp_loader = rank_poisson_loader(dp_loader)  # every rank yields every step (see its docstring)
    return DPSetup(dp_model, dp_opt, dp_loader, engine, sigma, q, delta, ghost)


def backward_private(setup: DPSetup | None, per_example_loss: torch.Tensor) -> torch.Tensor:
    """Backward of the mean per-example loss, the way the DP mode needs it.

    hooks / functorch / non-private: a plain ``mean().backward()`` (Opacus clips in the
    optimizer step). ghost: Opacus' two-pass backward -- the first pass computes each
    example's gradient norm without materialising the gradient, the second back-propagates
    the loss re-weighted by each example's clipping coefficient.
    """
    loss = per_example_loss.mean() if per_example_loss.numel() else per_example_loss.sum()
    if setup is not None and setup.ghost:
        from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

        DPTensorFastGradientClipping(setup.model, setup.optimizer, per_example_loss, "mean").backward()
    else:
        loss.backward()
    return loss.detach()


def fill_ledger(ledger: PrivacyLedger, cfg: PrivacyConfig, setup: DPSetup | None, steps: int,
                mechanism: str = "dp-sgd") -> None:
    """Write the mechanism and spent ε into the ledger (ε from the live accountant)."""
    ledger.steps = steps
    if setup is None:
        ledger.mechanism = "none"
        ledger.nonprivate = True
        return
    ledger.mechanism = mechanism
    ledger.accountant = cfg.accountant
    ledger.sample_rate = setup.sample_rate
    ledger.noise_multiplier = setup.sigma
    ledger.max_grad_norm = cfg.max_grad_norm
    ledger.target_epsilon = cfg.epsilon
    ledger.delta = setup.delta
    eps = float(setup.engine.accountant.get_epsilon(delta=setup.delta)) if steps > 0 else 0.0
    ledger.epsilon = eps if math.isfinite(eps) else None


__all__ = [
    "DP",
    "NOT_DP_PAPER",
    "NOT_DP_NONPRIVATE",
    "SAMPLED_GAUSSIAN",
    "Read",
    "PrivacyLedger",
    "PrivateSplit",
    "DPSetup",
    "default_delta",
    "epsilon_for",
    "fill_ledger",
    "backward_private",
    "make_private",
    "noise_for_target",
]
