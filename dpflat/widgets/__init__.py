"""Interactive panels and figures for the notebooks (ipywidgets + plotly), one module per notebook.

Why a package and not notebook cells: the notebooks stay short lessons, and every
callback is a plain method that tests drive headlessly. ``base`` holds the shared
plumbing (``Panel``, figures that update in place), ``setup`` the lessons' sizes and run
config; ``quickstart`` (01), ``tradeoffs`` (02), ``landscapes`` (03), ``sweeps`` (04),
``ablations`` (05), ``privacy_audit`` (06) and ``neighbours`` (07) hold each notebook's panels and
figures. The notebooks use the names below as ``from dpflat import widgets as W; W.xxx``.

Labels: every model in a figure carries its guarantee exactly as its results row or
ledger states it (``run_label``, ``ledger_label``); nothing here derives a privacy
claim, and a run that is not DP is never shown with an ε.
"""

from __future__ import annotations

from ..accountants import epsilon_curve
from ..figures import (GUARANTEE_COLORS, METRICS, aggregate, color_by_run, group_label, responsive, run_color,
                       run_label)
from .ablations import (ABLATION_LEGEND, LEVELS, PRIVATE_LOSS_LABEL, AblationPanel, ablation_name, ablation_panel,
                        n_layers)
from .base import (Panel, figure_widget_available, fmt_delta, new_figure, replace_traces, snapshot,
                   variant_config)
from .landscapes import (ANALYSIS_PHASES, AXES, SurfacePanel, analyze_runs, axis_definition, axis_surface_source,
                         axis_surfaces, eigen_result, landscape_bars, name_axes, name_colorbar, surface_panel,
                         trajectories, trajectory_figure)
from .neighbours import (DATASETS, dkw_halfwidth, dp_cdf_band, epsilon_odds, neighbour_config, neighbour_figure,
                         neighbour_records, neighbour_runs, record_table, separation)
from .privacy_audit import (attack_cost_figure, attack_runs, audit_bars, dp_roc_bound, mia_bars, mia_label, mia_roc,
                            mia_roc_figure, mia_table, needs_attack, record_mia)
from .quickstart import (COUNT_NOTE, accuracy_bars, comparison_table, flatness_table, ledger_label, ledger_reads,
                         load_ledger, paired_accuracy_difference, payoff_figure)
from .setup import (SETUP_PHASES, SIZES, LessonInputError, SetupStatus, StatusLine, base_config, default_out_dir,
                    project_root, resolve_folder, setup_notebook, sized, train_run)
from .sweeps import (Explorer, SweepRunner, analysis_done, dp_vs_nonprivate_sharpness, explorer,
                     metric_columns, metric_traces, metric_vs_epsilon, run_points, sweep_runner)
from .tradeoffs import PrivacyPanel, epsilon_vs_steps, noise_vs_batch, privacy_panel, run_mechanism

__all__ = [
    "ABLATION_LEGEND", "ANALYSIS_PHASES", "AXES", "COUNT_NOTE", "DATASETS", "GUARANTEE_COLORS", "LEVELS", "METRICS",
    "PRIVATE_LOSS_LABEL", "SETUP_PHASES", "SIZES",
    "AblationPanel", "Explorer", "LessonInputError", "Panel", "PrivacyPanel", "SetupStatus", "StatusLine",
    "SurfacePanel", "SweepRunner",
    "ablation_name", "ablation_panel", "accuracy_bars", "aggregate", "analysis_done", "analyze_runs", "attack_cost_figure",
    "attack_runs", "audit_bars",
    "axis_definition", "axis_surface_source", "axis_surfaces", "base_config", "color_by_run", "comparison_table",
    "default_out_dir", "dkw_halfwidth", "dp_vs_nonprivate_sharpness", "dp_cdf_band", "dp_roc_bound", "eigen_result", "epsilon_curve", "epsilon_odds",
    "epsilon_vs_steps", "explorer", "figure_widget_available", "flatness_table", "fmt_delta", "group_label",
    "landscape_bars", "ledger_label", "ledger_reads", "load_ledger", "metric_columns", "metric_traces",
    "metric_vs_epsilon", "mia_bars", "mia_label", "mia_roc", "mia_roc_figure", "mia_table", "n_layers", "name_axes",
    "name_colorbar", "needs_attack", "neighbour_config", "neighbour_figure", "neighbour_records", "neighbour_runs", "new_figure",
    "noise_vs_batch", "paired_accuracy_difference", "payoff_figure", "privacy_panel", "project_root", "record_mia",
    "record_table", "replace_traces", "resolve_folder", "responsive", "run_color", "run_label", "run_mechanism",
    "run_points", "separation", "setup_notebook", "sized", "snapshot", "surface_panel", "sweep_runner", "train_run",
    "trajectories", "trajectory_figure", "variant_config",
]
