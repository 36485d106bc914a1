"""Notebook 06 (privacy audit): membership inference and canary audits beside each claim.

The attacks are computed in ``dpflat.mia`` / ``dpflat.audit``; here they are drawn next
to the guarantee each run's ledger states, with the ROC region a claimed (ε, δ) allows.
``attack_runs`` and ``attack_cost_figure`` bring the attack to 01's payoff and 04's explorer:
accuracy against ε beside the attacker's advantage against ε and the bound the claim implies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..figures import eps_column, guarantee_pattern, is_missing, metric_traces, run_color, run_label
from ..mia import record_result as record_mia  # noqa: F401 - the notebooks' name
from ..mia import roc_curve as mia_roc  # noqa: F401 - the notebooks' name
from ..privacy import DP
from ..runs import RunDir, load_results
from .base import as_row


def mia_label(result: Any) -> str:
    """``run_label`` of an attacked run, from the guarantee and claimed ε its ledger recorded."""
    return run_label({"variant": result.variant, "epsilon": result.claimed_epsilon, "guarantee": result.guarantee})


def dp_roc_bound(epsilon: float, delta: float, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """The highest TPR any membership test can reach at each FPR against an (ε, δ)-DP run.

    TPR <= min(1, e^ε·FPR + δ, 1 - e^-ε·(1 - δ - FPR)) (Kairouz, Oh & Viswanath 2015):
    the region a claimed guarantee allows; an attack above it refutes the claim.
    """
    fpr = np.concatenate([[0.0], np.geomspace(1e-5, 1.0, n)])
    e = math.exp(epsilon)
    tpr = np.minimum.reduce([np.ones_like(fpr), e * fpr + delta, 1.0 - (1.0 - delta - fpr) / e])
    return fpr, np.clip(tpr, 0.0, 1.0)


def needs_attack(run_dir: Any) -> bool:
    """True when a run has no attack result that states the membership advantage (none yet, or a
    ``mia.json`` written before the advantage was measured): the runs 01 and 04 attack."""
    d = RunDir(run_dir).mia() or {}
    adv = (d.get("loss") or {}).get("advantage")
    return is_missing(adv)


def attack_runs(rows: Sequence[Mapping[str, Any]], *, max_per_side: int = 200, n_bootstrap: int = 200, seed: int = 0,
                reference: Any = "init") -> pd.DataFrame:
    """Membership inference (``dpflat.mia.attack_run``) on every run of ``rows`` that ``needs_attack``;
    returns the rows with their ``mia_*`` columns (``mia_advantage``: best TPR − FPR).

    Each attack is saved beside its run (``mia.json``) and recorded in the results table, so a run
    attacked once (here, in 04's runner or in 06) is read back, not attacked again. The attack reads the
    private examples *after* training: an auditor's measurement, outside the run's guarantee.
    """
    from ..mia import attack_run, record_result, save_result

    rows = [as_row(r) for r in rows]
    for r in rows:
        if needs_attack(r["run_dir"]):
            res = attack_run(r["run_dir"], reference=reference, max_per_side=max_per_side, n_bootstrap=n_bootstrap,
                             seed=seed)
            save_result(res, r["run_dir"])
            record_result(res)
    out = []
    for r in rows:
        t = load_results(RunDir(r["run_dir"]).path.parent)
        hit = t[t["run_id"] == RunDir(r["run_dir"]).path.name] if len(t) and "run_id" in t else t
        extra = {k: v for k, v in (hit.iloc[0].to_dict() if len(hit) else {}).items() if str(k).startswith("mia_")}
        out.append({**r, **extra})
    return pd.DataFrame(out)


def attack_cost_figure(table: pd.DataFrame | Sequence[Mapping[str, Any]], variants: Sequence[str] | None = None,
                       eps_range: tuple[float, float] | None = None, title: str | None = None):
    """Both sides of the trade-off in one figure: accuracy against target ε (the cost) beside the
    membership-inference advantage against ε (what an attacker gains), with the bound the DP claim implies.

    Left: test accuracy, mean ± std over seeds, one line per variant (``metric_traces``: a run without ε is a
    dashed line). Right, in the same colours: ``mia_advantage``, the loss attack's best TPR − FPR
    (``dpflat.mia``); black: the most *any* attacker can reach against an (ε, δ)-DP run,
    (e^ε − 1 + 2δ)/(e^ε + 1) (``mia.dp_advantage_bound``), against the target ε (a run's claimed ε is at
    most its target, so its own limit lies on or under the curve); grey dotted: the level 95% of attacks
    that learn nothing stay below with the rows' n examples per side (``mia.advantage_chance_level``): the
    threshold is fit on the scored examples, so "no leakage" does not read 0.
    ``table``: results rows (a DataFrame or row dicts); without ``mia_advantage`` values the right panel
    shows the bound alone and says that no run was attacked.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from ..mia import advantage_chance_level, dp_advantage_bound

    t = table if isinstance(table, pd.DataFrame) else pd.DataFrame([as_row(r) for r in table])
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1, subplot_titles=(
        "the cost: test accuracy",
        "the attacker: membership advantage TPR − FPR<br>(a private diagnostic: it reads the private split)"))
    eps = eps_column(t) if len(t) else pd.Series(dtype=float)
    if variants is not None and len(t):
        eps = eps[t["variant"].isin(list(variants))]
    if eps_range is not None:
        eps = eps[(eps >= eps_range[0] - 1e-9) & (eps <= eps_range[1] + 1e-9)]
    eps = eps.dropna()
    x_lo, x_hi = (float(eps.min()), float(eps.max())) if len(eps) else (eps_range or (1.0, 8.0))
    g_lo, g_hi = min(0.5, x_lo / 2), max(8.0, 2 * x_hi)  # the bound's whole shape: near 0 to near 1
    attacked = "mia_advantage" in t.columns and pd.to_numeric(t["mia_advantage"], errors="coerce").notna().any()
    for col, metric in ((1, "accuracy"), (2, "mia_advantage")):
        if metric not in t.columns or not pd.to_numeric(t[metric], errors="coerce").notna().any():
            continue
        for tr in metric_traces(t, metric, variants, eps_range):
            tr.legendgroup = tr.name
            tr.showlegend = col == 1
            if tr.line.dash == "dash":  # a run without ε: a reference line over the whole axis
                tr.x = [g_lo, g_hi]
            fig.add_trace(tr, row=1, col=col)
    if "delta" in t.columns and (t.get("guarantee") == DP).any():
        delta = float(pd.to_numeric(t.loc[t["guarantee"] == DP, "delta"], errors="coerce").max())
    else:
        delta = 0.0
    delta = 0.0 if math.isnan(delta) else delta
    grid = np.geomspace(g_lo, g_hi, 60)
    bound = np.array([dp_advantage_bound(e, delta) for e in grid])
    fig.add_trace(go.Scatter(
        x=grid, y=bound, mode="lines", line=dict(color="black", width=2),
        name=f"the most any attacker can reach if (ε, δ)-DP holds: (e^ε − 1 + 2δ)/(e^ε + 1), δ = {delta:.2g}",
        customdata=np.exp(grid),
        hovertemplate="ε = %{x:.2g}: advantage ≤ %{y:.3f}; an attacker's odds change at most e^ε ≈ "
                      "%{customdata:.3g}x<extra></extra>"), row=1, col=2)
    if attacked and "mia_per_side" in t.columns and pd.to_numeric(t["mia_per_side"], errors="coerce").notna().any():
        n = int(pd.to_numeric(t["mia_per_side"], errors="coerce").min())
        floor = advantage_chance_level(n, quantile=0.95)
        fig.add_trace(go.Scatter(
            x=[g_lo, g_hi], y=[floor, floor], mode="lines", line=dict(color="gray", dash="dot"),
            name=f"95% of attacks that learn nothing stay below {floor:.3f} ({n} examples per side)",
            hoverinfo="name"), row=1, col=2)
    if not attacked:
        fig.add_annotation(text="no run attacked yet (notebook 04: attack = True)", showarrow=False,
                           xref="x2 domain", yref="y2 domain", x=0.5, y=0.5)
    fig.update_xaxes(type="log", title_text="target ε (a claim only for (ε, δ)-DP runs)")
    fig.update_yaxes(title_text="test accuracy", row=1, col=1)
    fig.update_yaxes(title_text="TPR − FPR (best threshold)", range=[0, 1.02], row=1, col=2)
    fig.update_layout(title=title or "Both sides of the trade-off: what privacy costs and what an attacker gains",
                      height=480, legend=dict(orientation="h", xanchor="left", x=0.0, yanchor="top", y=-0.2),
                      margin=dict(t=90, b=10))
    return fig


