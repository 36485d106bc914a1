"""ε of one DP-SGD run under several accountants, side by side (a cross-check).

A run's ledger records the sampled Gaussian mechanism it ran: Poisson rate q, noise
multiplier σ, number of steps T, and δ. The ε it claims comes from one accountant
(Opacus RDP by default). Here the same (q, σ, T, δ) goes through four independent
computations, so that a bug or a loose conversion in one of them shows up:

- ``opacus_rdp``: Opacus' RDP accountant (what training uses by default).
- ``opacus_prv``: Opacus' PRV accountant (numerical composition of privacy random
  variables, Gopi et al. 2021); an upper bound within ``eps_error``.
- ``dp_accounting_rdp``: Google's ``dp_accounting`` RDP accountant (same analysis,
  separate code, orders 1.1..63 like Opacus plus 128..1024). Integer orders agree
  exactly. At fractional orders and large q (e.g. 0.25, our tiny test runs)
  dp_accounting is more conservative (ε up to ~1% higher below ε = 12, ~5% at ε 15-20,
  much more at ε ~ 100, where the optimal order is near 1) and drops orders whose
  series does not converge; Opacus' values there match a direct numerical integration
  of the Rényi divergence (checked with mpmath at q=0.25, σ=1.5, α=1.5..4.5), so Opacus
  is not the one off. Below ε ~ 0.5 the optimal order exceeds Opacus' largest (63) and
  dp_accounting's extra orders make it tighter, up to ~2x.
- ``dp_accounting_pld``: Google's privacy-loss-distribution accountant (pessimistic
  discretisation, so still an upper bound); nearly exact, so PLD and PRV agree with
  each other and sit at or below RDP. The RDP -> (ε, δ) conversion is lossy: ~1.1x at
  many steps, up to ~4x at few steps, and far more below ε ~ 0.5, where Opacus' order
  grid (largest α = 63) runs out.

All four use add-or-remove-one adjacency, as Opacus' analysis does.

The ledger check (``AccountantComparison.ledger_matches``) is independent of the code
that made the claim: the claimed ε must be at least dp_accounting's PLD ε (a
pessimistic upper bound on the true ε of the recorded mechanism, so a claim below it
cannot be justified) and within ``RDP_TOLERANCE`` of dp_accounting's RDP ε (the same
analysis in separate code). Recomputing the run's own accountant proves nothing: it
agrees with itself by construction. ``poisson_check`` tests the recorded per-step
batch sizes against Poisson sampling at the recorded q (the accountant's assumption).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .engine import accountant_kwargs
from .privacy import SAMPLED_GAUSSIAN

ACCOUNTANTS = ("opacus_rdp", "opacus_prv", "dp_accounting_rdp", "dp_accounting_pld")
#: PLD discretisation of the privacy-loss values; pessimistic rounding keeps the
#: result an upper bound, 1e-3 is ~5x faster than dp_accounting's default 1e-4 and
#: changes ε by well under 1% on the runs of this project.
PLD_DISCRETIZATION = 1e-3
PRV_EPS_ERROR = 0.01
#: |claimed / dp_accounting RDP - 1| allowed: the two RDP codes differ by up to ~5% at
#: fractional orders and large q (module doc), by more only at ε far above the project's range
RDP_TOLERANCE = 0.10
#: the PLD ε is pessimistic up to its discretisation; a claim this much below it still passes
PLD_SLACK = 1e-3
#: two-sided false-alarm probability of each Poisson test (mean, variance)
POISSON_ALPHA = 1e-5


@contextmanager
def _quiet():
    """dp_accounting logs a warning per RDP order it drops at large q; the result is fine."""
    loggers = [logging.getLogger(n) for n in ("", "absl", "dp_accounting")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _check(q: float, sigma: float, steps: int, delta: float) -> None:
    if not 0 < q <= 1:
        raise ValueError(f"sample rate q must be in (0, 1], got {q}")
    if not sigma > 0:
        raise ValueError(f"noise multiplier must be > 0, got {sigma}")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def _opacus(name: str, q: float, sigma: float, steps: int, delta: float) -> float:
    from opacus.accountants import create_accountant

    acc = create_accountant(name)
    acc.history = [(sigma, q, int(steps))]
    kw = {"eps_error": PRV_EPS_ERROR} if name == "prv" else accountant_kwargs(name)  # RDP: the wide α grid
    with warnings.catch_warnings():  # an optimum on the α grid's edge: a valid, loose bound
        warnings.filterwarnings("ignore", message="Optimal order is the")
        eps = float(acc.get_epsilon(delta=delta, **kw))
    return max(eps, 0.0)  # far below its resolution a conversion can go below 0; (ε, δ) for ε < 0 implies ε = 0


def _dp_accounting(kind: str, q: float, sigma: float, steps: int, delta: float) -> float:
    import dp_accounting

    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    if kind == "rdp":
        acc = dp_accounting.rdp.RdpAccountant()
    else:
        acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    acc.compose(event, int(steps))
    return float(acc.get_epsilon(delta))


def epsilon(name: str, q: float, sigma: float, steps: int, delta: float) -> float:
    """ε after ``steps`` Poisson-sampled Gaussian steps under accountant ``name`` (see ACCOUNTANTS)."""
    _check(q, sigma, steps, delta)
    with _quiet():
        if name == "opacus_rdp":
            return _opacus("rdp", q, sigma, steps, delta)
        if name == "opacus_prv":
            return _opacus("prv", q, sigma, steps, delta)
        if name == "dp_accounting_rdp":
            return _dp_accounting("rdp", q, sigma, steps, delta)
        if name == "dp_accounting_pld":
            return _dp_accounting("pld", q, sigma, steps, delta)
    raise ValueError(f"unknown accountant {name!r}; choose from {', '.join(ACCOUNTANTS)}")


#: the ledger's accountant name (Opacus) -> its name here
LEDGER_NAME = {"rdp": "opacus_rdp", "prv": "opacus_prv"}


@dataclass
class AccountantComparison:
    """ε of one (q, σ, T, δ) under each accountant, with the run's own claim beside it."""

    sample_rate: float
    noise_multiplier: float
    steps: int
    delta: float
    epsilons: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    ledger_accountant: str | None = None  # e.g. "rdp": what the run used
    ledger_epsilon: float | None = None  # ε the run's accountant spent (a claim only if the run is DP)
    poisson: dict[str, Any] | None = None  # poisson_check of the recorded batch sizes

    @property
    def tightest(self) -> str:
        return min(self.epsilons, key=self.epsilons.get)

    @property
    def claim_above_pld(self) -> bool | None:
        """Is the ledger's ε at least dp_accounting's PLD ε (an upper bound on the true ε)?"""
        pld = self.epsilons.get("dp_accounting_pld")
        if self.ledger_epsilon is None or pld is None:
            return None
        return self.ledger_epsilon >= pld * (1 - PLD_SLACK)

    @property
    def claim_near_rdp(self) -> bool | None:
        """Is the ledger's ε within RDP_TOLERANCE of dp_accounting's RDP ε (independent code)?"""
        rdp = self.epsilons.get("dp_accounting_rdp")
        if self.ledger_epsilon is None or rdp is None:
            return None
        # no division: far below a conversion's resolution dp_accounting's ε is exactly 0
        return abs(self.ledger_epsilon - rdp) <= RDP_TOLERANCE * abs(rdp)

    @property
    def ledger_matches(self) -> bool | None:
        """The independent check: claim >= PLD ε, near dp_accounting's RDP ε, and batches Poisson.

        None when there is nothing to check (no ε recorded, or dp_accounting not asked).
        """
        checks = [self.claim_above_pld, self.claim_near_rdp]
        if all(c is None for c in checks):
            return None
        ok = all(c is not False for c in checks)
        if self.poisson is not None and self.poisson.get("consistent") is False:
            ok = False
        return ok

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tightest"] = self.tightest if self.epsilons else None
        d["claim_above_pld"] = self.claim_above_pld
        d["claim_near_rdp"] = self.claim_near_rdp
        d["ledger_matches"] = self.ledger_matches
        return d

    def table(self) -> str:
        """A short text table (the CLI prints it)."""
        lines = [f"q={self.sample_rate:.4g}  σ={self.noise_multiplier:.4g}  steps={self.steps}  δ={self.delta:.3g}"]
        own = LEDGER_NAME.get(self.ledger_accountant or "")
        for name, eps in self.epsilons.items():
            tag = "  <- the run's accountant" if name == own else ""
            lines.append(f"  {name:18s} ε = {eps:8.4f}   ({self.seconds.get(name, float('nan')):.2f} s){tag}")
        if self.ledger_epsilon is not None:
            lines.append(f"  {'ledger':18s} ε = {self.ledger_epsilon:8.4f}   (recorded during training)")
            yes = {True: "yes", False: "NO", None: "n/a"}
            lines.append(f"  claim >= dp_accounting PLD ε: {yes[self.claim_above_pld]};  within {RDP_TOLERANCE:.0%} "
                         f"of dp_accounting RDP ε: {yes[self.claim_near_rdp]}")
        if self.poisson is not None:
            p = self.poisson
            if p.get("steps"):
                lines.append(f"  batch sizes over {p['steps']} steps: mean {p['mean']:.2f} (Poisson: {p['expected_mean']:.2f}),"
                             f" variance {p['var']:.2f} (Poisson: {p['expected_var']:.2f}) -> "
                             f"{'consistent with' if p['consistent'] else 'NOT consistent with'} Poisson sampling")
            else:
                lines.append("  batch sizes: not recorded (no private_diagnostics.json; a run from before they were kept)")
        if self.ledger_matches is not None:
            lines.append(f"  independent cross-check: {'passed' if self.ledger_matches else 'FAILED'}")
        return "\n".join(lines)


