"""The Opacus wiring of the DP mechanism: σ search, accountants, ``make_private``, secret randomness.

Why apart from the ledger (``privacy.py``): the ledger is bookkeeping that readers of
run folders need without the training stack; this module is what a training loop
needs to *run* a mechanism -- the sampled Gaussian of DP-SGD (``make_private``) and
of DPZero (``zeroth_order_setup``) -- and to write its parameters into the ledger
(``fill_ledger``). torchrun's rank-Poisson loader comes from ``distributed.py``.
"""

from __future__ import annotations

import math
import secrets
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import ConfigError, PrivacyConfig, RunConfig
from .distributed import is_distributed, rank_poisson_loader
from .privacy import PrivacyLedger

# Expected with a frozen backbone: the prefix lookup's inputs are indices, which never
# require grad, so Opacus' full backward hooks fire on outputs only (that is all they need).
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
# Opacus reminds on every engine that its RNG is not cryptographically secure; the ledger
# records that instead (``secure_rng``, ``noise_source``), once per run.
warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)

#: RDP orders for Opacus' RDP accountant. Opacus' default grid stops at α = 63, so at small
#: ε (and many steps at small q) the optimum sits on the grid's edge ("Optimal order is the
#: largest alpha") and the σ searched for a target ε is larger than it needs to be. This
#: grid adds orders near 1 (large ε) and up to 4096 (small ε); a larger grid only ever
#: lowers the bound, and every order is a valid RDP -> (ε, δ) conversion.
RDP_ALPHAS: list[float] = (
    [1 + x / 100.0 for x in range(1, 10)]
    + [1 + x / 10.0 for x in range(1, 100)]
    + [float(a) for a in range(12, 64)]
    + [64.0, 72.0, 80.0, 96.0, 112.0, 128.0, 160.0, 192.0, 256.0, 320.0, 384.0, 512.0, 768.0, 1024.0,
       1536.0, 2048.0, 4096.0]
)


def accountant_kwargs(accountant: str) -> dict[str, Any]:
    """Extra arguments of ``get_epsilon`` for an Opacus accountant: the wide α grid for RDP."""
    return {"alphas": RDP_ALPHAS} if accountant == "rdp" else {}


#: Opacus warns when the best RDP order sits on an edge of the α grid: the bound is valid, only loose
_GRID_EDGE = "Optimal order is the"


