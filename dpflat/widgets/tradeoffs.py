"""Notebook 02 (DP trade-offs): ε against steps, σ against batch size, and live privacy sliders.

The numbers come from the accountant training uses (``dpflat.accountants.epsilon_curve``,
``dpflat.engine.noise_for_target``), so the ε read off a slider is the ε a run spends.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..accountants import epsilon_curve
from ..config import RunConfig
from ..figures import LEGEND_BELOW
from .base import Panel, fmt_delta, log_ticks, new_figure, replace_traces


def epsilon_vs_steps(sigmas: Sequence[float], sample_rate: float, steps: int, delta: float,
                     accountant: str = "rdp", n_points: int = 30):
    """Privacy spent as training goes on, one curve per noise multiplier σ."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for s in sigmas:
        ts, eps = epsilon_curve(s, sample_rate, steps, delta, accountant, n_points)
        fig.add_trace(go.Scatter(x=ts, y=eps, mode="lines", name=f"σ = {s:g}"))
    fig.update_layout(title=f"ε after t steps (q = {sample_rate:.3g}, δ = {fmt_delta(delta)}, {accountant.upper()} accountant)",
                      xaxis_title="steps t", yaxis_title="ε", height=420)
    log_ticks(fig, "x")
    log_ticks(fig, "y")
    return fig


