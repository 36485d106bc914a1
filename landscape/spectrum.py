"""Hessian spectra from matrix-vector products: top-k eigenpairs, trace, density.

Every routine takes a :class:`~landscape.operators.LinearOperator` (usually a
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

import math
import time
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

from ._params import GroupSpec, LandscapeError
from .operators import DenseOperator, LinearOperator, RestrictedOperator
from .results import Convergence, DensityResult, EigenResult, GroupSpectrum, SpectrumSettings, TraceResult

Which = Literal["LA", "LM"]


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
def _reorth(w: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Full reorthogonalisation against the rows of ``Q``; twice is enough (Kahan/Parlett)."""
    for _ in range(2):
        w = w - Q.T @ (Q @ w)
    return w


class _Krylov:
    """The Lanczos recurrence with full reorthogonalisation, shared by :func:`lanczos` and
    :func:`slq_density`: a growing basis ``Q`` and the tridiagonal ``(alphas, betas)``."""

    def __init__(self, op: LinearOperator, m_max: int, dtype: torch.dtype):
        self.op = op
        self.Q = torch.zeros(min(m_max, 8), op.n, dtype=dtype, device=op.device)  # grows: most runs stop early
        self.m_max = m_max
        self.alphas: list[float] = []
        self.betas: list[float] = []
        self.n_mv = 0

    @property
    def m(self) -> int:
        return len(self.alphas)

    def step(self, q: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Append the unit vector ``q``; return the next residual ``w`` and its norm."""
        j = self.m
        if j == self.Q.shape[0]:
            grow = min(self.Q.shape[0], self.m_max - self.Q.shape[0])
            self.Q = torch.cat([self.Q, self.Q.new_zeros(grow, self.Q.shape[1])])
        self.Q[j] = q
        w = _mv(self.op, q)
        self.n_mv += 1
        alpha = float(torch.dot(w, q))
        w = w - alpha * q
        if j > 0:
            w = w - self.betas[-1] * self.Q[j - 1]
        w = _reorth(w, self.Q[: j + 1])
        self.alphas.append(alpha)
        return w, float(w.norm())

    def next_vector(self, w: torch.Tensor, beta: float, g: torch.Generator, breakdown: bool = False) -> torch.Tensor:
        """The next basis vector; at a breakdown (an invariant subspace) a fresh orthogonal one."""
        if breakdown:
            w = _reorth(_randn(self.op, g, self.Q.dtype), self.Q[: self.m])
            self.betas.append(0.0)
            return w / w.norm()
        self.betas.append(beta)
        return w / beta

    def ritz(self) -> tuple[np.ndarray, np.ndarray]:
        """Ritz values and the tridiagonal's eigenvectors (columns)."""
        if self.m == 1:
            return np.array(self.alphas), np.ones((1, 1))
        return eigh_tridiagonal(np.array(self.alphas), np.array(self.betas))

    def ritz_vectors(self, S: np.ndarray, idx: np.ndarray) -> torch.Tensor:
        """Unit Ritz vectors of the picked values, as rows."""
        Sk = torch.as_tensor(S[:, idx].T.copy(), dtype=self.Q.dtype, device=self.Q.device)
        vecs = Sk @ self.Q[: self.m]
        return vecs / vecs.norm(dim=1, keepdim=True)


def _converged(top: np.ndarray, prev: np.ndarray | None, resid: np.ndarray, tol: float, criterion: str) -> bool:
    if criterion == "residual":
        return bool(np.all(resid < tol))
    return prev is not None and len(prev) == len(top) and _rel_change(top, prev) < tol


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
    if k > op.n:
        raise LandscapeError(f"k={k} exceeds the dimension {op.n}")
    dt, m_max = dtype or op.dtype, min(max_iter, op.n)
    if m_max < k:
        raise LandscapeError(f"max_iter={max_iter} is smaller than k={k}")
    t0, g = time.perf_counter(), _gen(seed)
    q, settings.extra["start"] = _start_vector(op, g, dt, start)
    kry = _Krylov(op, m_max, dt)
    history: list[float] = []
    prev: np.ndarray | None = None
    converged, note, scale = False, "", 0.0
    for j in range(m_max):
        w, beta = kry.step(q)
        theta, S = kry.ritz()
        scale = max(scale, float(np.max(np.abs(theta))))
        idx = _pick(theta, min(k, j + 1), which)
        history.append(float(theta[idx[0]]))
        breakdown = beta <= 1e-10 * max(scale, 1e-30)
        if len(idx) == k:
            resid = beta * np.abs(S[-1, idx]) / (np.abs(theta[idx]) + 1e-12)
            done = _converged(theta[idx], prev, resid, tol, criterion)
            if done or breakdown:
                converged, note = True, "invariant subspace" if breakdown and not done else ""
                break
        prev = theta[idx].copy()
        if j + 1 == m_max:
            break
        q = kry.next_vector(w, beta, g, breakdown)  # breakdown: the invariant subspace is smaller than k
    if kry.m == op.n and not converged:
        converged, note = True, "Krylov space is the whole space (exact)"
    resid_final = (beta * np.abs(S[-1, idx]) / (np.abs(theta[idx]) + 1e-12)).tolist()
    vecs = kry.ritz_vectors(S, idx) if return_vectors else None
    conv = Convergence(converged, kry.m, kry.n_mv, time.perf_counter() - t0, history, resid_final, note)
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
        kry = _Krylov(op, m_max, dt)
        q = q / q.norm()
        scale = 0.0
        for j in range(m_max):
            w, beta = kry.step(q)
            scale = max(scale, abs(kry.alphas[-1]), beta)
            if j + 1 == m_max or beta <= 1e-10 * max(scale, 1e-30):
                break  # stop at an invariant subspace: the quadrature is exact for it
            q = kry.next_vector(w, beta, g)
        theta, S = kry.ritz()
        n_mv += kry.n_mv
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
