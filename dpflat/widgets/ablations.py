"""Notebook 05 (ablations): switch each flattening level and its mode, train, compare.

The variant name is derived from the switches (``ablation_name``), so two ablations
never share a run folder; the guarantee shown is the ledger's once a run finishes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from ..config import PAPER_AWP_GAMMA, FlatConfig, RunConfig
from ..figures import (LEGEND_BELOW, aggregate, eps_column, error_bars, group_label, guarantee_pattern, run_color,
                       run_label)
from ..runs import RunDir, load_results
from .base import Panel, new_figure, replace_traces
from .setup import SetupStatus


LEVELS = ("awp", "layers", "distill")


def n_layers(backbone: str) -> int:
    """Encoder depth of a backbone (bounds the number of prefix layers one can drop)."""
    from ..models import TINY, resolve_backbone, tiny_config

    if backbone in TINY:
        return int(tiny_config(backbone).num_hidden_layers)
    try:
        from transformers import AutoConfig

        return int(AutoConfig.from_pretrained(resolve_backbone(backbone)).num_hidden_layers)
    except Exception:  # noqa: BLE001 - only bounds a slider
        return 12


#: the training loss is computed on private batches and is not released: every place that shows it says so
PRIVATE_LOSS_LABEL = "training loss (private diagnostic, outside the release)"

# A right-hand axis over another: plotly.js defaults it to tickmode "sync" (ticks placed at the left
# axis's grid lines), which labelled accuracy 0.174, 0.432, 0.689 and clipped the top one. Own ticks,
# no second grid.
Y2_TICKS = {"tickmode": "array", "showgrid": False}


def ablation_name(flat: Mapping[str, Any]) -> str:
    """A readable, distinct variant name for a combination of levels, modes and settings.

    Presets keep their names ("dp", "dp+awp-safe", "dpflat-paper"); other mixes list
    each level with its mode; settings off their defaults are appended (``_g`` γ,
    ``_l`` λ, ``_k`` dropped layers), so two ablations never share a name.
    """
    on = [lv for lv in LEVELS if flat.get(lv)]
    if not on:
        return "dp"
    modes = {lv: flat.get(f"{lv}_mode", "safe") for lv in on}
    if len(set(modes.values())) == 1:
        mode = next(iter(modes.values()))
        name = ("dpflat" if len(on) == 3 else "dp+" + "+".join(on)) + f"-{mode}"
    else:
        name = "dp+" + "+".join(f"{lv}.{modes[lv]}" for lv in on)
    d = FlatConfig()
    if "awp" in on:
        default_g = PAPER_AWP_GAMMA if modes["awp"] == "paper" else d.awp_gamma
        if not math.isclose(float(flat.get("awp_gamma", default_g)), default_g, rel_tol=1e-9):
            name += f"_g{float(flat['awp_gamma']):.3g}"
    if "layers" in on and int(flat.get("n_drop", d.n_drop)) != d.n_drop:
        name += f"_k{int(flat['n_drop'])}"
    if "distill" in on and not math.isclose(float(flat.get("distill_lambda", d.distill_lambda)), d.distill_lambda, rel_tol=1e-9):
        name += f"_l{float(flat['distill_lambda']):.3g}"
    return name


class AblationPanel(Panel):
    """Switch each flattening level and its mode, set γ, λ, n_drop and ε, train, compare.

    ``launch`` trains the chosen configuration with live progress (``train(on_step=...)``
    feeds ``figures["live"]``) and then redraws ``figures["compare"]``: every run of the
    results table, labelled with its guarantee, the new one outlined.
    """

    def __init__(self, base: RunConfig, epsilon: float | None = None):
        super().__init__()
        import ipywidgets as w

        self.base = base
        d = base.flat
        depth = n_layers(base.model.backbone)
        c = self.controls
        style = {"description_width": "initial"}
        c["epsilon"] = w.FloatLogSlider(value=epsilon or base.privacy.epsilon, base=10, min=-0.5, max=1.5, step=0.05,
                                        description="target ε", continuous_update=False)
        c["awp"] = w.Checkbox(value=d.awp, description="within-layer: AWP", style=style)
        c["awp_mode"] = w.ToggleButtons(options=["safe", "paper"], value=d.awp_mode)
        c["awp_gamma"] = w.FloatLogSlider(value=d.awp_gamma, base=10, min=-5, max=-0.5, step=0.1, description="γ",
                                          readout_format=".1e", continuous_update=False)
        c["layers"] = w.Checkbox(value=d.layers, description="cross-layer: drop prefix layers", style=style)
        c["layers_mode"] = w.ToggleButtons(options=["safe", "paper"], value=d.layers_mode)
        c["n_drop"] = w.IntSlider(value=min(d.n_drop, depth - 1), min=0, max=max(depth - 1, 0), description="n_drop")
        c["distill"] = w.Checkbox(value=d.distill, description="cross-model: distill", style=style)
        c["distill_mode"] = w.ToggleButtons(options=["safe", "paper"], value=d.distill_mode)
        c["distill_lambda"] = w.FloatLogSlider(value=d.distill_lambda, base=10, min=-4, max=0, step=0.1, description="λ",
                                               readout_format=".1e", continuous_update=False)
        c["name"] = w.HTML()
        c["launch"] = w.Button(description="Train", button_style="primary", icon="play")
        c["progress"] = w.IntProgress(value=0, min=0, max=1, description="steps")
        c["status"] = w.HTML()
        c["log"] = w.Output()
        c["awp_mode"].observe(self._on_awp_mode, names="value")
        for k in ("epsilon", "awp", "awp_mode", "awp_gamma", "layers", "layers_mode", "n_drop", "distill",
                  "distill_mode", "distill_lambda"):
            c[k].observe(lambda _ch: self._sync(), names="value")
        c["launch"].on_click(lambda _b: self.launch())
        live = new_figure(title="live: training loss (a private diagnostic) and val accuracy", xaxis_title="step",
                          yaxis_title=PRIVATE_LOSS_LABEL,
                          yaxis2=dict(title="val accuracy", overlaying="y", side="right", range=[0, 1],
                                      **Y2_TICKS, tickvals=[0, 0.25, 0.5, 0.75, 1]), height=380, legend=LEGEND_BELOW)
        live.add_scatter(x=[], y=[], mode="lines", name=PRIVATE_LOSS_LABEL)
        live.add_scatter(x=[], y=[], mode="lines+markers", name="val accuracy (selects the checkpoint)", yaxis="y2")
        v_live = self._add_figure("live", live)
        sharp = new_figure(title="live: sharpness (public data, a diagnostic) beside the ε spent so far",
                           xaxis_title="step", yaxis_title="top Hessian eigenvalue λ1",
                           yaxis2=dict(title="ε spent so far", overlaying="y", side="right", rangemode="tozero",
                                       **{**Y2_TICKS, "tickmode": "auto"}),
                           height=360, legend=LEGEND_BELOW)
        sharp.add_scatter(x=[], y=[], mode="lines+markers", name="λ1 (sharpness trajectory)")
        sharp.add_scatter(x=[], y=[], mode="lines+markers", name="ε spent (accountant)", yaxis="y2",
                          line=dict(dash="dot"))
        v_sharp = self._add_figure("sharpness", sharp)
        self._traj_seen = 0
        v_cmp = self._add_figure("compare", new_figure(height=420))
        c["legend"] = w.HTML(ABLATION_LEGEND)
        self.last: dict[str, Any] | None = None
        self._run_dir: Path | None = None
        self._epochs = base.train.epochs
        levels = w.VBox([
            w.HBox([c["awp"], c["awp_mode"], c["awp_gamma"]]),
            w.HBox([c["layers"], c["layers_mode"], c["n_drop"]]),
            w.HBox([c["distill"], c["distill_mode"], c["distill_lambda"]]),
        ])
        self.widget = w.VBox([c["epsilon"], levels, w.HBox([c["launch"], c["name"]]), c["progress"], c["status"],
                              v_live, v_sharp, v_cmp, c["legend"], c["log"]])
        self._sync()
        self.refresh_compare()

    def _on_awp_mode(self, change: dict[str, Any]) -> None:
        """Each mode has its own γ default (apply_variant's rule): switch γ with the mode."""
        self.controls["awp_gamma"].value = PAPER_AWP_GAMMA if change["new"] == "paper" else FlatConfig().awp_gamma

    def flat_settings(self) -> dict[str, Any]:
        c = self.controls
        return {k: c[k].value for k in ("awp", "awp_mode", "awp_gamma", "layers", "layers_mode", "n_drop",
                                        "distill", "distill_mode", "distill_lambda")}

    def config(self) -> RunConfig:
        """The run config the controls describe (DP always on: this is an ablation of DP-Flat)."""
        flat = self.flat_settings()
        return self.base.replace(privacy={"enabled": True, "epsilon": round(float(self.controls["epsilon"].value), 3)},
                                 flat=flat, variant=ablation_name(flat))

    def _sync(self) -> None:
        c = self.controls
        for lv, params in (("awp", ("awp_mode", "awp_gamma")), ("layers", ("layers_mode", "n_drop")),
                           ("distill", ("distill_mode", "distill_lambda"))):
            for p in params:
                c[p].disabled = not c[lv].value
        paper = self.config().flat.paper_levels
        note = (f" · <span style='color:#d62728'>paper mode ({', '.join(paper)}) reads private data outside "
                "the accountant: the run will be labelled not DP</span>") if paper else ""
        c["name"].value = f"variant <code>{self.config().variant}</code>{note}"
        # the button says it too: the next Train of a panel left in paper mode trains a run that is not DP
        c["launch"].description = "Train (paper mode: not DP)" if paper else "Train"
        c["launch"].button_style = "danger" if paper else "primary"

    def on_step(self, row: Mapping[str, Any]) -> None:
        """``train(on_step=...)`` callback: extend the live curves and the progress bar."""
        c = self.controls
        live = self.figures["live"]
        step = int(row["step"])
        if row.get("epoch"):
            c["progress"].max = max(c["progress"].max, int(round(step / float(row["epoch"]) * self._epochs)))
        c["progress"].value = min(step, c["progress"].max)
        loss_t, acc_t = live.data[0], live.data[1]
        loss = row.get("train_loss_private", row.get("loss"))  # private diagnostic: not covered by the guarantee
        loss_t.x, loss_t.y = tuple(loss_t.x or ()) + (step,), tuple(loss_t.y or ()) + (float(loss),)
        if "eval_accuracy" in row:
            acc_t.x, acc_t.y = tuple(acc_t.x or ()) + (step,), tuple(acc_t.y or ()) + (float(row["eval_accuracy"]),)
        if "epsilon" in row:  # only rows of a run that is DP as a whole carry it
            eps = f", ε spent so far {row['epsilon']:.2f}"
        elif "dpsgd_part_epsilon" in row:
            eps = f", not DP (DP-SGD part alone {row['dpsgd_part_epsilon']:.2f})"
        else:
            eps = ""
        c["status"].value = f"step {step}{eps}"
        sharp = self.figures["sharpness"]
        if "epsilon" in row:
            e_t = sharp.data[1]
            e_t.x, e_t.y = tuple(e_t.x or ()) + (step,), tuple(e_t.y or ()) + (float(row["epsilon"]),)
        self._draw_trajectory()
        self._refresh()

    def _draw_trajectory(self) -> None:
        """λ1 points the run has written to its ``sharpness.jsonl`` so far (read when it grows)."""
        if self._run_dir is None:
            return
        traj = RunDir(self._run_dir).trajectory()
        if len(traj) != self._traj_seen:
            self._traj_seen = len(traj)
            t0 = self.figures["sharpness"].data[0]
            t0.x, t0.y = [t["step"] for t in traj], [t["top_eigenvalue"] for t in traj]
            self._refresh()

    def launch(self) -> dict[str, Any]:
        """Train the configured run (a finished one is loaded from its folder) and compare it."""
        from ..sweep import trainer

        cfg = self.config()
        self._epochs = cfg.train.epochs
        c = self.controls
        live = self.figures["live"]
        for t in (*live.data, *self.figures["sharpness"].data):
            t.x, t.y = (), ()
        self._run_dir, self._traj_seen = RunDir.for_config(cfg).path, 0
        c["progress"].value, c["progress"].max = 0, 1
        c["launch"].disabled = True
        c["status"].value = f"training {cfg.variant} at target ε={cfg.privacy.epsilon:g} ..."
        live.update_layout(title=f"live: {cfg.variant} (its guarantee is the ledger's, once it finishes)")
        # a paper-mode run claims no ε: say why its ε axis stays empty instead of leaving it blank
        self.figures["sharpness"].update_layout(yaxis2_title="ε spent so far" if not cfg.flat.paper_levels else
                                                "no ε: paper mode is not DP")
        try:
            with c["log"]:
                with SetupStatus(enabled=cfg.train.progress) as status:
                    row = trainer(cfg)(cfg, on_step=self.on_step, on_phase=status.on_phase)
        finally:
            c["launch"].disabled = False
        loaded = not live.data[0].x
        if loaded:  # a run read back from its folder: draw its stored curves
            for m in RunDir(row["run_dir"]).metrics():
                self.on_step(m)
        self._draw_trajectory()
        c["progress"].value = c["progress"].max
        self.last = row
        live.update_layout(title=f"training loss (private diagnostic) and val accuracy: {run_label(row)}")
        done = ("already trained, read back from its folder (change a control to train another configuration)"
                if loaded else "done")
        c["status"].value = f"{done}: <b>{run_label(row)}</b>, test accuracy {row['accuracy']:.3f}"
        self.refresh_compare()
        return row

    def results(self) -> pd.DataFrame:
        """The output folder's results table (empty before the first run has made the folder)."""
        out = Path(self.base.train.output_dir)
        return load_results(out) if out.is_dir() else pd.DataFrame()

    def refresh_compare(self) -> None:
        """Bars of accuracy per (variant, target ε), mean ± std over seeds, with guarantees."""
        import plotly.graph_objects as go

        table = self.results()
        traces = []
        if len(table):
            key = table["variant"].astype(str) + "|" + eps_column(table).fillna(-1.0).map("{:g}".format)
            last_id = (self.last or {}).get("run_id")
            for k, rows in table.groupby(key, sort=True):
                a = aggregate(rows, "accuracy")
                if a.empty:
                    continue
                r = a.iloc[0]
                label = group_label(rows, r.claimed_epsilon)
                is_last = last_id is not None and last_id in set(rows["run_id"])
                traces.append(go.Bar(
                    x=[label], y=[r["mean"]], error_y=error_bars([r["std"]], [r["n"]]), name=label,
                    marker=dict(color=run_color(label), pattern_shape=guarantee_pattern(r.guarantee),
                                line=dict(width=4 if is_last else 0, color="black")),
                ))
        replace_traces(self.figures["compare"], traces,
                       title="test accuracy of every run in this results table (outlined: the last one trained; "
                             "error bar: std over seeds, none for one seed; hatched: not DP)",
                       yaxis_title="test accuracy", yaxis_range=[0, 1], showlegend=False)
        self._refresh()


ABLATION_LEGEND = (
    "<small><b>variant names</b>: <code>dp</code> plain DP-SGD · <code>dp+awp</code>, <code>dp+layers</code>, "
    "<code>dp+distill</code> one level · <code>dpflat</code> all three · suffix <code>-safe</code>/<code>-paper</code>: "
    "the mode of every level (mixed modes: <code>level.mode</code>) · settings off their defaults: "
    "<code>_g</code> AWP γ, <code>_k</code> n_drop (prefix layers dropped by the cross-layer level), "
    "<code>_l</code> distillation λ. Example: <code>dp+awp+layers-safe_k1</code> = AWP and cross-layer "
    "selection in safe mode, dropping 1 layer.</small>")


def ablation_panel(base: RunConfig, **kw: Any) -> AblationPanel:
    """Build the level/mode/γ/λ/n_drop panel of notebook 05."""
    return AblationPanel(base, **kw)