def noise_vs_batch(n: int, epochs: float, epsilon: float, delta: float, batch_sizes: Sequence[int],
                   clip: float = 1.0, accountant: str = "rdp"):
    """σ needed for a target ε at each batch size, and the noise left on the *averaged* gradient.

    Why batch size matters: q = B/N and T = epochs·N/B both change with B; σ grows with
    B, but the noise on the mean gradient is σ·C/B and falls: large batches are cheap
    in privacy (the paper uses B = 1024).
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from ..config import PrivacyConfig
    from ..engine import noise_for_target

    sig, per = [], []
    for b in batch_sizes:
        q = b / n
        t = max(1, int(round(epochs * n / b)))
        s = noise_for_target(PrivacyConfig(epsilon=epsilon, accountant=accountant), q, t, delta)
        sig.append(s)
        per.append(s * clip / b)
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=list(batch_sizes), y=sig, mode="lines+markers", name="σ (noise multiplier)"), secondary_y=False)
    fig.add_trace(go.Scatter(x=list(batch_sizes), y=per, mode="lines+markers", name="noise std on the mean gradient σ·C/B"),
                  secondary_y=True)
    fig.update_layout(title=f"Target ε = {epsilon:g}, δ = {fmt_delta(delta)}, N = {n}, {epochs:g} epochs, C = {clip:g}",
                      xaxis_title="batch size B", height=440, legend=LEGEND_BELOW)
    fig.update_xaxes(type="log", tickvals=list(batch_sizes), ticktext=[str(b) for b in batch_sizes])
    fig.update_yaxes(title_text="σ", secondary_y=False)
    fig.update_yaxes(title_text="σ·C/B (log)", secondary_y=True)
    log_ticks(fig, secondary_y=True)
    return fig


class PrivacyPanel(Panel):
    """Sliders for σ, q, steps, δ (and C) that recompute the ε curve live.

    C does not enter ε (it scales the signal and the noise together); the readout shows
    what it changes: the noise std added to each summed gradient, σ·C.
    """

    def __init__(self, sigma: float = 1.0, sample_rate: float = 0.01, steps: int = 1000, delta_exp: int = -5,
                 clip: float = 1.0, accountant: str = "rdp", n_points: int = 30):
        super().__init__()
        import ipywidgets as w

        self.n_points = n_points
        c = self.controls
        c["sigma"] = w.FloatSlider(value=sigma, min=0.3, max=5.0, step=0.05, description="σ", continuous_update=False)
        c["sample_rate"] = w.FloatLogSlider(value=sample_rate, base=10, min=-4, max=0, step=0.05, description="q",
                                            readout_format=".4f", continuous_update=False)
        c["steps"] = w.IntSlider(value=steps, min=10, max=20000, step=10, description="steps", continuous_update=False)
        c["delta_exp"] = w.IntSlider(value=delta_exp, min=-10, max=-2, description="log10 δ", continuous_update=False)
        c["clip"] = w.FloatSlider(value=clip, min=0.1, max=10.0, step=0.1, description="C", continuous_update=False)
        c["accountant"] = w.Dropdown(options=["rdp", "prv"], value=accountant, description="accountant")
        c["readout"] = w.HTML()
        fig = new_figure(xaxis_title="steps t", yaxis_title="ε", xaxis_type="log", height=380,
                         title="ε spent after t steps")
        view = self._add_figure("epsilon", fig)
        for k in ("sigma", "sample_rate", "steps", "delta_exp", "clip", "accountant"):
            c[k].observe(lambda _ch: self.update(), names="value")
        left = w.VBox([c[k] for k in ("sigma", "sample_rate", "steps", "delta_exp", "clip", "accountant")] + [c["readout"]],
                      layout=w.Layout(min_width="330px"))  # room for the sliders and the readout
        self.widget = w.HBox([left, view], layout=w.Layout(flex_flow="row wrap"))
        self.epsilon: float = math.nan
        self.update()

    @property
    def delta(self) -> float:
        return 10.0 ** self.controls["delta_exp"].value

    def update(self) -> float:
        """Recompute the curve for the current slider values; returns the final ε."""
        import plotly.graph_objects as go

        c = self.controls
        sigma, q, steps, acc = c["sigma"].value, c["sample_rate"].value, c["steps"].value, c["accountant"].value
        try:
            ts, eps = epsilon_curve(sigma, q, steps, self.delta, acc, self.n_points)
        except Exception as e:  # noqa: BLE001 - accountant refusals (e.g. PRV out of range) shown, not raised
            c["readout"].value = f"<b>accountant error:</b> {str(e).splitlines()[0]}"
            return math.nan
        self.epsilon = float(eps[-1])
        replace_traces(self.figures["epsilon"], [
            go.Scatter(x=ts, y=eps, mode="lines", name="ε(t)"),
            go.Scatter(x=[ts[-1]], y=[eps[-1]], mode="markers", marker=dict(size=10), name=f"after {steps} steps"),
        ], title=f"ε after t steps: σ={sigma:.2f}, q={q:.4g}, δ={fmt_delta(self.delta)}, {acc.upper()}")
        epochs = steps * q
        c["readout"].value = (f"<b>ε = {self.epsilon:.3g}</b> at δ = {fmt_delta(self.delta)}<br>"
                              f"≈ {epochs:.3g} epochs (steps × q)<br>"
                              f"noise std on each summed gradient: σ·C = {sigma * c['clip'].value:.3g}")
        self._refresh()
        return self.epsilon


def privacy_panel(**kw: Any) -> PrivacyPanel:
    """Build the σ/q/steps/δ explorer of notebook 02."""
    return PrivacyPanel(**kw)


def run_mechanism(cfg: RunConfig) -> dict[str, Any]:
    """N, q, T and δ a run of this config will have (what its ledger will record).

    Why: the sliders of notebook 02 start from the lessons' own runs, not from a
    textbook setting, so the ε read off the panel is the ε the training cells spend.
    """
    n = cfg.data.train_size
    if n is None:
        raise ValueError("train_size is 'all': give the number of private examples explicitly")
    q = cfg.train.batch_size / n
    steps = max(1, int(round(cfg.train.epochs * -(-n // cfg.train.batch_size))))
    return {"n": int(n), "q": q, "steps": steps, "delta": cfg.privacy.resolve_delta(int(n)),
            "delta_exp": int(math.floor(math.log10(cfg.privacy.resolve_delta(int(n)))))}