def compare(q: float, sigma: float, steps: int, delta: float, names: tuple[str, ...] = ACCOUNTANTS) -> AccountantComparison:
    """ε under each accountant in ``names`` for the same mechanism."""
    _check(q, sigma, steps, delta)
    out = AccountantComparison(float(q), float(sigma), int(steps), float(delta))
    for name in names:
        t = time.perf_counter()
        out.epsilons[name] = epsilon(name, q, sigma, steps, delta)
        out.seconds[name] = time.perf_counter() - t
    return out


def poisson_check(batch_sizes: Mapping[str, Any] | None, q: float, n: int, alpha: float = POISSON_ALPHA) -> dict[str, Any]:
    """Are the recorded logical batch sizes what Poisson sampling at rate q from N gives?

    Under Poisson sampling each step's size is Binomial(N, q): mean qN, variance
    q(1-q)N. Two tests at two-sided level ``alpha`` each: the mean (z-test, its standard
    error sqrt(q(1-q)N / T)) and the variance ((T-1) s^2 / σ^2 ~ χ²(T-1), the normal
    approximation of the binomial). Shuffled fixed-size batches fail the variance test
    (s² ~ 0) once there are a few steps; with T = 1 only the mean is tested.
    """
    import scipy.stats

    b = dict(batch_sizes or {})
    T = int(b.get("steps", 0))
    out: dict[str, Any] = {"steps": T, "expected_mean": q * n, "expected_var": q * (1 - q) * n}
    if T == 0:
        out["consistent"] = None
        return out
    mean = float(b["sum"]) / T
    var = max(float(b["sumsq"]) / T - mean**2, 0.0) * T / (T - 1) if T > 1 else float("nan")
    sd_var = out["expected_var"]
    z = (mean - q * n) / math.sqrt(max(sd_var, 1e-12) / T)
    p_mean = float(2 * scipy.stats.norm.sf(abs(z)))
    p_var = None
    if T > 1 and sd_var > 0:
        c = scipy.stats.chi2.cdf((T - 1) * var / sd_var, T - 1)
        p_var = float(2 * min(c, 1 - c))
    out.update(mean=mean, var=var, z_mean=z, p_mean=p_mean, p_var=p_var,
               consistent=p_mean >= alpha and (p_var is None or p_var >= alpha))
    return out


