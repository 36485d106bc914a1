"""The operator interface (``@``, ``matmat``, ``to_scipy``) and the results' ``to_dict``/``from_dict``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ls_helpers import one_thread  # noqa: F401  (autouse fixture)
from ls_helpers import bert_batches, bert_loss, mlp, mlp_batches, mlp_loss, tiny_bert

from landscape import (
    DenseOperator,
    DensityResult,
    EigenResult,
    GaussNewtonOperator,
    HessianOperator,
    LandscapeError,
    Sharpness,
    Surface,
    group_spectrum,
    hutchpp,
    loss_surface_1d,
    loss_surface_2d,
    prefix_indicator,
    random_direction,
    sam_sharpness,
    slq_density,
    top_eigenvalues,
)
from landscape.operators import RestrictedOperator
from landscape.results import GroupSpectrum, TraceResult


def _operators() -> dict[str, object]:
    """One of each operator kind on the same small MLP (float64)."""
    m, bs = mlp(seed=3), mlp_batches(seed=3)
    H = HessianOperator(m, mlp_loss, bs)
    g = torch.Generator().manual_seed(0)
    A = torch.randn(7, 7, generator=g, dtype=torch.float64)
    return {
        "dense": DenseOperator(A + A.T),
        "hessian (cached)": H,
        "hessian (double backward)": HessianOperator(m, mlp_loss, bs, method="double_backward", cache_graph=False),
        "hessian (func)": HessianOperator(m, mlp_loss, bs, method="func", cache_graph=False),
        "gauss-newton": GaussNewtonOperator(m, lambda mod, b: mod(b[0]),
                                            lambda out, b: torch.nn.functional.cross_entropy(out, b[1]), bs),
        "restricted": RestrictedOperator(H, torch.tensor([0, 3, 5, 11, 20])),
    }


@pytest.mark.parametrize("name", list(_operators()))
def test_matmul_and_matmat_equal_the_matvec_on_random_vectors(name):
    op = _operators()[name]
    g = torch.Generator().manual_seed(1)
    v = torch.randn(op.n, generator=g, dtype=torch.float64)
    X = torch.randn(op.n, 3, generator=g, dtype=torch.float64)
    ref_v = op.matvec(v)
    ref_X = torch.stack([op.matvec(X[:, j]) for j in range(3)], dim=1)
    assert op.shape == (op.n, op.n)
    torch.testing.assert_close(op @ v, ref_v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op @ X, ref_X, rtol=1e-10, atol=1e-12)  # columns, as a matrix product
    torch.testing.assert_close(op.matmat(X.T), ref_X.T, rtol=1e-10, atol=1e-12)  # rows: the probe blocks
    before = op.n_matvecs
    op.matmat(X.T)
    assert op.n_matvecs - before == 3  # every product is counted, batched or not
    with pytest.raises(LandscapeError, match="shape"):
        op @ torch.zeros(op.n + 1, dtype=torch.float64)
    with pytest.raises(LandscapeError, match="shape"):
        op @ torch.zeros(2, 2, op.n, dtype=torch.float64)


def test_to_scipy_runs_eigsh_and_agrees_with_our_top_eigenvalue_on_a_small_model():
    from scipy.sparse.linalg import LinearOperator as ScipyOperator
    from scipy.sparse.linalg import eigsh

    model, batches = tiny_bert(seed=1, dtype=torch.float64), bert_batches(seed=1)
    with HessianOperator(model, bert_loss, batches) as H:
        A = H.to_scipy()
        assert isinstance(A, ScipyOperator) and A.shape == (H.n, H.n) and A.dtype == np.float64
        X = np.random.default_rng(0).standard_normal((H.n, 2))
        np.testing.assert_allclose(A.matmat(X), (H @ torch.from_numpy(X)).numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(A.rmatvec(X[:, 0]), A.matvec(X[:, 0]), rtol=0, atol=0)  # symmetric
        vals, vecs = eigsh(A, k=2, which="LA", tol=1e-10)
        ours = top_eigenvalues(H, k=2, max_iter=H.n, tol=1e-10, seed=0)
    assert np.allclose(np.sort(vals)[::-1], ours.eigenvalues, rtol=1e-7, atol=1e-9)
    top = vecs[:, int(np.argmax(vals))]
    assert abs(float(np.dot(top, ours.eigenvectors[0].numpy()))) == pytest.approx(1.0, abs=1e-6)


def test_to_scipy_of_a_float32_operator_speaks_float32():
    A = torch.diag(torch.arange(1.0, 6.0))
    S = DenseOperator(A).to_scipy()
    assert S.dtype == np.float32
    np.testing.assert_array_equal(S.matvec(np.ones(5, dtype=np.float32)), np.arange(1.0, 6.0, dtype=np.float32))


# --------------------------------------------------------------------------- to_dict / from_dict
def _same(a, b) -> bool:
    """JSON-equal (NaN included): what a cache written and read back must give."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _through_json(d: dict) -> dict:
    return json.loads(json.dumps(d))


