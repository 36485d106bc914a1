"""Canary audit: an empirical *lower* bound on a training configuration's ε.

Method: the one-run audit of Steinke, Nasr & Jagielski (2023), "Privacy Auditing with
One (1) Training Run" (NeurIPS 2023, arXiv:2305.08846), black-box, input-space canaries.

1. Draw m canaries: train-file rows the run's split used neither as private nor as
   public, each given a wrong label (uniform over the other classes), so that only
   memorisation can make the model fit them.
2. Include each canary in the private training set independently with probability
   1/2 (the secret bits S_i), and train the configuration *through the project's own
   loop* (``dpflat.sweep.trainer``): the canaries are passed as ``extra_private`` and
   appended to the private split the session prepares, so the same Poisson sampling, clipping, noise, accountant
   and flattening levels (paper mode included) see them like any private example. The
   run's claimed ε is that of this audited run (its N includes the included canaries).
3. Score every canary by minus its loss (canary label) under the final model; guess
   "in" for the k+ best-scored, "out" for the k- worst, abstain on the rest.
4. If the run is (ε, δ)-DP, the number of correct guesses W out of r = k+ + k- is
   (up to a δ term) dominated by Binomial(r, e^ε / (1 + e^ε)) (their Theorem 3.1). The
   bound is the largest ε whose p-value P[W >= observed] stays below the significance
   level: with confidence 1 - significance, the configuration is *not* (ε', δ)-DP for
   any ε' below it. A small grid of (k+, k-), fixed before looking at the scores
   (``guess_grid``: in-only, out-only and both sides, at 5/10/25% of m), is tried with a
   Bonferroni correction (significance / grid size), so picking the best stays valid.

Why this method rather than "ε >= log((TPR_lo - δ) / FPR_hi)" with Clopper-Pearson
intervals: the TPR/FPR route needs many independently trained models (one bit per
model) to say anything; the one-run audit gets m bits from one training run, which
is what a CPU budget allows. Its guarantee needs only the independent 1/2 inclusion.

How loose it is. This is a lower bound from one weak attacker (loss threshold on the
final model, natural-text canaries, a handful of canaries): for DP-SGD it is typically
far below the claimed ε (Steinke et al. report ~0.3-2 for ε = 8 with 1000s of canaries
and white-box attacks; black-box with few canaries gets ~0). It can *refute* a claim
(a bound above the claimed ε means a bug or a broken guarantee), never *certify* one:
a bound near 0 says nothing about how private the run is. The largest bound m
canaries can give, even when every guess is right, is log(1 / (α^(-1/r) - 1)) for r
guesses at significance α (δ = 0): ~2.0 for r = 32 and ~2.7 for r = 64 at α = 0.05/3.

The canary runs are ordinary run folders (config, ledger, model) under their own
output root; ``canaries.json`` beside them records the canaries and the secret bits.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.optimize
import scipy.special
import scipy.stats

#: fractions of m guessed (see guess_grid); Bonferroni over the whole grid
DEFAULT_GRID = (0.05, 0.1, 0.25)


# --------------------------------------------------------------------------- the bound
def one_run_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[>= v correct of r guesses] if the training were (ε, δ)-DP (Steinke et al., Thm 3.1).

    m canaries, each included with probability 1/2; r non-abstaining guesses; v correct.
    δ = 0: the Binomial(r, e^ε/(1+e^ε)) tail. δ > 0 adds 2·m·δ·α with
    α = max_i P[v - i <= Binomial < v] / i (their Algorithm / reference code).
    """
    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if eps < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need eps >= 0 and delta in [0, 1], got {eps}, {delta}")
    if v == 0:
        return 1.0
    q = float(scipy.special.expit(eps))
    beta = float(scipy.stats.binom.sf(v - 1, r, q))
    if delta == 0:
        return beta
    i = np.arange(1, v + 1)
    alpha = float(np.max((scipy.stats.binom.sf(v - i - 1, r, q) - beta) / i, initial=0.0))
    return min(beta + alpha * delta * 2 * m, 1.0)