def from_ledger(ledger: Mapping[str, Any] | str | Path, names: tuple[str, ...] = ACCOUNTANTS) -> AccountantComparison:
    """Cross-check a run's ledger (dict, or a run folder / its ledger.json, read through ``RunDir``).

    The Poisson test needs the per-step batch sizes, which are private (they are in the run's
    ``private_diagnostics.json``, not its ledger.json): a run folder brings them; a dict
    carries them under ``batch_sizes`` (else the test is skipped).

    Raises ``ValueError`` for runs without a DP-SGD mechanism (non-private): there is
    no (q, σ) to account. Paper-mode runs *have* a mechanism, but their ledger claims
    no ε (other reads were unaccounted): the numbers here, and ``ledger_epsilon`` (the
    ε the accountant spent), then describe only the DP-SGD part, not the run.
    """
    if not isinstance(ledger, Mapping):
        from .runs import RunDir

        p = Path(ledger)
        rd = RunDir(p if p.is_dir() else p.parent)
        ledger = rd.ledger()
        if ledger is None:  # a forged or cut ledger proves nothing: refuse it rather than check it
            raise ValueError(f"{rd.ledger_file} is missing or not a valid ledger")
        sizes = (rd.private_diagnostics() or {}).get("batch_sizes")
        ledger = {**ledger, "batch_sizes": sizes or ledger.get("batch_sizes") or {}}  # older runs: in ledger.json
    if ledger.get("mechanism") not in SAMPLED_GAUSSIAN or not ledger.get("noise_multiplier"):
        raise ValueError(f"no DP-SGD mechanism in this ledger (guarantee: {ledger.get('guarantee', '?')}): nothing to account")
    if not ledger.get("steps"):
        raise ValueError("the ledger records 0 steps: nothing to account")
    cmp = compare(ledger["sample_rate"], ledger["noise_multiplier"], ledger["steps"], ledger["delta"], names)
    cmp.ledger_accountant = ledger.get("accountant")
    # a paper-mode ledger keeps the DP-SGD part's ε under its own name; the check is the same
    cmp.ledger_epsilon = ledger.get("epsilon", ledger.get("dpsgd_part_epsilon"))
    if "batch_sizes" in ledger:
        cmp.poisson = poisson_check(ledger["batch_sizes"], ledger["sample_rate"], int(ledger.get("n_private") or 0))
    return cmp


