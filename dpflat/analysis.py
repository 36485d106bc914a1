"""Landscape analysis of a finished run: Hessian spectrum, sharpness, 2D loss surface.

The glue between a run folder and the model-agnostic ``landscape`` package. Results
go into ``RUN_DIR/landscape/`` and three columns of the output root's results table
(``top_eigenvalue``, ``hessian_trace``, ``sam_sharpness``), so sweeps can plot
sharpness against ε.

The data is the run's **eval split** by default (a fixed subset): the landscape of
a released DP model is computed on data that is not private, so publishing the
figures costs no privacy. ``split="private"`` is available for research and is then
marked in the settings (such a figure is not covered by the run's guarantee).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import MAX_GRID, ConfigError, RunConfig
from .evaluate import BATCH_KEYS, ce_loss, fixed_batches, model_inputs
from .figures import run_label
from .privacy import DP
from .runs import LANDSCAPE_COLUMNS, RunDir, update_result

SUBDIR = "landscape"


@dataclass
class LoadedRun:
    """A finished run rebuilt in memory (model in eval mode, eager attention for HVPs).

    Its result and ledger are read through ``RunDir`` when first asked for.
    """

    run_dir: Path
    cfg: RunConfig
    model: Any
    card: Any
    data: dict[str, Any]

    @cached_property
    def result(self) -> dict[str, Any]:
        return RunDir(self.run_dir).result() or {}

    @cached_property
    def ledger(self) -> dict[str, Any]:
        """The run's ledger; empty when missing or invalid (the guarantee is then unknown)."""
        return RunDir(self.run_dir).ledger() or {}

    @cached_property
    def derived(self):
        """The guarantee derived from the run's config, ledger and recorded mechanism (``verify``)."""
        from .verify import derive_run

        return derive_run(self.run_dir)

    @property
    def guarantee(self) -> str:
        """Derived from the run folder; a run without a valid ledger.json has an unknown guarantee."""
        return self.derived.guarantee

    @property
    def claimed_epsilon(self) -> float | None:
        return self.derived.epsilon if self.guarantee == DP else None

    @property
    def label(self) -> str:
        """E.g. "dpflat-safe · ε=3 · (ε, δ)-DP"; a non-DP run never shows an ε."""
        return run_label({**self.result, "guarantee": self.guarantee, "epsilon": self.claimed_epsilon})


def load_run(run_dir: str | Path, attn: str = "eager", device: str = "cpu") -> LoadedRun:
    """Rebuild a finished run's model (selected parameters) and its data splits."""
    from .models import build_model
    from .session import prepare_data

    rd = RunDir(run_dir)
    if not rd.config_file.exists():
        raise FileNotFoundError(f"{rd.path} is not a run folder (no config.json)")
    if not rd.done:
        raise ConfigError(f"{rd.path} is not finished: train it first (the same train command resumes it)")
    state = rd.load_model_state()  # missing or cut: one line with the same advice as `train`
    cfg = rd.config()
    cfg = cfg.replace(model={"attn": attn})  # eager: double backward through attention for HVPs
    card, _splits, tokd = prepare_data(cfg)
    model = build_model(cfg.model, len(card.labels), seed=cfg.train.seed, task=card.name)
    model.load_trainable_state({k: v.to(device) for k, v in state.items()})
    model.to(device).eval()
    return LoadedRun(rd.path, cfg, model, card, tokd)


#: examples per length group of the analysis batches (cost only: see ``analysis_batches``)
ANALYSIS_GROUP = 32


def analysis_batches(run: LoadedRun, n_examples: int = 256, split: str = "eval",
                     batch_size: int = 128, regroup: int | None = ANALYSIS_GROUP) -> list[dict[str, torch.Tensor]]:
    """A fixed subset (the first ``n_examples`` of the split, already shuffled by the splitter).

    ``regroup``: sort the subset by length into groups of that many examples and cut each
    group's padding (``landscape.rebatch_by_length``). The splits are padded to
    ``max_length``, so a batch of SST-2 sentences is mostly padding, which an eager encoder
    still computes; every landscape figure is an example-weighted mean over batches, so the
    numbers are the same up to float summation order (tests/test_analysis.py) at about a
    third of the cost. ``None`` keeps the padded batches of ``batch_size``.
    """
    if split not in run.data:
        raise ConfigError(f"split must be one of {sorted(run.data)}, got {split!r}")
    ds = run.data[split]
    if len(ds) == 0:
        raise ConfigError(f"the {split} split of {run.run_dir.name} is empty")
    return fixed_batches(ds, n_examples, batch_size, keys=BATCH_KEYS, group=regroup or None)


