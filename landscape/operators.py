"""Symmetric linear operators on flat vectors: the interface every curvature routine takes.

An operator is ``v -> A v`` for a symmetric ``n x n`` matrix ``A`` that is never built
(a Hessian, a Gauss-Newton matrix, a diagonal block of either). Following curvlinops,
every operator offers the same three ways in:

* ``A @ v`` (``v`` of shape ``(n,)``) and ``A @ X`` (``X`` of shape ``(n, k)``, one
  vector per column): the matrix product, as a dense ``A`` would give it;
* ``A.matmat(V)`` with one vector per *row* (``V`` of shape ``(k, n)``, result ``(k, n)``):
  the shape the spectrum routines keep their blocks of probes in. A subclass that can
  batch the ``k`` products (``HessianOperator``: one batched double backward) overrides it;
* ``A.to_scipy()``: a ``scipy.sparse.linalg.LinearOperator`` (numpy in, numpy out), so
  scipy's ``eigsh``, ``cg`` or ``lobpcg`` run on it unchanged.

Why here and not in ``hvp``: the spectrum routines, the group blocks and the dense test
operator need only this interface, not the autograd machinery of the Hessian.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ._params import LandscapeError

if TYPE_CHECKING:  # pragma: no cover
    import scipy.sparse.linalg


class LinearOperator:
    """A symmetric linear map on flat vectors of length ``n`` (duck-typed base class).

    Spectrum routines need only ``n``, ``dtype``, ``device``, ``matvec`` and ``info``.
    ``n_matvecs`` counts products so results can report their cost.
    """

    n: int
    dtype: torch.dtype
    device: torch.device
    n_matvecs: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.n)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``A v_i`` for every row ``v_i`` of ``V`` (shape ``(k, n)``), stacked as rows: ``(k, n)``.

        One product per row here; subclasses that can batch them override this. Counts ``k`` products.
        """
        V = self._check_block(V)
        if V.shape[0] == 0:
            return V.clone()
        return torch.stack([self.matvec(v) for v in V])

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        """``A @ v`` for ``v`` of shape ``(n,)``; ``A @ X`` for ``X`` of shape ``(n, k)`` (columns)."""
        if not isinstance(x, torch.Tensor):
            return NotImplemented
        if x.dim() == 1:
            return self.matvec(x)
        if x.dim() == 2:
            return self.matmat(x.T).T
        raise LandscapeError(f"A @ x needs x of shape ({self.n},) or ({self.n}, k), got {tuple(x.shape)}")

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v)

    def to_scipy(self, dtype: np.dtype | type | None = None) -> scipy.sparse.linalg.LinearOperator:
        """This operator as a ``scipy.sparse.linalg.LinearOperator`` (symmetric: ``rmatvec`` is ``matvec``).

        ``dtype``: the numpy dtype scipy sees; default float64 for a float64 operator, else
        float32 (numpy has no bfloat16). Vectors go to the operator's device and dtype and
        come back as numpy arrays; products are counted in ``n_matvecs`` as usual.
        """
        from scipy.sparse.linalg import LinearOperator as ScipyOperator

        np_dtype = np.dtype(dtype) if dtype is not None else np.dtype(np.float64 if self.dtype == torch.float64
                                                                        else np.float32)

        def to_torch(x: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.ascontiguousarray(x)).to(dtype=self.dtype, device=self.device)

        def to_numpy(t: torch.Tensor) -> np.ndarray:
            return t.detach().to("cpu", torch.float64).numpy().astype(np_dtype, copy=False)

        def mv(x: np.ndarray) -> np.ndarray:
            return to_numpy(self.matvec(to_torch(np.asarray(x).reshape(-1))))

        def mm(X: np.ndarray) -> np.ndarray:
            return to_numpy(self.matmat(to_torch(np.asarray(X).T))).T

        return ScipyOperator(shape=self.shape, matvec=mv, rmatvec=mv, matmat=mm, rmatmat=mm, dtype=np_dtype)

    def info(self) -> dict[str, Any]:
        """Settings that results record (data size, parameter count, method)."""
        return {"n_params": self.n}

    def _check(self, v: torch.Tensor) -> torch.Tensor:
        if v.dim() != 1 or v.shape[0] != self.n:
            raise LandscapeError(f"vector has shape {tuple(v.shape)}, expected ({self.n},)")
        return v.to(dtype=self.dtype, device=self.device)

    def _check_block(self, V: torch.Tensor) -> torch.Tensor:
        if V.dim() != 2 or V.shape[1] != self.n:
            raise LandscapeError(f"block has shape {tuple(V.shape)}, expected (k, {self.n})")
        return V.to(dtype=self.dtype, device=self.device)


class DenseOperator(LinearOperator):
    """A dense symmetric matrix as an operator (tests, tiny problems, sanity checks)."""

    def __init__(self, matrix: torch.Tensor):
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise LandscapeError(f"matrix must be square, got {tuple(matrix.shape)}")
        self.matrix = matrix
        self.n = matrix.shape[0]
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.n_matvecs = 0

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.n_matvecs += 1
        return self.matrix @ self._check(v)

    def info(self) -> dict[str, Any]:
        return {"n_params": self.n, "operator": "dense"}


class RestrictedOperator(LinearOperator):
    """The diagonal block ``H[idx, idx]`` of an operator: a parameter group's Hessian.

    Why a projection rather than a smaller model: a group may cut *inside* a parameter
    (one layer's slice of a prefix table); one full product per block product is the
    price, which is fine for per-layer summaries.
    """

    def __init__(self, op: LinearOperator, index: torch.Tensor):
        self.op = op
        self.index = index.to(op.device).long()
        if self.index.numel() == 0:
            raise LandscapeError("empty group")
        self.n = int(self.index.numel())
        self.dtype = op.dtype
        self.device = op.device
        self.n_matvecs = 0

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.n_matvecs += 1
        full = torch.zeros(self.op.n, dtype=self.dtype, device=self.device)
        full[self.index] = self._check(v)
        return self.op.matvec(full)[self.index]

    @property
    def grad(self) -> torch.Tensor | None:
        """The group's slice of the full operator's gradient (a Lanczos start), if any."""
        g = getattr(self.op, "grad", None)
        return g[self.index] if isinstance(g, torch.Tensor) else None

    def info(self) -> dict[str, Any]:
        d = dict(self.op.info())
        d["n_params"] = self.n
        d["n_params_total"] = self.op.n
        return d


__all__ = ["DenseOperator", "LinearOperator", "RestrictedOperator"]