# --------------------------------------------------------------------------- ε over training
def epsilon_curve(sigma: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp",
                  n_points: int = 30) -> tuple[Any, Any]:
    """ε after t steps, t from 1 to ``steps`` (log-spaced), by the accountant training uses.

    RDP composes linearly in the number of steps, so the Rényi divergences of one step
    are computed once (Opacus' own ``compute_rdp`` with the accountant's orders) and
    scaled: the same numbers as ``epsilon_for`` at every t, ~30x faster, which keeps
    the sliders live. Other accountants are asked point by point (``epsilon_for``).
    """
    import numpy as np

    from .engine import epsilon_for

    ts = np.unique(np.geomspace(1, max(int(steps), 1), num=n_points).round().astype(int))
    if accountant != "rdp":
        return ts, np.array([epsilon_for(accountant, sample_rate, sigma, int(t), delta) for t in ts])
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = RDPAccountant.DEFAULT_ALPHAS
    one = np.asarray(compute_rdp(q=sample_rate, noise_multiplier=sigma, steps=1, orders=orders))
    eps = np.array([float(get_privacy_spent(orders=orders, rdp=one * int(t), delta=delta)[0]) for t in ts])
    return ts, eps


__all__ = ["ACCOUNTANTS", "AccountantComparison", "compare", "epsilon", "epsilon_curve", "from_ledger", "poisson_check"]