def example_correct(run_dir: str | Path, split: str = "eval", batch_size: int = 128) -> np.ndarray:
    """Per-example 0/1 correctness of a finished run's model on one of its splits (in split order)."""
    run = load_run(run_dir, attn="sdpa")
    if split not in run.data:
        raise ConfigError(f"split must be one of {sorted(run.data)}, got {split!r}")
    hits = []
    with torch.inference_mode():
        for b in torch.utils.data.DataLoader(run.data[split], batch_size=batch_size, shuffle=False):
            hits.append((run.model(**model_inputs(b, "cpu")).argmax(-1) == b["labels"]).float().numpy())
    return np.concatenate(hits)


def _trainable(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def analyze_run(
    run_dir: str | Path,
    top_k: int = 3,
    grid: int = 21,
    span: float = 1.0,
    n_examples: int = 256,
    seed: int = 0,
    surface: bool = True,
    density: bool = True,
    split: str = "eval",
    rho: float = 0.05,
    trace_matvecs: int = 30,
    density_iter: int = 60,
    progress: bool = True,
    force: bool = False,
    regroup: int | None = ANALYSIS_GROUP,
    on_phase: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Spectrum (Lanczos top-k, Hutch++ trace, SLQ density), SAM sharpness and a 2D surface.

    Cached: a run analysed with the same settings is not recomputed (``force`` redoes it).
    ``regroup`` changes the cost, not the figures (``analysis_batches``), so it is not a setting.
    ``on_phase``: called with each phase's name ("loading", "spectrum", "trace", "density", "SAM",
    "surface") as it starts, so a caller can say what a long analysis is doing (a notebook status line).
    """
    phase = on_phase or (lambda _name: None)
    import landscape as ls

    if (top_k < 1 or not 3 <= grid <= MAX_GRID or span <= 0 or n_examples < 1 or trace_matvecs < 3
            or density_iter < 2):
        raise ConfigError(f"need top_k >= 1, grid in [3, {MAX_GRID}], span > 0, n_examples >= 1, trace_matvecs >= 3, "
                          "density_iter >= 2")
    rd = RunDir(run_dir)
    settings = {"top_k": top_k, "grid": grid, "span": span, "n_examples": n_examples, "seed": seed,
                "surface": surface, "density": density, "split": split, "rho": rho,
                "trace_matvecs": trace_matvecs, "density_iter": density_iter}
    old = None if force else rd.landscape()
    if old is not None and old.get("settings") == settings:
        _upsert(rd.path, old)
        return old

    phase("loading")
    run = load_run(run_dir)
    batches = analysis_batches(run, n_examples, split, regroup=regroup)
    model, params = run.model, _trainable(run.model)
    summary: dict[str, Any] = {"run_id": run.run_dir.name, "label": run.label, "guarantee": run.guarantee,
                               "epsilon": run.claimed_epsilon, "variant": run.result.get("variant"),
                               "settings": settings, "params": params,
                               "data": f"{split} split, first {sum(len(b['labels']) for b in batches)} examples",
                               # figures computed on private examples are not covered by the run's guarantee
                               "covered_by_guarantee": split != "private"}

    with ls.HessianOperator(model, ce_loss, batches, params=params) as H:
        phase("spectrum")
        eig = ls.top_eigenvalues(H, k=top_k, seed=seed)
        phase("trace")
        tr = ls.trace(H, seed=seed, n_matvecs=trace_matvecs)
        summary.update(top_eigenvalue=eig.top, eigenvalues=eig.eigenvalues.tolist(), hessian_trace=tr.trace,
                       spectrum=eig.to_dict(), trace=tr.to_dict(), n_params=H.n)
        if density:
            phase("density")
            dens = ls.slq_density(H, n_iter=min(density_iter, H.n), seed=seed)
            summary["density"] = dens.to_dict()
    phase("SAM")
    sam = ls.sam_sharpness(model, ce_loss, batches, rho=rho, params=params, relative=True, seed=seed)
    summary.update(sam_sharpness=sam.value, sam=sam.to_dict())

    if surface:
        phase("surface")
        d1 = ls.random_direction(model, params=params, seed=seed)
        d2 = ls.random_direction(model, params=params, seed=seed + 1)
        xs = np.linspace(-span, span, grid)
        surf = ls.loss_surface_2d(model, ce_loss, batches, d1, d2, xs=xs, params=params, progress=progress,
                                  label=run.label, keep_directions=False)
        summary["surface_path"] = str(rd.save_surface(surf))
        summary["surface_center_loss"] = surf.center_loss
    rd.write_landscape(summary)
    _upsert(run.run_dir, summary)
    return summary


#: the axes of :func:`axis_surface`, each with what its two directions are
SURFACE_AXES = {
    "random": "two random filter-normalised directions (Li et al. 2018): the surface analyze_run stored",
    "eigen": "the top two Hessian eigenvectors v1, v2 (Lanczos), each scaled to the norm of a filter-normalised "
             "random direction, so the units match the random view",
    "interp": "x along the straight line to a reference model (0 = this model, 1 = the reference), y a random "
              "filter-normalised direction",
}


def axis_surface(run_dir: str | Path, axes: str, *, grid: int = 7, span: float = 1.0, n_examples: int = 64,
                 seed: int = 0, reference: str | Path | None = None, label: str | None = None):
    """A run's 2D loss surface along ``axes`` (a key of :data:`SURFACE_AXES`), cached in its folder.

    ``random``: the surface ``analyze_run`` stored. ``eigen``: Lanczos on the model's own Hessian
    (``landscape.eigen_directions``), each unit eigenvector scaled to the norm of the random
    filter-normalised direction; x and y in [-span, span]. ``interp``: x along
    ``landscape.interpolation_direction`` to the ``reference`` run (e.g. the non-private model)
    over [-0.5, 1.5], y a random direction; None for the reference itself or without one. On
    the eval subset ``analyze_run`` uses (no private data). The cache (``RunDir.axis_surface_name``)
    is keyed by axes, grid, n_examples and seed (not span or reference). ``label``: the surface's
    label (default: the run's).
    """
    import landscape as ls

    if axes not in SURFACE_AXES:
        raise ConfigError(f"axes must be one of {', '.join(SURFACE_AXES)}, got {axes!r}")
    if axes == "random":
        return load_surface(run_dir)
    if axes == "interp" and (reference is None or Path(run_dir) == Path(reference)):
        return None
    rd = RunDir(run_dir)
    name = rd.axis_surface_name(axes, grid, n_examples, seed)
    cached = rd.cached_surface(name)
    if cached is not None:
        return cached
    run = load_run(run_dir)
    batches = analysis_batches(run, n_examples)
    rnd = ls.random_direction(run.model, seed=seed)
    if axes == "eigen":
        with ls.HessianOperator(run.model, ce_loss, batches) as H:
            eig = ls.top_eigenvalues(H, k=2, max_iter=30, tol=1e-3, seed=seed)
        d1, d2 = ls.eigen_directions(eig, 2)
        scale = float(rnd.vector.norm())
        d1.vector, d2.vector = d1.vector * scale, d2.vector * scale
        xs = np.linspace(-span, span, grid)
    else:
        d1 = ls.interpolation_direction(run.model, load_run(reference).model)
        d2 = rnd
        xs = np.linspace(-0.5, 1.5, grid)
    surf = ls.loss_surface_2d(run.model, ce_loss, batches, d1, d2, xs=xs, ys=np.linspace(-span, span, grid),
                              label=run.label if label is None else label, progress=False, keep_directions=False)
    rd.save_surface(surf, name)
    return surf


def _upsert(run_dir: Path, summary: dict[str, Any]) -> None:
    """Add the landscape columns to the run's row of its output root's results table (the one writer)."""
    update_result(run_dir.parent, run_dir.name, {k: summary.get(k) for k in LANDSCAPE_COLUMNS})


def load_analysis(run_dir: str | Path) -> dict[str, Any]:
    summary = RunDir(run_dir).landscape()
    if summary is None:
        raise FileNotFoundError(f"no landscape analysis in {run_dir}: run `python -m dpflat landscape {run_dir}`")
    return summary


def load_surface(run_dir: str | Path):
    return RunDir(run_dir).load_surface()


def load_density(run_dir: str | Path):
    """The SLQ density of an analysed run as a ``landscape.DensityResult``."""
    from landscape import DensityResult

    d = load_analysis(run_dir).get("density")
    if d is None:
        raise FileNotFoundError(f"{run_dir} was analysed without a density (density=False)")
    return DensityResult.from_dict(d)


__all__ = ["SURFACE_AXES", "LoadedRun", "analysis_batches", "analyze_run", "axis_surface", "ce_loss", "example_correct", "load_analysis", "load_density",
           "load_run", "load_surface", "run_label"]