def one_run_epsilon(m: int, r: int, v: int, delta: float, significance: float = 0.05) -> float:
    """Largest ε whose (ε, δ)-DP claim the observation (v of r correct) rejects at ``significance``.

    0.0 when not even ε = 0 is rejected. The p-value grows with ε, so this is a root.
    """
    if not 0 < significance < 1:
        raise ValueError(f"significance must be in (0, 1), got {significance}")
    f = lambda e: significance - one_run_p_value(m, r, v, e, delta)  # noqa: E731 (> 0: rejected)
    if f(0.0) <= 0:
        return 0.0
    hi = 1.0
    while f(hi) > 0:
        if hi > 1e3:
            return math.inf
        hi *= 2
    return float(scipy.optimize.brentq(f, hi / 2 if hi > 1 else 0.0, hi, xtol=1e-6))


def guess_grid(m: int, fractions: tuple[float, ...] = DEFAULT_GRID) -> list[tuple[int, int]]:
    """(k+, k-) pairs: for each fraction f and k = ceil(f·m), guess only "in" (k, 0), only
    "out" (0, k), or both (k, k) (capped so that k+ + k- <= m); duplicates removed.

    One-sided guesses matter: a loss attack on the final model is often sure about one
    side only (e.g. a non-private model fits every included canary, so the canaries
    with the *highest* loss are surely out, while some excluded ones also fit by chance).
    """
    out: list[tuple[int, int]] = []
    for f in fractions:
        k = min(max(1, math.ceil(f * m)), m)
        kk = min(k, m // 2)
        for pair in ((k, 0), (0, k), (kk, kk)):
            if sum(pair) >= 1 and pair not in out:
                out.append(pair)
    return out


def epsilon_lower_bound(scores: np.ndarray, included: np.ndarray, delta: float, significance: float = 0.05,
                        grid: list[tuple[int, int]] | None = None) -> tuple[float, list[dict[str, Any]]]:
    """Bound from canary scores (higher = "in") and the secret inclusion bits.

    Every (k+, k-) of the grid is evaluated at significance / len(grid) (Bonferroni);
    the bound is the largest of them. Returns (bound, per-guess details).
    """
    s = np.asarray(scores, dtype=float)
    inc = np.asarray(included, dtype=bool)
    m = len(s)
    if m != len(inc) or m < 2:
        raise ValueError("need one inclusion bit per score and at least 2 canaries")
    grid = grid or guess_grid(m)
    order = np.argsort(-s, kind="mergesort")  # best first; ties broken by position (fixed, data-independent)
    level = significance / len(grid)
    rows, best = [], 0.0
    for kp, km in grid:
        if kp + km > m:
            raise ValueError(f"k+ + k- = {kp + km} exceeds m = {m}")
        guess_in, guess_out = order[:kp], (order[m - km:] if km else order[:0])
        v = int(inc[guess_in].sum() + (~inc[guess_out]).sum())
        r = kp + km
        eps = one_run_epsilon(m, r, v, delta, level)
        rows.append({"k_plus": kp, "k_minus": km, "guesses": r, "correct": v, "epsilon_lb": eps})
        best = max(best, eps)
    return best, rows


# --------------------------------------------------------------------------- canaries
def make_canaries(cfg, m: int, seed: int = 0):
    """(canary rows, inclusion bits) for a run config; rows keep their train-file ``idx``.

    Canaries are train-file rows outside the run's private and public splits, with a
    wrong label; inclusion bits are independent fair coins (the analysis needs that).
    """
    from datasets import Dataset, Features, Value

    from . import data as data_mod
    from . import splits as splits_mod
    from .config import ConfigError

    if m < 2:
        raise ConfigError(f"an audit needs at least 2 canaries, got {m}")
    card = data_mod.get_task(cfg.data.task)
    raw = data_mod.load_raw(card, cfg.data.data_dir)
    splits = splits_mod.splits_for_config(raw, cfg.data, cfg.train.seed)  # the run's own splits (val_size included)
    used = set(data_mod.column(splits.private, "idx")) | set(data_mod.column(splits.public, "idx"))
    if splits.val is not None:  # canaries must not be validation rows either
        used |= set(data_mod.column(splits.val, "idx"))
    unused = np.array(sorted(set(range(len(raw["train"]))) - used), dtype=np.int64)
    if len(unused) < m:
        raise ConfigError(f"the audit needs {m} train rows outside the run's private/public splits, "
                          f"only {len(unused)} are left: lower train_size or the number of canaries")
    rng = np.random.default_rng([int(cfg.train.seed), int(seed), 0xCA7A])
    rows = np.sort(rng.choice(unused, size=m, replace=False))
    base = raw["train"].select(rows)
    true = np.asarray(data_mod.column(base, "label"), dtype=np.int64)
    K = card.num_labels
    wrong = (true + rng.integers(1, K, size=m)) % K  # uniform over the other classes
    included = rng.random(m) < 0.5
    d = base.to_dict()
    d["label"] = wrong.tolist()
    d["idx"] = rows.tolist()
    feats = Features({**base.features, "idx": Value("int64")})
    return Dataset.from_dict(d, features=feats), included, true


# --------------------------------------------------------------------------- audit
@dataclass
class AuditResult:
    """One canary audit: the bound, how it was reached, and the claim it is compared with."""

    run_id: str  # the audited canary run
    variant: str
    task: str
    canaries: int
    included: int
    epsilon_lower_bound: float
    significance: float  # overall (Bonferroni-corrected across the guess grid)
    delta: float  # δ the bound is stated at (the run's δ; for non-DP runs the config's δ rule)
    claimed_epsilon: float | None
    dpsgd_part_epsilon: float | None  # a run that is not DP as a whole: the DP-SGD part's ε alone
    guarantee: str
    guesses: list[dict[str, Any]]
    canary_auc: float  # informational: AUC of the canary scores (in vs out)
    loss_in: float  # mean canary-label loss of included / excluded canaries
    loss_out: float
    accuracy: float | None  # the audited run's eval accuracy
    seconds: float
    run_dir: str = ""
    method: str = "one-run audit (Steinke, Nasr & Jagielski 2023), loss-threshold black-box attack"
    notes: list[str] = field(default_factory=list)

    @property
    def refutes_claim(self) -> bool:
        """The bound exceeds the claimed ε: the claimed guarantee cannot hold (a bug)."""
        return self.claimed_epsilon is not None and self.epsilon_lower_bound > self.claimed_epsilon

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["refutes_claim"] = self.refutes_claim
        return d

    def table(self) -> str:
        claim = f"claimed ε={self.claimed_epsilon:.3g}" if self.claimed_epsilon is not None else "no ε claimed"
        lines = [
            f"canary audit of {self.variant} ({self.task}): {self.canaries} canaries, {self.included} included; "
            f"{self.guarantee}, {claim}, δ={self.delta:.2g}",
            f"  empirical ε lower bound = {self.epsilon_lower_bound:.3f} at {1 - self.significance:.0%} confidence"
            f" (canary AUC {self.canary_auc:.3f}; loss in {self.loss_in:.3f} / out {self.loss_out:.3f})",
        ]
        for g in self.guesses:
            lines.append(f"    k+={g['k_plus']:<4d} k-={g['k_minus']:<4d} correct {g['correct']}/{g['guesses']}"
                         f"  -> ε >= {g['epsilon_lb']:.3f}")
        if self.refutes_claim:
            lines.append("  THE BOUND EXCEEDS THE CLAIMED ε: the claimed guarantee does not hold")
        lines.append("  (a lower bound from one weak attack: loose; it can refute a claim, never certify one)")
        return "\n".join(lines)


def audit_config(cfg, *, canaries: int = 64, seed: int = 0, out_dir: str | Path | None = None,
                 significance: float = 0.05, grid_fractions: tuple[float, ...] = DEFAULT_GRID,
                 resume: bool = True, noise_seed: int | None = None, secure_rng: bool = False) -> AuditResult:
    """Train ``cfg`` with canaries injected and bound its ε from below (see module doc).

    ``out_dir``: output root of the canary runs (default ``<cfg output_dir>/audit``),
    kept apart from the config's own results table. A finished canary run with the
    same canaries is reused. ``noise_seed`` / ``secure_rng``: the mechanism's randomness
    (default: OS entropy), as for ``dpflat.train.train``.
    """
    from .mia import attack_point_metrics, example_losses, load_run_model
    from .models import load_tokenizer
    from .runs import RunDir, run_id
    from .sweep import trainer

    t0 = time.time()
    can_rows, included, true = make_canaries(cfg, canaries, seed)
    root = Path(out_dir) if out_dir is not None else Path(cfg.train.output_dir) / "audit"
    acfg = cfg.replace(train={"output_dir": str(root), "run_name": f"canary_{run_id(cfg)}_m{canaries}_a{seed}"})
    rd = RunDir.for_config(acfg)
    from . import data as data_mod
    from . import tokens as tokens_mod

    record = {"rows": [int(i) for i in data_mod.column(can_rows, "idx")],
              "labels": [int(x) for x in data_mod.column(can_rows, "label")],
              "true_labels": true.tolist(), "included": included.astype(int).tolist(), "seed": seed}
    if rd.canary_record() not in (None, record):
        raise FileExistsError(f"{rd.path} holds a canary run with other canaries; remove it or change the seed")
    rd.write_canaries(record)
    res = trainer(acfg)(acfg, resume=resume, noise_seed=noise_seed, secure_rng=secure_rng,
                        extra_private=can_rows.select(np.flatnonzero(included)))  # the canaries: private data
    ledger = rd.ledger_as_written()  # validated or not: the audit reports what the run claimed
    _, model = load_run_model(rd.path)
    tok = load_tokenizer(cfg.model)
    scored = example_losses(model, tokens_mod.tokenize(can_rows, tok, cfg.data.max_length, cfg.data.cache_dir),
                            cfg.train.eval_batch_size)
    scores = -scored["loss"]
    delta = ledger.get("delta") or cfg.privacy.resolve_delta(int(ledger.get("n_private") or len(included)))
    grid = guess_grid(canaries, grid_fractions)
    bound, rows = epsilon_lower_bound(scores, included, delta, significance, grid)
    notes = []
    if ledger.get("guarantee") != "(ε, δ)-DP":
        notes.append("δ for a run without a DP claim: the config's δ rule at the run's N")
    result = AuditResult(
        run_id=rd.path.name, variant=cfg.variant, task=cfg.data.task, canaries=canaries,
        included=int(included.sum()), epsilon_lower_bound=bound, significance=significance, delta=float(delta),
        claimed_epsilon=ledger.get("claimed_epsilon"), dpsgd_part_epsilon=ledger.get("dpsgd_part_epsilon"),
        guarantee=ledger.get("guarantee", "?"), guesses=rows,
        canary_auc=attack_point_metrics(scores[included], scores[~included])["auc"] if 0 < included.sum() < canaries else math.nan,
        loss_in=float(scored["loss"][included].mean()) if included.any() else math.nan,
        loss_out=float(scored["loss"][~included].mean()) if (~included).any() else math.nan,
        accuracy=res.get("accuracy"), seconds=time.time() - t0, run_dir=str(rd.path), notes=notes,
    )
    rd.write_audit(result.to_dict())
    return result


def audit_run(run_dir: str | Path, **kw) -> AuditResult:
    """Audit the configuration of a finished (or any) run folder; the run itself is untouched."""
    from .runs import RunDir

    cfg = RunDir(run_dir).config()
    kw.setdefault("out_dir", Path(run_dir).parent / "audit")
    return audit_config(cfg.replace(train={"run_name": None, "progress": False}), **kw)


__all__ = [
    "AuditResult",
    "DEFAULT_GRID",
    "audit_config",
    "audit_run",
    "epsilon_lower_bound",
    "guess_grid",
    "make_canaries",
    "one_run_epsilon",
    "one_run_p_value",
]