def mia_table(results: Sequence[Any]) -> pd.DataFrame:
    """The attacks next to each run's guarantee: point estimates with their bootstrap CIs.

    "ε spent by DP-SGD" is the accountant's number for the noisy steps; for a run that
    is not DP it describes only those steps, which is why "claimed ε" stays "none".
    """
    fmt = lambda v, ci: f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"  # noqa: E731
    out = []
    for r in results:
        a = r.loss
        row = {
            "model": mia_label(r),
            "guarantee": r.guarantee,
            "claimed ε": "none" if is_missing(r.claimed_epsilon) else round(float(r.claimed_epsilon), 2),
            "δ": r.delta,
            "DP-SGD part ε (run not DP)": "—" if is_missing(r.dpsgd_part_epsilon) else round(float(r.dpsgd_part_epsilon), 2),
            "AUC": fmt(a.auc, a.auc_ci),
            "TPR@1%FPR": fmt(a.tpr_at_1_fpr, a.tpr_at_1_fpr_ci),
            "TPR@0.1%FPR": fmt(a.tpr_at_0_1_fpr, a.tpr_at_0_1_fpr_ci),
            "attack accuracy": fmt(a.accuracy, a.accuracy_ci),
            "members / non-members": f"{r.n_members} / {r.n_nonmembers} ({r.nonmember_source})",
            "task acc. members / non-members": f"{r.member_accuracy:.3f} / {r.nonmember_accuracy:.3f}",
        }
        if r.calibrated is not None:
            row["calibrated AUC"] = fmt(r.calibrated.auc, r.calibrated.auc_ci)
        out.append(row)
    return pd.DataFrame(out)


