"""Paired statistics: is a variant better than a baseline beyond seed and test-set noise?

Runs are paired by (task, target ε, seed): the same seed gives the same splits, the same
initial prefix and the same test subset, so the difference of two paired runs cancels
what they share. Per ε we report the mean paired difference of test accuracy with a 95%
percentile-bootstrap interval that resamples both sources of noise: the seeds (with
replacement) and the test examples (with replacement, one draw shared by the pair, as
both were scored on the same examples). Runs without per-example predictions (older
folders) fall back to a bootstrap over seeds alone, and the table says so.

"Fraction of the DP -> non-private gap closed" is (v - dp) / (nonprivate - dp) on the
same resamples (non-private runs do not depend on ε: a seed's one run pairs at every ε).

Why by hand: scipy.stats.bootstrap resamples one level; this needs two (seeds, examples)
with the example draw shared inside a pair, and a ratio statistic on the same draws.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pandas as pd

from .config import NONPRIVATE_VARIANTS as NONPRIVATE
from .runs import TEST_PREDICTIONS as PREDICTIONS
from .runs import RunDir


def load_correct(row: dict[str, Any] | pd.Series) -> np.ndarray | None:
    """A run's per-example test correctness (0/1, in test-row order), or None if not saved."""
    d = row.get("run_dir") if hasattr(row, "get") else None
    return RunDir(d).test_correct() if isinstance(d, str) and d else None


def _eps_key(t: pd.DataFrame) -> pd.Series:
    return t["target_epsilon"].astype(float).fillna(float("inf"))


