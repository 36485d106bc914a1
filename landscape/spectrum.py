"""Hessian spectra from matrix-vector products: top-k eigenpairs, trace, density.

Every routine takes a :class:`~landscape.hvp.LinearOperator` (usually a
:class:`~landscape.hvp.HessianOperator`; a dense symmetric tensor also works) and
returns a result that carries its settings (method, iterations, tolerance, seed, data
size) and convergence info (iterations, products, history, residuals, seconds).

Why Lanczos is the default: power iteration converges like ``(l2/l1)^t``, Lanczos like
a Chebyshev polynomial, roughly ``(l2/l1)^(2t)`` or better; on Hessians with a small
top gap that is several times fewer products for the same tolerance.

Tolerance notion (shared with PyHessian so that timings compare): stop when the
relative change ``|l_t - l_{t-1}| / (|l_t| + 1e-6)`` of each wanted eigenvalue between
consecutive iterations is below ``tol``. ``criterion="residual"`` instead stops on
the Ritz residual ``||H y - l y|| / |l| < tol`` (stricter, a bound on the error).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

from ._params import GroupSpec, LandscapeError
from .hvp import DenseOperator, LinearOperator, RestrictedOperator

Which = Literal["LA", "LM"]


# --------------------------------------------------------------------------- results
@dataclass
class SpectrumSettings:
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
class Convergence:
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

    def to_dict(self) -> dict[str, Any]:
        return {
            "eigenvalues": self.eigenvalues.tolist(),
            "settings": dataclasses.asdict(self.settings),
            "convergence": dataclasses.asdict(self.convergence),
        }


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


# --------------------------------------------------------------------------- helpers
def as_operator(op: LinearOperator | torch.Tensor) -> LinearOperator:
    """Accept an operator or a dense symmetric matrix."""
    if isinstance(op, torch.Tensor):
        return DenseOperator(op)
    if not hasattr(op, "matvec") or not hasattr(op, "n"):
        raise LandscapeError(f"expected a LinearOperator or a tensor, got {type(op).__name__}")
    return op


def _settings(op: LinearOperator, method: str, **kw: Any) -> SpectrumSettings:
    info = dict(op.info()) if hasattr(op, "info") else {}
    extra = {k: v for k, v in info.items() if k not in ("n_params", "n_batches", "n_examples")}
    extra.update(kw.pop("extra", {}))
    return SpectrumSettings(
        method=method,
        n_params=info.get("n_params", op.n),
        n_batches=info.get("n_batches"),
        n_examples=info.get("n_examples"),
        extra=extra,
        **kw,
    )


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _randn(op: LinearOperator, g: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(op.n, generator=g, dtype=dtype).to(op.device)


def _rademacher(op: LinearOperator, g: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return (torch.randint(0, 2, (op.n,), generator=g).to(dtype) * 2 - 1).to(op.device)


def _mv(op: LinearOperator, v: torch.Tensor) -> torch.Tensor:
    return op.matvec(v.to(op.dtype)).to(v.dtype)


def _start_vector(
    op: LinearOperator, g: torch.Generator, dt: torch.dtype, start: str | torch.Tensor
) -> tuple[torch.Tensor, str]:
    r = _randn(op, g, dt)
    r = r / r.norm()
    if isinstance(start, torch.Tensor):
        if start.shape != (op.n,):
            raise LandscapeError(f"start vector has shape {tuple(start.shape)}, expected ({op.n},)")
        q = start.to(dtype=dt, device=op.device)
        return q / q.norm(), "given"
    if start == "random":
        return r, "random"
    if start != "gradient":
        raise LandscapeError(f"start must be random|gradient|a tensor, got {start!r}")
    grad = getattr(op, "grad", None)
    if isinstance(grad, torch.Tensor) and grad.shape == (op.n,) and float(grad.norm()) > 0:
        q = grad.to(dt) / grad.norm().to(dt) + 0.1 * r
        return q / q.norm(), "gradient + 10% random"
    return r, "random (no gradient available)"


def _pick(theta: np.ndarray, k: int, which: Which) -> np.ndarray:
    order = np.argsort(-np.abs(theta) if which == "LM" else -theta, kind="stable")
    return order[:k]


def _rel_change(new: np.ndarray, old: np.ndarray) -> float:
    return float(np.max(np.abs(new - old) / (np.abs(new) + 1e-6)))


# --------------------------------------------------------------------------- Lanczos
def lanczos(
    op: LinearOperator | torch.Tensor,
    k: int = 1,
    max_iter: int = 100,
    tol: float = 1e-3,
    seed: int = 0,
    which: Which = "LA",
    criterion: Literal["change", "residual"] = "change",
    return_vectors: bool = True,
    dtype: torch.dtype | None = None,
    start: Literal["random", "gradient"] | torch.Tensor = "gradient",
) -> EigenResult:
    """Top-k eigenpairs by Lanczos with full reorthogonalisation.

    ``max_iter`` caps the Krylov dimension (= Hessian-vector products); it is clipped
    to ``n``, where Lanczos is exact. Stores up to ``max_iter`` basis vectors of length
    ``n`` (``dtype``: the operator's by default). ``which``: "LA" largest algebraic
    (the default: the sharpest curvature), "LM" largest magnitude (what power iteration
    finds). A multiple eigenvalue is found once (a Krylov space sees one copy).

    ``start``: the first Krylov vector. ``"random"`` (Gaussian); ``"gradient"`` (default) uses
    ``op.grad`` (a :class:`HessianOperator` has it from its cached graph, for free)
    plus a 10% random component. Why: network gradients concentrate in the top Hessian
    eigenspace (Gur-Ari et al. 2018), so the first Ritz value is already close and
    fewer products are needed; the random part keeps every eigenvector reachable.
    Falls back to random when there is no (or a zero) gradient. A tensor is used as is.
    """
    op = as_operator(op)
    if criterion not in ("change", "residual"):
        raise LandscapeError(f"criterion must be change|residual, got {criterion!r}")
    if which not in ("LA", "LM"):
        raise LandscapeError(f"which must be LA|LM, got {which!r}")
    settings = _settings(op, "lanczos", k=k, max_iter=max_iter, tol=tol, seed=seed, criterion=criterion)
    n = op.n
    if k > n:
        raise LandscapeError(f"k={k} exceeds the dimension {n}")
    dt = dtype or op.dtype
    m_max = min(max_iter, n)
    if m_max < k:
        raise LandscapeError(f"max_iter={max_iter} is smaller than k={k}")
    t0 = time.perf_counter()
    g = _gen(seed)
    Q = torch.zeros(min(m_max, 8), n, dtype=dt, device=op.device)  # grows: most runs stop early
    q, start_used = _start_vector(op, g, dt, start)
    settings.extra["start"] = start_used
    alphas: list[float] = []
    betas: list[float] = []
    history: list[float] = []
    prev: np.ndarray | None = None
    converged, note = False, ""
    theta = np.zeros(0)
    S = np.zeros((0, 0))
    idx = np.zeros(0, dtype=int)
    beta = 0.0
    n_mv = 0
    scale = 0.0
    for j in range(m_max):
        if j == Q.shape[0]:
            Q = torch.cat([Q, torch.zeros(min(Q.shape[0], m_max - Q.shape[0]), n, dtype=dt, device=op.device)])
        Q[j] = q
        w = _mv(op, q)
        n_mv += 1
        alpha = float(torch.dot(w, q))
        w = w - alpha * q
        if j > 0:
            w = w - betas[-1] * Q[j - 1]
        for _ in range(2):  # full reorthogonalisation, twice is enough (Kahan/Parlett)
            w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)
        beta = float(w.norm())
        alphas.append(alpha)
        theta, S = eigh_tridiagonal(np.array(alphas), np.array(betas)) if j > 0 else (np.array(alphas), np.ones((1, 1)))
        scale = max(scale, float(np.max(np.abs(theta))))
        kk = min(k, j + 1)
        idx = _pick(theta, kk, which)
        top = theta[idx]
        history.append(float(top[0]))
        resid = beta * np.abs(S[-1, idx]) / (np.abs(top) + 1e-12)
        breakdown = beta <= 1e-10 * max(scale, 1e-30)
        if kk == k:
            if criterion == "residual":
                done = bool(np.all(resid < tol))
            else:
                done = prev is not None and len(prev) == k and _rel_change(top, prev) < tol
            if done or (breakdown and j + 1 >= k):
                converged = True
                note = "invariant subspace" if breakdown and not done else ""
                break
        prev = top.copy()
        if j + 1 == m_max:
            break
        if breakdown:  # invariant subspace smaller than k: restart orthogonally
            w = _randn(op, g, dt)
            for _ in range(2):
                w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)
            betas.append(0.0)
            q = w / w.norm()
        else:
            betas.append(beta)
            q = w / beta
    m = len(alphas)
    if m == n and not converged:
        converged, note = True, "Krylov space is the whole space (exact)"
    resid_final = (beta * np.abs(S[-1, idx]) / (np.abs(theta[idx]) + 1e-12)).tolist()
    vecs = None
    if return_vectors:
        Sk = torch.as_tensor(S[:, idx].T.copy(), dtype=dt, device=op.device)
        vecs = Sk @ Q[:m]
        vecs = vecs / vecs.norm(dim=1, keepdim=True)
    conv = Convergence(converged, m, n_mv, time.perf_counter() - t0, history, resid_final, note)
    return EigenResult(theta[idx].copy(), vecs, settings, conv)


# --------------------------------------------------------------------------- power iteration
def power_iteration(
    op: LinearOperator | torch.Tensor,
    k: int = 1,
    max_iter: int = 100,
    tol: float = 1e-3,
    seed: int = 0,
) -> EigenResult:
    """Top-k (largest magnitude) eigenpairs by power iteration with deflation.

    Same algorithm and stopping rule as PyHessian's ``eigenvalues()``: per eigenvalue,
    iterate ``v <- H v / ||H v||`` orthogonal to the ones found, stop when the Rayleigh
    quotient changes by less than ``tol`` (relative) or after ``max_iter`` products.
    """
    op = as_operator(op)
    settings = _settings(op, "power", k=k, max_iter=max_iter, tol=tol, seed=seed, criterion="change")
    if k > op.n:
        raise LandscapeError(f"k={k} exceeds the dimension {op.n}")
    t0 = time.perf_counter()
    g = _gen(seed)
    dt = op.dtype
    vals: list[float] = []
    vecs: list[torch.Tensor] = []
    history: list[float] = []
    all_conv = True
    n_mv = 0
    resid: list[float] = []
    for _ in range(k):
        v = _randn(op, g, dt)
        lam: float | None = None
        conv = False
        hv = None
        for _it in range(max_iter):
            for u in vecs:
                v = v - torch.dot(v, u) * u
            v = v / v.norm()
            hv = _mv(op, v)
            n_mv += 1
            new = float(torch.dot(hv, v))
            history.append(new)
            hv_n = hv.norm()
            if lam is not None and abs(new - lam) / (abs(new) + 1e-6) < tol:
                lam, conv = new, True
                break
            lam = new
            if float(hv_n) == 0.0:
                conv = True
                break
            v = hv / hv_n
        assert lam is not None and hv is not None
        resid.append(float((hv - lam * v).norm()) / (abs(lam) + 1e-12))
        all_conv &= conv
        vals.append(lam)
        vecs.append(v)
    conv_info = Convergence(all_conv, len(history), n_mv, time.perf_counter() - t0, history, resid)
    return EigenResult(np.array(vals), torch.stack(vecs), settings, conv_info)


def top_eigenvalues(
    op: LinearOperator | torch.Tensor,
    k: int = 1,
    method: Literal["lanczos", "power"] = "lanczos",
    max_iter: int = 100,
    tol: float = 1e-3,
    seed: int = 0,
    **kw: Any,
) -> EigenResult:
    """Top-k eigenvalues/vectors of the Hessian (Lanczos by default, see module doc).

    ``kw`` goes to :func:`lanczos` (``which``, ``criterion``, ``start``, ``return_vectors``).
    """
    if method == "lanczos":
        return lanczos(op, k=k, max_iter=max_iter, tol=tol, seed=seed, **kw)
    if method == "power":
        if kw:
            raise LandscapeError(f"power iteration takes no {sorted(kw)}")
        return power_iteration(op, k=k, max_iter=max_iter, tol=tol, seed=seed)
    raise LandscapeError(f"method must be lanczos|power, got {method!r}")


# --------------------------------------------------------------------------- trace
def hutchinson(
    op: LinearOperator | torch.Tensor,
    max_iter: int = 100,
    tol: float = 1e-3,
    seed: int = 0,
    min_iter: int = 2,
    probes: torch.Tensor | None = None,
    block_size: int = 1,
) -> TraceResult:
    """Hutchinson trace ``E[z^T H z]`` with Rademacher ``z``.

    Stops when the running mean changes by less than ``tol`` (relative), as PyHessian's
    ``trace()`` does, after at least ``min_iter`` samples; ``tol=0`` runs ``max_iter``.
    ``probes`` (m, n): use these vectors in order instead of drawing them (e.g. the
    ones another tool drew, to compare estimates sample by sample); at most m samples.
    ``block_size`` > 1 asks the operator for that many products at once
    (``op.matmat``, one batched double backward for a :class:`HessianOperator`); the
    stopping rule is still checked after every sample, so the estimate is the same as
    with single products, but up to ``block_size - 1`` extra products may be spent.
    """
    op = as_operator(op)
    if block_size < 1:
        raise LandscapeError("block_size must be >= 1")
    if probes is not None:
        if probes.dim() != 2 or probes.shape[1] != op.n:
            raise LandscapeError(f"probes must have shape (m, {op.n}), got {tuple(probes.shape)}")
        max_iter = min(max_iter, probes.shape[0])
    settings = _settings(op, "hutchinson", max_iter=max_iter, tol=tol, seed=seed, criterion="change")
    if probes is not None:
        settings.extra["probes"] = "given"
    t0 = time.perf_counter()
    g = _gen(seed)
    samples: list[float] = []
    history: list[float] = []
    mean = 0.0
    conv = False
    n_mv = 0
    matmat = getattr(op, "matmat", None) if block_size > 1 else None
    i = 0
    while i < max_iter and not conv:
        k = min(block_size, max_iter - i)
        if probes is not None:
            Z = probes[i : i + k].to(dtype=op.dtype, device=op.device)
        else:
            Z = torch.stack([_rademacher(op, g, op.dtype) for _ in range(k)])
        HZ = matmat(Z) if (matmat is not None and k > 1) else torch.stack([_mv(op, z) for z in Z])
        n_mv += k
        for z, hz in zip(Z, HZ):
            samples.append(float(torch.dot(z, hz)))
            new = float(np.mean(samples))
            history.append(new)
            i += 1
            if i >= max(min_iter, 2) and abs(new - mean) / (abs(new) + 1e-6) < tol:
                mean, conv = new, True
                break
            mean = new
    se = float(np.std(samples, ddof=1) / math.sqrt(len(samples))) if len(samples) > 1 else float("nan")
    c = Convergence(conv, len(samples), n_mv, time.perf_counter() - t0, history)
    return TraceResult(mean, se, samples, settings, c)


def hutchpp(op: LinearOperator | torch.Tensor, n_matvecs: int = 99, seed: int = 0) -> TraceResult:
    """Hutch++ (Meyer et al. 2021): exact trace on a sketched top subspace + Hutchinson rest.

    Uses ``n_matvecs`` products split in thirds; error falls like ``1/n_matvecs``
    instead of Hutchinson's ``1/sqrt(n_matvecs)``. Exact when ``n_matvecs >= 3 n``.
    """
    op = as_operator(op)
    if n_matvecs < 3:
        raise LandscapeError("hutchpp needs n_matvecs >= 3")
    settings = _settings(op, "hutch++", max_iter=n_matvecs, seed=seed, criterion="fixed")
    t0 = time.perf_counter()
    g = _gen(seed)
    dt = op.dtype
    k = n_matvecs // 3
    kq = min(k, op.n)
    S = torch.stack([_rademacher(op, g, dt) for _ in range(kq)], dim=1)
    G = torch.stack([_rademacher(op, g, dt) for _ in range(k)], dim=1)
    Y = torch.stack([_mv(op, S[:, i]) for i in range(kq)], dim=1)
    Q, _ = torch.linalg.qr(Y)
    HQ = torch.stack([_mv(op, Q[:, i]) for i in range(Q.shape[1])], dim=1)
    t_top = float(torch.sum(Q * HQ))
    n_mv = kq + Q.shape[1]
    samples: list[float] = []
    if kq < op.n:
        Gp = G - Q @ (Q.T @ G)
        for i in range(k):
            z = Gp[:, i]
            samples.append(float(torch.dot(z, _mv(op, z))))
            n_mv += 1
        rest = float(np.mean(samples))
        se = float(np.std(samples, ddof=1) / math.sqrt(k)) if k > 1 else float("nan")
    else:
        rest, se = 0.0, 0.0
    est = t_top + rest
    c = Convergence(True, n_mv, n_mv, time.perf_counter() - t0, [est], note=f"top-subspace part {t_top:.6g}")
    return TraceResult(est, se, samples, settings, c)


def exact_trace(op: LinearOperator | torch.Tensor) -> TraceResult:
    """``sum_i e_i^T H e_i`` with ``n`` products: for small groups and tests."""
    op = as_operator(op)
    settings = _settings(op, "exact", max_iter=op.n, criterion="fixed")
    t0 = time.perf_counter()
    e = torch.zeros(op.n, dtype=op.dtype, device=op.device)
    diag = []
    for i in range(op.n):
        e.zero_()
        e[i] = 1
        diag.append(float(_mv(op, e)[i]))
    tr = float(np.sum(diag))
    return TraceResult(tr, 0.0, diag, settings, Convergence(True, op.n, op.n, time.perf_counter() - t0, [tr]))


def trace(
    op: LinearOperator | torch.Tensor,
    method: Literal["hutchpp", "hutchinson", "exact"] = "hutchpp",
    n_matvecs: int = 99,
    tol: float = 1e-3,
    seed: int = 0,
) -> TraceResult:
    """Hessian trace: Hutch++ (default), Hutchinson (PyHessian's rule) or exact."""
    if method == "hutchpp":
        return hutchpp(op, n_matvecs=n_matvecs, seed=seed)
    if method == "hutchinson":
        return hutchinson(op, max_iter=n_matvecs, tol=tol, seed=seed)
    if method == "exact":
        return exact_trace(op)
    raise LandscapeError(f"method must be hutchpp|hutchinson|exact, got {method!r}")


# --------------------------------------------------------------------------- density
def slq_density(
    op: LinearOperator | torch.Tensor,
    n_iter: int = 80,
    n_runs: int = 1,
    seed: int = 0,
) -> DensityResult:
    """Eigenvalue density by stochastic Lanczos quadrature (Ghorbani et al. 2019).

    Per run: a normalised Rademacher start, ``n_iter`` Lanczos steps with full
    reorthogonalisation, Gauss quadrature nodes = Ritz values, weights = squared first
    components of the tridiagonal eigenvectors (they sum to 1 per run).
    """
    op = as_operator(op)
    if n_iter < 1 or n_runs < 1:
        raise LandscapeError("n_iter and n_runs must be >= 1")
    settings = _settings(op, "slq", max_iter=n_iter, seed=seed, criterion="fixed", extra={"n_runs": n_runs})
    t0 = time.perf_counter()
    g = _gen(seed)
    dt = op.dtype
    m_max = min(n_iter, op.n)
    nodes, weights = [], []
    n_mv = 0
    for _ in range(n_runs):
        q = _rademacher(op, g, dt)
        q /= q.norm()
        Q = torch.zeros(m_max, op.n, dtype=dt, device=op.device)
        alphas: list[float] = []
        betas: list[float] = []
        scale = 0.0
        for j in range(m_max):
            Q[j] = q
            w = _mv(op, q)
            n_mv += 1
            alpha = float(torch.dot(w, q))
            alphas.append(alpha)
            scale = max(scale, abs(alpha))
            w = w - alpha * q
            if j > 0:
                w = w - betas[-1] * Q[j - 1]
            for _r in range(2):
                w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)
            beta = float(w.norm())
            scale = max(scale, beta)
            if j + 1 == m_max or beta <= 1e-10 * max(scale, 1e-30):
                break  # stop at an invariant subspace: the quadrature is exact for it
            betas.append(beta)
            q = w / beta
        if len(alphas) == 1:
            theta, S = np.array(alphas), np.ones((1, 1))
        else:
            theta, S = eigh_tridiagonal(np.array(alphas), np.array(betas))
        nodes.append(theta)
        weights.append(S[0, :] ** 2)
    c = Convergence(True, m_max, n_mv, time.perf_counter() - t0, [float(np.sum(w * x)) for x, w in zip(nodes, weights)])
    return DensityResult(nodes, weights, op.n, settings, c)


# --------------------------------------------------------------------------- per group
def group_spectrum(
    op: LinearOperator,
    groups: GroupSpec = None,
    k: int = 1,
    max_iter: int = 100,
    tol: float = 1e-3,
    seed: int = 0,
    trace_method: Literal["auto", "hutchpp", "hutchinson", "exact"] = "auto",
    trace_matvecs: int = 30,
    exact_max: int = 64,
) -> dict[str, GroupSpectrum]:
    """Per parameter group: top eigenvalue(s) and trace of its diagonal Hessian block.

    ``groups`` is resolved by ``op.pset.groups`` (see :meth:`ParamSet.groups`: per
    parameter, per module, per layer, a callable, or a mapping to names / flat masks);
    an operator without ``pset`` needs a mapping to index tensors. ``trace_method="auto"``
    is exact for groups of at most ``exact_max`` parameters, else Hutch++.
    """
    if hasattr(op, "pset"):
        index = op.pset.groups(groups)  # type: ignore[attr-defined]
    elif isinstance(groups, Mapping) and all(isinstance(v, torch.Tensor) for v in groups.values()):
        index = {g: (torch.nonzero(v).flatten() if v.dtype == torch.bool else v.long()) for g, v in groups.items()}
    else:
        raise LandscapeError("an operator without a parameter set needs groups as {name: index tensor}")
    out: dict[str, GroupSpectrum] = {}
    for name, idx in index.items():
        sub = RestrictedOperator(op, idx)
        kk = min(k, sub.n)
        eig = lanczos(sub, k=kk, max_iter=max_iter, tol=tol, seed=seed)
        eig.settings.extra["group"] = name
        tm = trace_method
        if tm == "auto":
            tm = "exact" if sub.n <= exact_max else "hutchpp"
        tr = trace(sub, method=tm, n_matvecs=trace_matvecs, tol=tol, seed=seed)  # type: ignore[arg-type]
        tr.settings.extra["group"] = name
        out[name] = GroupSpectrum(name, sub.n, eig, tr)
    return out


__all__ = [
    "Convergence",
    "DensityResult",
    "EigenResult",
    "GroupSpectrum",
    "SpectrumSettings",
    "as_operator",
    "exact_trace",
    "group_spectrum",
    "hutchinson",
    "hutchpp",
    "lanczos",
    "power_iteration",
    "slq_density",
    "top_eigenvalues",
    "trace",
]