def mia_roc_figure(rocs: Mapping[str, tuple[np.ndarray, np.ndarray]], results: Mapping[str, Any] | None = None,
                   log: bool = True):
    """ROC curves of the attack per model; for every (ε, δ)-DP model, the bound its claim implies.

    Log-log axes (Carlini et al. 2022): what matters is TPR at *low* FPR, where a few
    confidently identified members are a real breach.
    """
    import plotly.graph_objects as go

    fig = go.Figure()
    # Resolution: with n non-members the smallest non-zero FPR is 1/n; below it an empirical
    # ROC says nothing (a step at FPR 0 would sit above any claim's limit by construction),
    # so each curve and the axis start at 1/n (the largest over the models).
    steps = [float(np.min(np.asarray(f)[np.asarray(f) > 0])) for f, _ in rocs.values() if np.any(np.asarray(f) > 0)]
    lo = max(steps) if steps else 1e-3
    for label, (fpr, tpr) in rocs.items():
        color = run_color(label)
        fpr, tpr = np.asarray(fpr, dtype=float), np.asarray(tpr, dtype=float)
        keep = fpr >= lo - 1e-12 if log else np.ones_like(fpr, dtype=bool)
        fig.add_trace(go.Scatter(x=fpr[keep], y=np.maximum(tpr[keep], lo) if log else tpr, mode="lines", name=label,
                                 line=dict(color=color, shape="hv")))
        r = (results or {}).get(label)
        if r is not None and r.guarantee == DP and not is_missing(r.claimed_epsilon):
            bf, bt = dp_roc_bound(float(r.claimed_epsilon), float(r.delta or 0.0))
            kb = bf >= lo if log else np.ones_like(bf, dtype=bool)
            fig.add_trace(go.Scatter(x=bf[kb], y=np.maximum(bt[kb], lo) if log else bt,
                                     mode="lines", line=dict(color=color, dash="dot"),
                                     name=f"limit of its claim ({label})"))
    grid = np.geomspace(lo, 1, 50) if log else np.linspace(0, 1, 50)
    fig.add_trace(go.Scatter(x=grid, y=grid, mode="lines", line=dict(color="gray", dash="dash"), name="chance"))
    kind = "log" if log else "linear"
    fig.update_layout(title="Membership inference (loss threshold): ROC per model",
                      xaxis_title=(f"false positive rate (from 1/n = {lo:.2g}: the attack's resolution with n "
                                   "non-members)" if log else "false positive rate"),
                      yaxis_title="true positive rate", xaxis_type=kind, yaxis_type=kind, height=480)
    if log:
        fig.update_xaxes(range=[math.log10(lo), 0])
        fig.update_yaxes(range=[math.log10(lo), 0])
    return fig


def mia_bars(results: Sequence[Any]):
    """AUC with its bootstrap interval, one bar per model; 0.5 = the attacker learns nothing."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for r in results:
        a = r.loss
        fig.add_trace(go.Bar(x=[mia_label(r)], y=[a.auc], name=mia_label(r),
                             error_y=dict(type="data", symmetric=False, array=[a.auc_ci[1] - a.auc],
                                          arrayminus=[a.auc - a.auc_ci[0]]),
                             marker=dict(color=run_color(mia_label(r)), pattern_shape=guarantee_pattern(r.guarantee))))
    fig.add_hline(y=0.5, line_dash="dash", line_color="gray", annotation_text="chance")
    fig.update_layout(title="Attack AUC with 95% bootstrap interval", yaxis_title="AUC", showlegend=False, height=420)
    return fig


def audit_bars(audits: Sequence[Any]):
    """Claimed ε (where there is one) next to the canary audit's empirical lower bound."""
    import plotly.graph_objects as go

    labels = [run_label({"variant": a.variant, "epsilon": a.claimed_epsilon, "guarantee": a.guarantee}) for a in audits]
    lower = [float(a.epsilon_lower_bound) for a in audits]
    claimed = [None if is_missing(a.claimed_epsilon) else float(a.claimed_epsilon) for a in audits]
    fig = go.Figure([
        # a bound of 0 is a real result (no evidence against the claim): its value is written on the axis
        go.Bar(x=labels, y=lower, name="empirical ε lower bound (canary audit)",
               text=[f"{v:.2g}" + (" (no evidence of leakage)" if v == 0 else "") for v in lower],
               textposition="outside", marker_line=dict(width=2, color="#1f77b4")),
        go.Bar(x=labels, y=claimed, name="claimed ε (ledger; none for a run that is not DP)",
               text=["none" if v is None else f"{v:.3g}" for v in claimed], textposition="outside"),
    ])
    fig.update_layout(barmode="group", yaxis_title="ε", height=420,
                      title="A claim is refuted only if the lower bound rises above it")
    return fig