def _bootstrap(diffs: list[np.ndarray | float], gaps: list[np.ndarray | float] | None, n_boot: int,
               rng: np.random.Generator, examples: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Bootstrap distribution of the mean paired difference (and of the gap ratio's numerator
    and denominator, combined into a ratio per draw)."""
    k = len(diffs)
    stat = np.empty(n_boot)
    ratio = np.empty(n_boot) if gaps is not None else None
    for b in range(n_boot):
        seeds = rng.integers(0, k, size=k)
        num, den = 0.0, 0.0
        for s in seeds:
            d = diffs[s]
            if examples:
                ix = rng.integers(0, len(d), size=len(d))
                num += d[ix].mean()
                if gaps is not None:
                    den += gaps[s][ix].mean()
            else:
                num += float(d)
                if gaps is not None:
                    den += float(gaps[s])
        stat[b] = num / k
        if ratio is not None:
            ratio[b] = num / den if den != 0 else np.nan
    return stat, ratio


def _cell_rng(seed: int, *cell: Any) -> np.random.Generator:
    """One bootstrap stream per compared cell, so that a cell's interval does not move when
    other cells (another task, a new variant) join the table."""
    import zlib

    return np.random.default_rng([seed, zlib.crc32("|".join(map(str, cell)).encode())])


def paired_differences(table: pd.DataFrame, baseline: str = "dp", metric: str = "accuracy", *,
                       n_boot: int = 2000, confidence: float = 0.95, seed: int = 0,
                       correct: Callable[[Any], np.ndarray | None] = load_correct) -> pd.DataFrame:
    """Per (task, variant, target ε): mean paired difference to ``baseline`` with a bootstrap interval.

    Columns: task, variant, target_epsilon, baseline, n_pairs, mean_diff, ci_low, ci_high,
    crosses_zero, gap_closed, gap_ci_low, gap_ci_high, method. ``correct(row)`` gives a
    run's per-example 0/1 test correctness (default: its ``test_predictions.npz``);
    ``metric`` is the table column used when it is missing.
    """
    cols = ["task", "variant", "target_epsilon", "baseline", "n_pairs", "mean_diff", "ci_low", "ci_high",
            "crosses_zero", "gap_closed", "gap_ci_low", "gap_ci_high", "method"]
    if table is None or table.empty or baseline not in set(table["variant"]):
        return pd.DataFrame(columns=cols)
    if not 0 < confidence < 1 or n_boot < 10:
        raise ValueError("need 0 < confidence < 1 and n_boot >= 10")
    t = table.copy()
    if "task" not in t:
        t["task"] = ""
    t["_eps"] = _eps_key(t)
    alpha = (1 - confidence) / 2
    out = []
    for task, tt in t.groupby("task", sort=True):
        base = tt[tt["variant"] == baseline]
        nonpriv = {int(r["seed"]): r for _, r in tt[tt["variant"].isin(NONPRIVATE)].iterrows()}
        for (variant, eps), vv in tt[tt["variant"] != baseline].groupby(["variant", "_eps"], sort=True):
            eps_list = sorted(set(base["_eps"])) if variant in NONPRIVATE else [eps]
            for e in eps_list:
                bb = {int(r["seed"]): r for _, r in base[base["_eps"] == e].iterrows()}
                vr = {int(r["seed"]): r for _, r in vv.iterrows()}
                seeds = sorted(set(bb) & set(vr))
                if not seeds:
                    continue
                use = metric in ("accuracy", "test_accuracy")  # per-example vectors are 0/1 correctness
                vecs = {s: (correct(vr[s]), correct(bb[s]), correct(nonpriv[s]) if s in nonpriv else None)
                        if use else (None, None, None) for s in seeds}
                examples = metric in ("accuracy", "test_accuracy") and all(a is not None and b is not None and len(a) == len(b) and len(a) > 0
                               for a, b, _ in vecs.values())
                with_gap = variant not in NONPRIVATE and all(s in nonpriv for s in seeds) and (
                    not examples or all(c is not None and len(c) == len(vecs[s][0]) for s, (_, _, c) in vecs.items()))
                if examples:
                    diffs = [vecs[s][0] - vecs[s][1] for s in seeds]
                    gaps = [vecs[s][2] - vecs[s][1] for s in seeds] if with_gap else None
                else:
                    diffs = [float(vr[s][metric]) - float(bb[s][metric]) for s in seeds]
                    gaps = [float(nonpriv[s][metric]) - float(bb[s][metric]) for s in seeds] if with_gap else None
                point = float(np.mean([np.mean(d) for d in diffs]))
                stat, ratio = _bootstrap(diffs, gaps, n_boot, _cell_rng(seed, task, variant, e), examples)
                lo, hi = np.quantile(stat, [alpha, 1 - alpha])
                row = {"task": task, "variant": variant, "target_epsilon": e, "baseline": baseline,
                       "n_pairs": len(seeds), "mean_diff": point, "ci_low": float(lo), "ci_high": float(hi),
                       "crosses_zero": bool(lo <= 0 <= hi),
                       "gap_closed": np.nan, "gap_ci_low": np.nan, "gap_ci_high": np.nan,
                       "method": "bootstrap over seeds and test examples" if examples else "bootstrap over seeds only"}
                if gaps is not None:
                    den = float(np.mean([np.mean(g) for g in gaps]))
                    row["gap_closed"] = point / den if den != 0 else np.nan
                    finite = ratio[np.isfinite(ratio)]
                    if len(finite):
                        row["gap_ci_low"], row["gap_ci_high"] = (float(x) for x in np.quantile(finite, [alpha, 1 - alpha]))
                out.append(row)
    return pd.DataFrame(out, columns=cols)


def paired_interval(diff: np.ndarray, *, n_boot: int = 2000, confidence: float = 0.95,
                    seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of the mean per-example difference of one pair of runs (examples resampled)."""
    stat, _ = _bootstrap([np.asarray(diff, dtype=np.float64)], None, n_boot, np.random.default_rng(seed), True)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(stat, [alpha, 1 - alpha])
    return float(lo), float(hi)


def markdown(paired: pd.DataFrame) -> str:
    """The paired table in markdown; an interval that crosses 0 is marked "n.s." (not separable from 0)."""
    if paired.empty:
        return "(no paired runs)"
    base = paired["baseline"].iloc[0]
    lines = [f"| task | variant | target ε | pairs | Δ test acc vs {base} (95% CI) | crosses 0 | gap closed (95% CI) | method |",
             "|---|---|---|---|---|---|---|---|"]
    for r in paired.itertuples(index=False):
        eps = "∞" if r.target_epsilon == float("inf") else f"{r.target_epsilon:g}"
        gap = "—" if pd.isna(r.gap_closed) else (
            f"{r.gap_closed:+.2f}" + ("" if pd.isna(r.gap_ci_low) else f" [{r.gap_ci_low:+.2f}, {r.gap_ci_high:+.2f}]"))
        lines.append(f"| {r.task} | {r.variant} | {eps} | {r.n_pairs} | {r.mean_diff:+.4f} "
                     f"[{r.ci_low:+.4f}, {r.ci_high:+.4f}] | {'yes (n.s.)' if r.crosses_zero else 'no'} | {gap} | {r.method} |")
    return "\n".join(lines)


__all__ = ["PREDICTIONS", "load_correct", "markdown", "paired_differences", "paired_interval"]
