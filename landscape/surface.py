"""Loss surfaces: directions in parameter space and 1D / 2D grids of the dataset loss.

A point ``(a, b)`` of a 2D surface is the example-weighted loss over a fixed list of
batches at ``theta0 + a * d1 + b * d2`` (``theta0``: the current values of the chosen
parameters), evaluated in eval mode with one no-grad pass per batch; the parameters are
restored exactly afterwards. ``losses[i, j]`` is the loss at ``(xs[i], ys[j])``.

Directions (flat vectors over the same parameter subset):

* :func:`random_direction`: Gaussian, filter-normalised as in Li et al. 2018 ("Visualizing
  the loss landscape of neural nets"): each filter (slice along dim 0: an output row of a
  Linear, a prefix position of a prefix table) is rescaled to the norm of the same
  filter of the weights, so that surfaces of differently scaled models compare. 1-D
  parameters (biases, norms) are zeroed by default, as in their code (``ignore='biasbn'``).
* :func:`eigen_directions`: top Hessian eigenvectors (unit norm).
* :func:`interpolation_direction`: ``theta_b - theta_a`` (a = 0, b = 1 on the axis).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ._params import (
    Batch,
    LandscapeError,
    LossFn,
    ParamSet,
    ParamSpec,
    as_batch_list,
    batch_weights,
    data_info,
    eval_mode,
    merge_batches,
    rebatch_by_length,
)

Norm = Literal["filter", "layer", "model", "unit", "none"]


# --------------------------------------------------------------------------- directions
@dataclass
class Direction:
    """A flat direction over a parameter subset and how it was made."""

    vector: torch.Tensor
    kind: str
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.vector.dim() != 1:
            raise LandscapeError("a direction is a flat (1-D) vector")
        if not torch.isfinite(self.vector).all():
            raise LandscapeError("direction has non-finite entries")

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "norm": float(self.vector.norm()), **self.info}


def _pset(model_or_pset: nn.Module | ParamSet, params: ParamSpec) -> ParamSet:
    return model_or_pset if isinstance(model_or_pset, ParamSet) else ParamSet.from_model(model_or_pset, params)


def random_direction(
    model: nn.Module | ParamSet,
    params: ParamSpec = None,
    seed: int = 0,
    norm: Norm = "filter",
    ignore_1d: bool = True,
) -> Direction:
    """Gaussian direction, normalised per ``norm``.

    ``"filter"``: each dim-0 slice gets the norm of the weights' slice (Li et al.);
    ``"layer"``: each parameter tensor gets the norm of that tensor; ``"model"``: the
    whole vector gets ``||theta||``; ``"unit"``: norm 1; ``"none"``: raw N(0, I).
    1-D parameters are zero when ``ignore_1d``; otherwise under ``"filter"`` they copy
    the weights (Li et al.'s choice), under the other norms they are normalised as usual.
    """
    if norm not in ("filter", "layer", "model", "unit", "none"):
        raise LandscapeError(f"norm must be filter|layer|model|unit|none, got {norm!r}")
    ps = _pset(model, params)
    g = torch.Generator().manual_seed(int(seed))
    d = torch.randn(ps.n, generator=g, dtype=torch.float64).to(ps.dtype).to(ps.device)
    theta = ps.get_flat()
    parts, wparts = ps.unflatten(d), ps.unflatten(theta)
    for dp, wp in zip(parts, wparts):
        if dp.dim() <= 1:
            if ignore_1d:
                dp.zero_()
            elif norm == "filter":
                dp.copy_(wp)
            elif norm == "layer":
                dp.mul_(wp.norm() / (dp.norm() + 1e-10))
            continue
        if norm == "filter":
            dn = dp.reshape(dp.shape[0], -1).norm(dim=1)
            wn = wp.reshape(wp.shape[0], -1).norm(dim=1)
            dp.mul_((wn / (dn + 1e-10)).view(-1, *([1] * (dp.dim() - 1))))
        elif norm == "layer":
            dp.mul_(wp.norm() / (dp.norm() + 1e-10))
    if norm == "model":
        d.mul_(theta.norm() / (d.norm() + 1e-10))
    elif norm == "unit":
        d.div_(d.norm() + 1e-30)
    return Direction(d, "random", {"seed": seed, "norm": norm, "ignore_1d": ignore_1d})


def eigen_directions(eigen: Any, k: int = 2) -> list[Direction]:
    """The top-``k`` eigenvectors of an :class:`~landscape.spectrum.EigenResult` (unit norm)."""
    vecs = getattr(eigen, "eigenvectors", None)
    if vecs is None:
        raise LandscapeError("the eigen result holds no eigenvectors (return_vectors=False?)")
    if k > vecs.shape[0]:
        raise LandscapeError(f"asked for {k} eigen directions, the result has {vecs.shape[0]}")
    vals = np.asarray(eigen.eigenvalues)
    return [
        Direction(vecs[i] / vecs[i].norm(), "eigen", {"index": i, "eigenvalue": float(vals[i]), "method": eigen.settings.method})
        for i in range(k)
    ]


def _flat_from(other: Any, ps: ParamSet) -> torch.Tensor:
    if isinstance(other, torch.Tensor):
        if other.shape != (ps.n,):
            raise LandscapeError(f"flat vector has shape {tuple(other.shape)}, expected ({ps.n},)")
        return other.detach().to(ps.dtype).to(ps.device)
    if isinstance(other, nn.Module):
        other = dict(other.named_parameters())
    if isinstance(other, Mapping):
        missing = [n for n in ps.names if n not in other]
        if missing:
            raise LandscapeError(f"the other parameter set lacks {missing[:5]}")
        return torch.cat([other[n].detach().reshape(-1).to(ps.dtype).to(ps.device) for n in ps.names])
    raise LandscapeError("expected a flat tensor, a state dict or a module")


def interpolation_direction(
    model: nn.Module | ParamSet, other: Any, params: ParamSpec = None, start: Any = None
) -> Direction:
    """``theta_other - theta_start`` (``start`` defaults to the model's current values).

    With the model at ``theta_start``, axis value 0 is ``start`` and 1 is ``other``:
    the linear path between two trained prefixes (e.g. DP vs non-DP).
    ``other``/``start``: a flat vector, a state dict (names as in ``named_parameters``),
    or a module with the same parameter names.
    """
    ps = _pset(model, params)
    a = ps.get_flat() if start is None else _flat_from(start, ps)
    b = _flat_from(other, ps)
    return Direction(b - a, "interpolation", {"distance": float((b - a).norm())})


def _vec(d: Direction | torch.Tensor, ps: ParamSet) -> tuple[torch.Tensor, dict[str, Any]]:
    if isinstance(d, Direction):
        v, desc = d.vector, d.describe()
    elif isinstance(d, torch.Tensor):
        v, desc = d, {"kind": "custom", "norm": float(d.norm())}
    else:
        raise LandscapeError("a direction must be a Direction or a flat tensor")
    if v.shape != (ps.n,):
        raise LandscapeError(f"direction has shape {tuple(v.shape)}, expected ({ps.n},)")
    return v.to(ps.dtype).to(ps.device), desc


# --------------------------------------------------------------------------- result
def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return x


@dataclass
class Surface:
    """A 1D or 2D loss grid with its settings; ``save``/``load`` as ``.npz`` + ``.json``.

    ``coords``: ``[alphas]`` or ``[xs, ys]``; ``losses``: shape ``(len(xs),)`` or
    ``(len(xs), len(ys))`` with ``losses[i, j]`` at ``(xs[i], ys[j])``. ``settings``
    holds the label, directions, data size, parameter names and timing.
    """

    coords: list[np.ndarray]
    losses: np.ndarray
    settings: dict[str, Any] = field(default_factory=dict)
    directions: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.coords = [np.asarray(c, dtype=np.float64) for c in self.coords]
        self.losses = np.asarray(self.losses, dtype=np.float64)
        if len(self.coords) not in (1, 2):
            raise LandscapeError("a surface has 1 or 2 axes")
        shape = tuple(len(c) for c in self.coords)
        if self.losses.shape != shape:
            raise LandscapeError(f"losses have shape {self.losses.shape}, coordinates say {shape}")

    @property
    def ndim(self) -> int:
        return len(self.coords)

    @property
    def label(self) -> str | None:
        return self.settings.get("label")

    @property
    def center_loss(self) -> float:
        """Loss at the grid point nearest the origin (the model itself when 0 is on the grid)."""
        idx = tuple(int(np.argmin(np.abs(c))) for c in self.coords)
        return float(self.losses[idx])

    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Write ``<path>.npz`` (arrays) and ``<path>.json`` (settings); returns both paths."""
        p = Path(path)
        if p.suffix in (".npz", ".json"):
            p = p.with_suffix("")
        p.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {"losses": self.losses}
        for i, c in enumerate(self.coords):
            arrays[f"coord{i}"] = c
        if self.directions is not None:
            arrays["directions"] = self.directions
        npz, js = p.with_suffix(".npz"), p.with_suffix(".json")
        np.savez_compressed(npz, **arrays)
        js.write_text(json.dumps(_jsonable(self.settings), indent=2, sort_keys=True))
        return npz, js

    @classmethod
    def load(cls, path: str | Path) -> Surface:
        p = Path(path)
        if p.suffix in (".npz", ".json"):
            p = p.with_suffix("")
        with np.load(p.with_suffix(".npz")) as z:
            coords = [z[f"coord{i}"] for i in range(2) if f"coord{i}" in z]
            losses = z["losses"]
            dirs = z["directions"] if "directions" in z else None
        settings = json.loads(p.with_suffix(".json").read_text())
        return cls(coords, losses, settings, dirs)

    def to_dict(self) -> dict[str, Any]:
        """Grid, losses and settings (and the directions when kept), JSON-ready."""
        return {"coords": [c.tolist() for c in self.coords], "losses": self.losses.tolist(),
                "settings": _jsonable(self.settings),
                "directions": None if self.directions is None else self.directions.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Surface:
        dirs = d.get("directions")
        return cls(d["coords"], d["losses"], d.get("settings", {}),
                   None if dirs is None else np.asarray(dirs, dtype=np.float64))


# --------------------------------------------------------------------------- grids
def _grid(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    dirs: Sequence[Direction | torch.Tensor],
    axes: Sequence[np.ndarray],
    params: ParamSpec,
    progress: bool,
    label: str | None,
    eval_batch_size: int | None,
    keep_directions: bool,
    rebatch: bool | int = False,
    precision: str = "fp32",
) -> Surface:
    from .hvp import autocast_loss

    ps = ParamSet.from_model(model, params)
    bl = as_batch_list(batches)
    info = data_info(bl)
    if eval_batch_size:
        bl = merge_batches(bl, eval_batch_size)
    if rebatch:  # same losses (up to float summation order), fewer padded positions per pass
        bl = rebatch_by_length(bl, None if rebatch is True else int(rebatch))
    loss_fn = autocast_loss(loss_fn, precision, ps.device.type)  # type: ignore[arg-type]
    ws = batch_weights(bl)
    vecs, descs = zip(*[_vec(d, ps) for d in dirs])
    axes = [np.asarray(a, dtype=np.float64).reshape(-1) for a in axes]
    if any(len(a) == 0 for a in axes):
        raise LandscapeError("empty grid axis")
    shape = tuple(len(a) for a in axes)
    losses = np.zeros(shape)
    theta0 = ps.get_flat()
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    bar = tqdm(total=int(np.prod(shape)), desc=label or "loss surface", disable=not progress, leave=False)
    try:
        with eval_mode(model), torch.no_grad():
            for idx in np.ndindex(*shape):
                point = theta0.clone()
                for v, a, i in zip(vecs, axes, idx):
                    if a[i] != 0.0:
                        point.add_(v, alpha=float(a[i]))
                ps.set_flat(point)
                losses[idx] = sum(w * float(loss_fn(model, b)) for w, b in zip(ws, bl))
                bar.update(1)
    finally:
        ps.set_flat(theta0)
        bar.close()
    seconds = time.perf_counter() - t0
    settings: dict[str, Any] = {
        "label": label,
        "directions": list(descs),
        "n_params": ps.n,
        "params": list(ps.names),
        "n_points": int(np.prod(shape)),
        "seconds": seconds,
        "eval_batch_size": eval_batch_size,
        "rebatch": rebatch,
        "precision": precision,
        "loss": "example-weighted mean over the fixed batches, eval mode, no grad",
        **info,
    }
    d = np.stack([v.detach().cpu().double().numpy() for v in vecs]) if keep_directions else None
    return Surface(list(axes), losses, settings, d)


def loss_surface_1d(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    direction: Direction | torch.Tensor,
    alphas: Sequence[float] | np.ndarray | None = None,
    params: ParamSpec = None,
    progress: bool = True,
    label: str | None = None,
    eval_batch_size: int | None = None,
    keep_directions: bool = True,
    rebatch: bool | int = False,
    precision: str = "fp32",
) -> Surface:
    """Loss along ``theta0 + alpha * d`` for each alpha (default 21 points in [-1, 1]);
    one no-grad pass over the batches per point. ``rebatch`` / ``precision``: see
    :func:`loss_surface_2d`."""
    alphas = np.linspace(-1.0, 1.0, 21) if alphas is None else alphas
    return _grid(model, loss_fn, batches, [direction], [np.asarray(alphas)], params, progress, label, eval_batch_size,
                 keep_directions, rebatch, precision)


def loss_surface_2d(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    d1: Direction | torch.Tensor,
    d2: Direction | torch.Tensor,
    xs: Sequence[float] | np.ndarray | None = None,
    ys: Sequence[float] | np.ndarray | None = None,
    params: ParamSpec = None,
    progress: bool = True,
    label: str | None = None,
    eval_batch_size: int | None = None,
    keep_directions: bool = True,
    rebatch: bool | int = False,
    precision: str = "fp32",
) -> Surface:
    """Loss on the grid ``theta0 + x * d1 + y * d2`` (``xs`` default: 21 points in
    [-1, 1]; ``ys`` defaults to ``xs``); ``losses[i, j]`` is at ``(xs[i], ys[j])``.

    Speed (the cost is one forward per point): ``rebatch=True`` (or a group size)
    regroups HF dict batches by real length and cuts their padding
    (:func:`landscape._params.rebatch_by_length`): the same losses up to float
    summation order. ``precision="bf16"`` evaluates under bf16 autocast (AMX / tensor
    cores): the surface of the autocast model, off by ~1e-3 relative; the settings
    record both, and benchmarks/RESULTS.md states the measured difference."""
    xs = np.linspace(-1.0, 1.0, 21) if xs is None else xs
    ys = xs if ys is None else ys
    return _grid(model, loss_fn, batches, [d1, d2], [np.asarray(xs), np.asarray(ys)], params, progress, label, eval_batch_size,
                 keep_directions, rebatch, precision)


__all__ = [
    "Direction",
    "Surface",
    "eigen_directions",
    "interpolation_direction",
    "loss_surface_1d",
    "loss_surface_2d",
    "random_direction",
]
