"""Results of the spectral routines: each carries its settings and convergence record.

Kept apart from the algorithms in :mod:`landscape.spectrum` so that readers (plots, caches,
reports) can load and draw a result without the numerics. Every result has ``to_dict``
(JSON-ready) and ``from_dict``, and ``from_dict(r.to_dict())`` is ``r`` again, value for
value: a cached summary reads back as the object that wrote it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from ._params import LandscapeError

R = TypeVar("R", bound="Record")


class Record:
    """A dataclass of plain values (settings, definitions): ``asdict`` writes it, ``from_dict`` reads it back."""

    @classmethod
    def from_dict(cls: type[R], d: dict[str, Any]) -> R:
        return cls(**d)


@dataclass
class SpectrumSettings(Record):
    """How a spectral quantity was computed (stored with every result)."""

    method: str
    k: int | None = None
    max_iter: int | None = None
    tol: float | None = None
    seed: int | None = None
    criterion: str | None = None
    n_params: int | None = None
    n_batches: int | None = None
    n_examples: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.k is not None and self.k < 1:
            raise LandscapeError(f"k must be >= 1, got {self.k}")
        if self.max_iter is not None and self.max_iter < 1:
            raise LandscapeError(f"max_iter must be >= 1, got {self.max_iter}")
        if self.tol is not None and not self.tol >= 0:
            raise LandscapeError(f"tol must be >= 0, got {self.tol}")
        if self.criterion is not None and self.criterion not in ("change", "residual", "fixed"):
            raise LandscapeError(f"criterion must be change|residual|fixed, got {self.criterion!r}")


@dataclass
class Convergence(Record):
    """Did it converge, after how much work; ``history`` is the estimate per iteration."""

    converged: bool
    n_iter: int
    n_matvecs: int
    seconds: float
    history: list[float] = field(default_factory=list)
    residuals: list[float] = field(default_factory=list)
    note: str = ""


@dataclass
class EigenResult:
    """Top eigenvalues (descending) and unit eigenvectors as rows of a (k, n) tensor."""

    eigenvalues: np.ndarray
    eigenvectors: torch.Tensor | None
    settings: SpectrumSettings
    convergence: Convergence

    def __post_init__(self) -> None:
        self.eigenvalues = np.asarray(self.eigenvalues, dtype=np.float64)
        if self.eigenvectors is not None and self.eigenvectors.shape[0] != len(self.eigenvalues):
            raise LandscapeError("one eigenvector per eigenvalue expected")

    @property
    def top(self) -> float:
        return float(self.eigenvalues[0])

    def to_dict(self, vectors: bool = False) -> dict[str, Any]:
        """Eigenvalues, settings and convergence; the eigenvectors too with ``vectors`` (they are
        ``k x n`` numbers, so summaries leave them out)."""
        d: dict[str, Any] = {
            "eigenvalues": self.eigenvalues.tolist(),
            "settings": dataclasses.asdict(self.settings),
            "convergence": dataclasses.asdict(self.convergence),
        }
        if vectors and self.eigenvectors is not None:
            d["eigenvectors"] = self.eigenvectors.detach().cpu().tolist()
            d["eigenvector_dtype"] = str(self.eigenvectors.dtype).removeprefix("torch.")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EigenResult:
        vecs = d.get("eigenvectors")
        dtype = getattr(torch, d.get("eigenvector_dtype", "float64"))
        return cls(np.asarray(d["eigenvalues"], dtype=np.float64),
                   None if vecs is None else torch.tensor(vecs, dtype=dtype).reshape(len(d["eigenvalues"]), -1),
                   SpectrumSettings.from_dict(d["settings"]), Convergence.from_dict(d["convergence"]))


@dataclass
class TraceResult:
    """Trace estimate; ``std_error`` is the Monte-Carlo standard error (0 when exact)."""

    trace: float
    std_error: float
    samples: list[float]
    settings: SpectrumSettings
    convergence: Convergence

    def to_dict(self) -> dict[str, Any]:
        return {
            "trace": self.trace,
            "std_error": self.std_error,
            "samples": list(self.samples),
            "settings": dataclasses.asdict(self.settings),
            "convergence": dataclasses.asdict(self.convergence),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TraceResult:
        return cls(d["trace"], d["std_error"], list(d["samples"]), SpectrumSettings.from_dict(d["settings"]),
                   Convergence.from_dict(d["convergence"]))


@dataclass
class DensityResult:
    """Stochastic Lanczos quadrature: per run, Ritz values (nodes) and weights (sum 1).

    The spectral density is ``phi(t) = mean_runs sum_i w_i delta(t - node_i)``; it
    integrates to 1 and its mean estimates ``trace / n`` (``n`` = parameter count).
    :meth:`density` smooths it with a Gaussian for plotting.
    """

    nodes: list[np.ndarray]
    weights: list[np.ndarray]
    n: int
    settings: SpectrumSettings
    convergence: Convergence

    def __post_init__(self) -> None:
        if len(self.nodes) != len(self.weights) or not self.nodes:
            raise LandscapeError("need one weight array per node array, at least one run")
        self.nodes = [np.asarray(x, dtype=np.float64) for x in self.nodes]
        self.weights = [np.asarray(x, dtype=np.float64) for x in self.weights]

    @property
    def mean(self) -> float:
        """Mean eigenvalue: an unbiased estimate of ``trace / n``."""
        return float(np.mean([np.sum(w * x) for x, w in zip(self.nodes, self.weights)]))

    @property
    def trace_estimate(self) -> float:
        return self.mean * self.n

    def moment(self, p: int) -> float:
        return float(np.mean([np.sum(w * x**p) for x, w in zip(self.nodes, self.weights)]))

    def density(
        self, grid: np.ndarray | None = None, sigma: float | None = None, n_grid: int = 1000
    ) -> tuple[np.ndarray, np.ndarray]:
        """Gaussian-smoothed density on a grid (default: 1% of the spectral span)."""
        allx = np.concatenate(self.nodes)
        lo, hi = float(allx.min()), float(allx.max())
        span = hi - lo if hi > lo else max(abs(hi), 1.0)
        if sigma is None:
            sigma = 0.01 * span
        if sigma <= 0:
            raise LandscapeError("sigma must be > 0")
        if grid is None:
            grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, n_grid)
        grid = np.asarray(grid, dtype=np.float64)
        dens = np.zeros_like(grid)
        for x, w in zip(self.nodes, self.weights):
            dens += (w[None, :] * np.exp(-((grid[:, None] - x[None, :]) ** 2) / (2 * sigma**2))).sum(1)
        dens /= len(self.nodes) * sigma * math.sqrt(2 * math.pi)
        return grid, dens

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodes": [x.tolist() for x in self.nodes],
            "weights": [w.tolist() for w in self.weights],
            "n": self.n,
            "settings": dataclasses.asdict(self.settings),
            "convergence": dataclasses.asdict(self.convergence),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DensityResult:
        return cls(d["nodes"], d["weights"], d["n"], SpectrumSettings.from_dict(d["settings"]),
                   Convergence.from_dict(d["convergence"]))


@dataclass
class GroupSpectrum:
    """Top eigenvalue(s) and trace of one parameter group's diagonal Hessian block."""

    group: str
    n_params: int
    eigen: EigenResult
    trace: TraceResult

    @property
    def top(self) -> float:
        return self.eigen.top

    def to_dict(self) -> dict[str, Any]:
        return {"group": self.group, "n_params": self.n_params, "eigen": self.eigen.to_dict(),
                "trace": self.trace.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GroupSpectrum:
        return cls(d["group"], d["n_params"], EigenResult.from_dict(d["eigen"]), TraceResult.from_dict(d["trace"]))


__all__ = ["Convergence", "DensityResult", "EigenResult", "GroupSpectrum", "Record", "SpectrumSettings", "TraceResult"]