def _epsilon(accountant: Any, name: str, delta: float) -> float:
    """ε of an Opacus accountant, never negative and without Opacus' grid-edge warning.

    Far below what a conversion resolves (huge σ, large δ) the RDP -> (ε, δ) bound can come
    out below 0; (ε, δ)-DP for some ε < 0 implies it for ε = 0, so 0 is the claim then.
    Targets in that range are refused by :func:`noise_for_target` before any training.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_GRID_EDGE)
        eps = float(accountant.get_epsilon(delta=delta, **accountant_kwargs(name)))
    return max(eps, 0.0) if math.isfinite(eps) else eps


def spent_epsilon(accountant: Any, delta: float) -> float:
    """ε an Opacus accountant has spent so far (RDP over :data:`RDP_ALPHAS`)."""
    return _epsilon(accountant, accountant.mechanism() if hasattr(accountant, "mechanism") else "rdp", delta)


def planned_mechanism(cfg: RunConfig, n_private: int) -> tuple[str, float, int]:
    """(mechanism, q, steps) the training loops run for ``cfg`` on N private examples.

    White box: Opacus' Poisson rate q = 1/len(loader) = 1/⌈N/B⌉; black box: q = B/N; both
    take round(epochs x ⌈N/B⌉) steps. Known before any model is built, so an unreachable
    target is refused first (``session.Session``), and ``verify`` checks a ledger against it.
    """
    per_pass = max(1, -(-int(n_private) // cfg.train.batch_size))
    steps = max(1, int(round(cfg.train.epochs * per_pass)))
    if cfg.blackbox.active:
        return "dpzero", cfg.train.batch_size / n_private, steps
    return "dp-sgd", 1.0 / per_pass, steps


def noise_for_target(cfg: PrivacyConfig, sample_rate: float, steps: int, delta: float) -> float:
    """σ for (target ε, δ) after ``steps`` Poisson steps at rate q, under the chosen accountant.

    Why not ``make_private_with_epsilon``: it derives steps as int(epochs / q), which
    for fractional epochs can round to fewer steps than we run and overshoot ε. We
    pass the exact step count to the same Opacus search instead (with the wide α grid).

    A target the accountant cannot resolve is refused with one line: one whose ε at the σ
    found is <= 0 (Opacus' search stops there and would claim a negative ε), and one so
    large that the best RDP order is the grid's smallest (α = 1.01: the bound is not tight).
    Cached per process (seconds per search): a run checks its target before building its
    model, then the mechanism asks again.
    """
    return _noise_for_target(cfg, float(sample_rate), int(steps), float(delta))


@lru_cache(maxsize=128)
def _noise_for_target(cfg: PrivacyConfig, sample_rate: float, steps: int, delta: float) -> float:
    from opacus.accountants import create_accountant
    from opacus.accountants.utils import get_noise_multiplier

    want = f"ε={cfg.epsilon:g} with q={sample_rate:.4g}, {steps} steps, δ={delta:.3g}"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_GRID_EDGE)
            sigma = float(get_noise_multiplier(target_epsilon=cfg.epsilon, target_delta=delta,
                                               sample_rate=sample_rate, steps=steps, accountant=cfg.accountant,
                                               epsilon_tolerance=0.01, **accountant_kwargs(cfg.accountant)))
    except ValueError as e:
        raise ConfigError(f"cannot reach {want}: {e}") from None
    acc = create_accountant(cfg.accountant)
    acc.history = [(sigma, sample_rate, steps)]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        eps = float(acc.get_epsilon(delta=delta, **accountant_kwargs(cfg.accountant)))
    if not eps > 0:
        raise ConfigError(f"cannot reach {want}: the {cfg.accountant} accountant gives ε={eps:.3g} <= 0 at the σ "
                          f"found ({sigma:.3g}), below what it resolves; choose a larger --epsilon")
    if any("smallest alpha" in str(w.message) for w in seen):
        raise ConfigError(f"cannot reach {want} tightly: at the σ it needs ({sigma:.2g}) the {cfg.accountant} "
                          f"accountant's best order is its smallest (α={RDP_ALPHAS[0]}); choose a smaller --epsilon")
    return sigma


def epsilon_for(accountant: str, sample_rate: float, sigma: float, steps: int, delta: float) -> float:
    """ε after ``steps`` steps: the same computation the training accountant does (never negative)."""
    from opacus.accountants import create_accountant

    if not 0 < sample_rate <= 1:
        raise ConfigError(f"sample rate q must be in (0, 1], got {sample_rate}")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ConfigError(f"noise multiplier σ must be a finite number > 0, got {sigma}")
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ConfigError(f"steps must be a whole number >= 1, got {steps}")
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta}")
    acc = create_accountant(accountant)
    acc.history = [(sigma, sample_rate, int(steps))]
    return _epsilon(acc, accountant, delta)


# --------------------------------------------------------------------------- secret randomness
OS_ENTROPY, OPERATOR_SUPPLIED, SECURE = "os-entropy", "operator-supplied", "secure"


def _derive(master: int, *tag: int) -> int:
    """A 63-bit seed for one stream (sampler / noise, per rank) from the secret master seed."""
    return int(np.random.SeedSequence([int(master), *tag]).generate_state(1, dtype=np.uint64)[0] % 2**63)


def cell_noise_seed(noise_seed: int | None, run_name: str) -> int | None:
    """One operator-supplied seed for a whole sweep -> a distinct stream per run (None stays None)."""
    if noise_seed is None:
        return None
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{int(noise_seed)}:{run_name}".encode()).digest()[:8], "big") % 2**63


class MechanismRNG:
    """The DP mechanism's secret randomness: Poisson sampling, Gaussian noise, per-step draws.

    Why a dedicated generator: the guarantee assumes the adversary cannot predict the
    batches or the noise. Everything the project writes down (config, run id, results
    table, logs) is public, so the default seed is drawn from OS entropy
    (``secrets.randbits``) and held only in memory; the generators' *state* (not the
    seed) goes into the checkpoint's private ``state.pt``, so a resumed run continues
    the same stream and replays lost steps exactly. ``noise_seed`` is for tests and
    bit-reproducible research; the ledger says which source was used, never the seed.

    Three generators: the sampler's lives on the CPU (Poisson masks are drawn there), the
    noise's on the training device (Opacus draws the noise next to the gradients), and one
    that seeds each DP step's dropout (``step_seed``).
    ``secure``: Opacus' ``secure_mode`` (torchcsprng, /dev/urandom); it has no state to
    checkpoint, so such a run cannot be resumed mid-way (see ``train``).
    """

    def __init__(self, sampler: torch.Generator | None, noise: torch.Generator | None, source: str,
                 dropout: torch.Generator | None = None):
        self.sampler, self.noise, self.source, self.dropout = sampler, noise, source, dropout

    def step_seed(self) -> int:
        """The seed of one DP step's other random draws (dropout masks), from a third secret stream.

        Why secret: a public per-step seed fixes the masks by *position* in the batch, so one
        record's presence shifts the masks of the records after it, and the per-example
        sensitivity argument (each clipped gradient a function of its own example) fails for
        an adversary who knows the seed. Masks drawn from a secret stream are i.i.d. and
        independent of the data, whatever the order: the mechanism is then a mixture over
        them of Gaussian mechanisms of sensitivity C, which keeps the guarantee. (The CLI
        defaults train without dropout; this covers runs that switch it on.)
        """
        if self.dropout is None:  # secure mode: no state to replay from anyway
            return secrets.randbits(63)
        return int(torch.randint(0, 2**62, (1,), generator=self.dropout))

    @classmethod
    def create(cls, noise_seed: int | None = None, secure: bool = False, device: str | torch.device = "cpu",
               rank: int = 0) -> "MechanismRNG":
        if secure:
            if noise_seed is not None:
                raise ConfigError("--secure-rng and --noise-seed exclude each other (a secure generator takes no seed)")
            try:
                import torchcsprng as csprng
            except ImportError:
                raise ConfigError("--secure-rng needs torchcsprng (Opacus secure_mode), which is not installed and "
                                  "has no build for this torch; the default already seeds the mechanism from OS "
                                  "entropy") from None
            g = csprng.create_random_device_generator("/dev/urandom")  # white box: Opacus' engine holds its own
            return cls(g, g, SECURE)
        if noise_seed is not None and not (isinstance(noise_seed, int) and 0 <= noise_seed < 2**63):
            raise ConfigError(f"--noise-seed must be an integer in [0, 2^63), got {noise_seed!r}")
        master = secrets.randbits(63) if noise_seed is None else int(noise_seed)
        sampler = torch.Generator().manual_seed(_derive(master, 0, rank))
        noise = torch.Generator(device=torch.device(device)).manual_seed(_derive(master, 1, rank))
        dropout = torch.Generator().manual_seed(_derive(master, 2, rank))
        return cls(sampler, noise, OS_ENTROPY if noise_seed is None else OPERATOR_SUPPLIED, dropout)

    def state_dict(self) -> dict[str, Any]:
        """The generators' states (private run state: the checkpoint's state.pt only)."""
        if self.source == SECURE:
            return {"source": SECURE}
        return {"source": self.source, "sampler": self.sampler.get_state(), "noise": self.noise.get_state(),
                "dropout": self.dropout.get_state()}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if d.get("source") == SECURE or self.source == SECURE:
            raise ConfigError("a --secure-rng run cannot be resumed (its generator has no state to replay lost "
                              "steps from); train it again with --no-resume")
        self.source = d["source"]
        self.sampler.set_state(d["sampler"])
        self.noise.set_state(d["noise"].to(self.noise.get_state().device))
        if "dropout" in d:  # checkpoints before 2026-12-07 have none: the stream goes on from its fresh seed
            self.dropout.set_state(d["dropout"])


@dataclass
class DPSetup:
    """One run's sampled Gaussian mechanism: its parameters, accountant and secret generators.

    White box: the Opacus-wrapped model, optimizer and Poisson loader (``make_private``).
    Black box: no wrapped objects, only the accountant (``zeroth_order_setup``): the
    loop draws its Poisson batches and noise itself from ``rng``.
    """

    model: nn.Module | None
    optimizer: Any
    loader: Any
    engine: Any  # Opacus' PrivacyEngine (white box), else None
    sigma: float
    sample_rate: float
    delta: float
    ghost: bool = False  # ghost clipping: the loss must go through ``backward_private``
    rng: MechanismRNG | None = None  # the secret sampling / noise generators
    accountant: Any = None  # the Opacus accountant tracking ε (the engine's, on the white-box path)
    mechanism: str = "dp-sgd"  # the ledger's mechanism name (one of ``privacy.SAMPLED_GAUSSIAN``)

    def __post_init__(self) -> None:
        if self.accountant is None and self.engine is not None:
            self.accountant = self.engine.accountant

    def spent(self) -> float:
        """ε spent so far (one accountant call: up to ~0.5 s, so not every step)."""
        return spent_epsilon(self.accountant, self.delta)


def zeroth_order_setup(cfg: PrivacyConfig, sample_rate: float, steps: int, n_private: int,
                       rng: MechanismRNG) -> DPSetup:
    """DPZero's mechanism: σ for the target ε at rate q over ``steps``, and an Opacus accountant.

    The loop steps the accountant itself (one sampled Gaussian release per step).
    """
    from opacus.accountants import create_accountant

    delta = cfg.resolve_delta(n_private)
    sigma = noise_for_target(cfg, sample_rate, steps, delta)
    return DPSetup(None, None, None, None, sigma, sample_rate, delta, rng=rng,
                   accountant=create_accountant(cfg.accountant), mechanism="dpzero")


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader,
    cfg: PrivacyConfig,
    total_steps: int,
    n_private: int,
    rng: MechanismRNG | None = None,
) -> DPSetup:
    """Wrap model/optimizer/loader with Opacus for DP-SGD at the config's target ε.

    Under torchrun the model is wrapped in Opacus' DPDDP first, which makes Opacus
    pick its ``DistributedDPOptimizer`` (clipped sums all-reduced, noise added once on
    rank 0) and distributed Poisson sampling; q, σ and the accountant stay those of
    the global logical batch (``dpflat/distributed.py``).

    ``rng``: the secret generators (:class:`MechanismRNG`); the loader passed in must
    already draw from ``rng.sampler`` (Opacus' Poisson loader takes the loader's generator).
    """
    from opacus import PrivacyEngine

    if not cfg.poisson:
        raise ConfigError("white-box DP needs Poisson sampling (--poisson): the accountant assumes it; shuffled "
                          "fixed-size batches are not covered")
    rng = rng or MechanismRNG.create()
    q = 1.0 / len(loader)  # Opacus' sample rate for Poisson sampling of this loader
    delta = cfg.resolve_delta(n_private)
    sigma = noise_for_target(cfg, q, total_steps, delta)
    engine = PrivacyEngine(accountant=cfg.accountant, secure_mode=rng.source == SECURE)
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
        noise_generator=None if rng.source == SECURE else rng.noise,  # secure_mode: Opacus' csprng
        **({"criterion": nn.CrossEntropyLoss()} if ghost else {}),
    )
    # ghost returns (module, optimizer, criterion, loader); we build the loss wrapper
    # ourselves from per-example losses (CE + the levels' terms), see backward_private
    dp_model, dp_opt, dp_loader = (wrapped[0], wrapped[1], wrapped[3]) if ghost else wrapped
    if is_distributed():
        dp_loader = rank_poisson_loader(dp_loader, rng.sampler)  # every rank yields every step (see its docstring)
    return DPSetup(dp_model, dp_opt, dp_loader, engine, sigma, q, delta, ghost, rng)


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


def fill_ledger(ledger: PrivacyLedger, cfg: PrivacyConfig, setup: DPSetup | None, steps: int) -> None:
    """Write the mechanism and spent ε into the ledger (ε from the live accountant)."""
    ledger.steps = steps
    if setup is None:
        ledger.mechanism = "none"
        ledger.nonprivate = True
        return
    ledger.mechanism = setup.mechanism
    ledger.accountant = cfg.accountant
    ledger.sample_rate = setup.sample_rate
    ledger.noise_multiplier = setup.sigma
    ledger.max_grad_norm = cfg.max_grad_norm
    ledger.target_epsilon = cfg.epsilon
    ledger.delta = setup.delta
    eps = setup.spent() if steps > 0 else 0.0
    ledger.epsilon = eps if math.isfinite(eps) else None
    if setup.rng is not None:
        ledger.noise_source = setup.rng.source
        ledger.secure_rng = setup.rng.source == SECURE


__all__ = [
    "OPERATOR_SUPPLIED",
    "OS_ENTROPY",
    "RDP_ALPHAS",
    "SECURE",
    "DPSetup",
    "MechanismRNG",
    "accountant_kwargs",
    "backward_private",
    "cell_noise_seed",
    "epsilon_for",
    "fill_ledger",
    "make_private",
    "noise_for_target",
    "planned_mechanism",
    "spent_epsilon",
    "zeroth_order_setup",
]
