"""A run's guarantee derived from its files, the way ``audit`` checks a claim, not read from them.

Why: ``ledger.json`` states its own guarantee, and ``privacy.valid_ledger`` only checks that the
statement agrees with the file's reads. A ledger edited consistently (paper-mode reads flipped to
"accounted", the label set to DP) passed that check and was shown as "(ε, δ)-DP" by ``report``.
Here the guarantee is derived from three things the label does not control:

- the run's ``config.json``: privacy off is "not DP (non-private)"; a level in paper mode is
  "not DP (paper mode)", whatever the ledger says;
- the recorded reads: an unaccounted one, or an "accounted" one that is not the mechanism's own
  read (``privacy.MECHANISM_READ``: no accountant covers a read it did not make), is paper mode;
- the recorded mechanism: q, steps and δ must be what the config gives at the recorded N, and
  the ε shown is recomputed from (q, σ, steps, δ) by the run's accountant (as ``audit``
  recomputes it); a ledger whose ε does not follow from its mechanism is "unknown guarantee".

What stays trusted: that N and σ are what training used (the σ search is deterministic, but
re-running it costs seconds per run; ``python -m dpflat audit`` cross-checks a run in full).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from .config import ConfigError, RunConfig
from .engine import planned_mechanism
from .privacy import DP, MECHANISM_READ, NOT_DP_NONPRIVATE, NOT_DP_PAPER, SAMPLED_GAUSSIAN, UNKNOWN
from .runs import RunDir, RunFolderError

#: relative difference allowed between the recorded ε (the live accountant's) and the recomputed one
EPS_RTOL = 1e-6


@dataclass(frozen=True)
class Derived:
    """A run's guarantee as derived here, the ε it may show (DP only) and, if not DP, why not."""

    guarantee: str
    epsilon: float | None = None
    reason: str = ""


@lru_cache(maxsize=1024)
def _epsilon(accountant: str, q: float, sigma: float, steps: int, delta: float) -> float:
    """One accountant call (~0.3 s): cached, since a sweep's seeds share their mechanism."""
    from .engine import epsilon_for

    return epsilon_for(accountant, q, sigma, steps, delta)


def _close(a: Any, b: float, rtol: float = 1e-9) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=rtol)
    except (TypeError, ValueError):
        return False


def derive(ledger: Mapping[str, Any] | None, cfg: RunConfig | None) -> Derived:
    """The guarantee a (validated) ledger and the run's config support together (see module doc)."""
    if ledger is None:
        return Derived(UNKNOWN, reason="no valid ledger.json")
    if cfg is None:
        return Derived(UNKNOWN, reason="no readable config.json")
    if not cfg.privacy.enabled:
        return Derived(NOT_DP_NONPRIVATE, reason="config: privacy off")
    mech = ledger.get("mechanism")
    if mech not in SAMPLED_GAUSSIAN:
        return Derived(UNKNOWN, reason=f"ledger mechanism {mech!r} for a DP config")
    reads = ledger.get("reads") or []
    if cfg.flat.paper_levels:
        return Derived(NOT_DP_PAPER, reason=f"config: {', '.join(cfg.flat.paper_levels)} in paper mode")
    if any(not r.get("accounted") or r.get("who") != MECHANISM_READ[mech] for r in reads):
        return Derived(NOT_DP_PAPER, reason="a read of the private split no accountant covers")
    try:
        n = int(ledger["n_private"])
        want_mech, want_q, want_steps = planned_mechanism(cfg, n)
        q, sigma, steps, delta = (float(ledger["sample_rate"]), float(ledger["noise_multiplier"]),
                                  int(ledger["steps"]), float(ledger["delta"]))
        problems = [name for name, ok in (
            ("mechanism", mech == want_mech), ("sample_rate", _close(q, want_q)), ("steps", steps == want_steps),
            ("delta", _close(delta, cfg.privacy.resolve_delta(n))),
            ("max_grad_norm", _close(ledger.get("max_grad_norm"), cfg.privacy.max_grad_norm)),
            ("accountant", ledger.get("accountant") == cfg.privacy.accountant),
            ("target_epsilon", _close(ledger.get("target_epsilon"), cfg.privacy.epsilon))) if not ok]
        if problems:
            return Derived(UNKNOWN, reason=f"ledger {', '.join(problems)} not what config.json gives")
        eps = _epsilon(cfg.privacy.accountant, q, sigma, steps, delta)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:  # ConfigError is a ValueError
        return Derived(UNKNOWN, reason=f"ledger mechanism unusable ({e})")
    if not _close(ledger.get("epsilon"), eps, EPS_RTOL):
        return Derived(UNKNOWN, reason=f"ledger ε {ledger.get('epsilon')} does not follow from its mechanism ({eps:.6g})")
    if eps > cfg.privacy.epsilon * (1 + 1e-9):
        return Derived(UNKNOWN, reason=f"the recorded mechanism gives ε={eps:.6g}, above the target")
    return Derived(DP, epsilon=eps)


def derive_run(run_dir: str | Path) -> Derived:
    """:func:`derive` for a run folder (its ledger and config read through ``RunDir``)."""
    rd = RunDir(run_dir)
    try:
        cfg = rd.config()
    except (OSError, ConfigError, RunFolderError):
        cfg = None
    return derive(rd.ledger(), cfg)


__all__ = ["Derived", "derive", "derive_run"]