def _results() -> dict[str, object]:
    m, bs = mlp(seed=2), mlp_batches(seed=2)
    H = HessianOperator(m, mlp_loss, bs)
    d1, d2 = random_direction(m, seed=0), random_direction(m, seed=1)
    return {
        "eigen": top_eigenvalues(H, k=2, seed=0),
        "trace": hutchpp(H, n_matvecs=12, seed=0),
        "density": slq_density(H, n_iter=8, n_runs=2, seed=0),
        "group": next(iter(group_spectrum(H, "param", trace_matvecs=6).values())),
        "sam": sam_sharpness(m, mlp_loss, bs, rho=0.05, seed=0),
        "indicator": prefix_indicator(m, mlp_loss, bs, rho=0.05, n_random=2, seed=0),
        "surface 1d, directions kept": loss_surface_1d(m, mlp_loss, bs, d1, alphas=np.linspace(-1, 1, 3),
                                                        progress=False, label="one"),
        "surface 2d": loss_surface_2d(m, mlp_loss, bs, d1, d2, xs=np.linspace(-1, 1, 3), progress=False,
                                      keep_directions=False),
    }


@pytest.mark.parametrize("name", list(_results()))
def test_results_round_trip_exactly_through_json(name):
    r = _results()[name]
    cls = type(r)
    back = cls.from_dict(_through_json(r.to_dict()))
    assert type(back) is cls and _same(back.to_dict(), r.to_dict())
    if isinstance(r, EigenResult):
        np.testing.assert_array_equal(back.eigenvalues, r.eigenvalues)
        assert back.eigenvectors is None  # a summary leaves them out ...
        full = EigenResult.from_dict(_through_json(r.to_dict(vectors=True)))
        assert full.eigenvectors.dtype == r.eigenvectors.dtype and torch.equal(full.eigenvectors, r.eigenvectors)
        assert _same(full.to_dict(vectors=True), r.to_dict(vectors=True))  # ... and with vectors=True keeps them
    if isinstance(r, Surface):
        assert all(np.array_equal(a, b) for a, b in zip(back.coords, r.coords))
        np.testing.assert_array_equal(back.losses, r.losses)
        assert (back.directions is None) == (r.directions is None)
        if r.directions is not None:
            np.testing.assert_array_equal(back.directions, r.directions)
    if isinstance(r, Sharpness):
        assert back.value == r.value and back.definition == r.definition and back.per_direction == r.per_direction
    if isinstance(r, DensityResult):
        assert back.mean == r.mean and all(np.array_equal(a, b) for a, b in zip(back.nodes, r.nodes))
    if isinstance(r, GroupSpectrum):
        assert back.top == r.top and back.trace.trace == r.trace.trace
    if isinstance(r, TraceResult):
        assert back.trace == r.trace and back.samples == r.samples and back.settings == r.settings
