"""Top-k eigenvalues, traces and SLQ density against the dense Hessian."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from ls_helpers import one_thread  # noqa: F401  (autouse fixture)
from ls_helpers import Quadratic, bert_batches, bert_loss, dense_hessian, mlp, mlp_batches, mlp_loss, quad_batches, quad_loss, tiny_bert

from landscape import (
    DenseOperator,
    HessianOperator,
    LandscapeError,
    exact_trace,
    group_spectrum,
    hutchinson,
    hutchpp,
    lanczos,
    power_iteration,
    slq_density,
    top_eigenvalues,
    trace,
)


def rel(a, b):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12))


@pytest.fixture(scope="module")
def mlp_case():
    m, bs = mlp(0, hidden=6), mlp_batches(0)
    H = dense_hessian(m, mlp_loss, bs)
    return m, bs, H, torch.linalg.eigvalsh(H).numpy()[::-1].copy()


@pytest.fixture(scope="module")
def bert_case():
    m, bs = tiny_bert(1), bert_batches(1)
    H = dense_hessian(m, bert_loss, bs)
    return m, bs, H, torch.linalg.eigvalsh(H).numpy()[::-1].copy()


@pytest.mark.parametrize("case", ["mlp_case", "bert_case"])
def test_lanczos_top_k_matches_eigvalsh(case, request):
    m, bs, H, ev = request.getfixturevalue(case)
    loss = mlp_loss if case == "mlp_case" else bert_loss
    op = HessianOperator(m, loss, bs)
    res = top_eigenvalues(op, k=3, tol=1e-9, max_iter=op.n)
    assert rel(res.eigenvalues, ev[:3]) < 1e-3
    assert res.convergence.converged
    V = res.eigenvectors
    for i in range(3):  # eigenvectors too
        torch.testing.assert_close(H @ V[i], res.eigenvalues[i] * V[i], atol=1e-4 * abs(ev[0]), rtol=0)
    s = res.settings
    assert (s.method, s.k, s.tol, s.seed, s.n_params) == ("lanczos", 3, 1e-9, 0, op.n)
    assert s.n_batches == len(bs) and s.n_examples == sum(len(b[1]) if isinstance(b, tuple) else len(b["labels"]) for b in bs)
    assert res.convergence.n_matvecs == len(res.convergence.history) <= op.n


def test_power_iteration_matches_largest_magnitude(mlp_case):
    m, bs, H, ev = mlp_case
    res = power_iteration(HessianOperator(m, mlp_loss, bs), k=2, tol=1e-10, max_iter=3000)
    lm = sorted(ev, key=lambda x: -abs(x))[:2]
    assert rel(res.eigenvalues, lm) < 1e-3
    assert res.settings.method == "power" and res.convergence.n_matvecs > 0


def test_lanczos_needs_fewer_products_than_power_at_same_tolerance(mlp_case):
    m, bs, H, ev = mlp_case
    lz = lanczos(H, k=1, tol=1e-6)
    pw = power_iteration(H, k=1, tol=1e-6, max_iter=5000)
    assert rel(lz.top, ev[0]) < 1e-4
    assert lz.convergence.n_matvecs < pw.convergence.n_matvecs


@settings(max_examples=12, deadline=None)
@given(n=st.integers(2, 40), k=st.integers(1, 3), seed=st.integers(0, 2**31 - 1), which=st.sampled_from(["LA", "LM"]))
def test_lanczos_random_symmetric(n, k, seed, which):
    k = min(k, n)
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = A + A.T
    ev = torch.linalg.eigvalsh(A).numpy()
    want = sorted(ev, key=(lambda x: -abs(x)) if which == "LM" else (lambda x: -x))[:k]
    res = lanczos(A, k=k, tol=1e-10, max_iter=n, which=which)
    assert np.allclose(res.eigenvalues, want, rtol=1e-3, atol=1e-6 * np.abs(ev).max())


def test_lanczos_handles_low_rank_and_exact_breakdown():
    u = torch.zeros(20, dtype=torch.float64)
    u[3] = 2.0
    A = torch.outer(u, u)  # rank one: Krylov space breaks down after one step
    res = lanczos(A, k=2, tol=1e-10)
    assert res.eigenvalues[0] == pytest.approx(4.0)
    assert abs(res.eigenvalues[1]) < 1e-12
    assert res.convergence.converged


def test_traces_match_dense(mlp_case):
    m, bs, H, ev = mlp_case
    op = HessianOperator(m, mlp_loss, bs)
    tr = float(ev.sum())
    assert rel(exact_trace(op).trace, tr) < 1e-9
    hp = hutchpp(op, n_matvecs=3 * op.n)  # exact once the sketch spans everything
    assert rel(hp.trace, tr) < 1e-3
    assert hp.settings.method == "hutch++" and hp.settings.max_iter == 3 * op.n
    h = hutchinson(op, max_iter=300, tol=0, seed=3)
    assert abs(h.trace - tr) < 5 * h.std_error
    assert trace(op, method="exact").trace == pytest.approx(tr)


def test_hutchinson_exact_on_diagonal_and_stops_on_tolerance():
    d = torch.linspace(0.5, 3.0, 30, dtype=torch.float64)
    q = Quadratic(torch.diag(d))
    op = HessianOperator(q, quad_loss, quad_batches())
    h = hutchinson(op, max_iter=50, tol=1e-3)
    assert h.trace == pytest.approx(float(d.sum()), rel=1e-12)  # Rademacher: z^T D z = tr D
    assert h.convergence.converged and h.convergence.n_iter == 2


def test_hutchpp_beats_hutchinson_on_low_rank_plus_noise():
    g = torch.Generator().manual_seed(0)
    n = 200
    U = torch.linalg.qr(torch.randn(n, 5, generator=g, dtype=torch.float64))[0]
    A = U @ torch.diag(torch.tensor([100.0, 80, 60, 40, 20], dtype=torch.float64)) @ U.T + 0.01 * torch.eye(n, dtype=torch.float64)
    tr = float(A.trace())
    assert rel(hutchpp(A, n_matvecs=30).trace, tr) < 1e-3
    assert rel(hutchinson(A, max_iter=30, tol=0).trace, tr) > 1e-3


def test_slq_density_integrates_to_one_and_mean_is_trace_over_n():
    d = torch.linspace(-1.0, 5.0, 40, dtype=torch.float64)
    q = Quadratic(torch.diag(d))
    op = HessianOperator(q, quad_loss, quad_batches())
    dens = slq_density(op, n_iter=20, n_runs=3, seed=1)
    for w in dens.weights:
        assert w.sum() == pytest.approx(1.0, abs=1e-10)
    assert dens.mean == pytest.approx(float(d.mean()), rel=1e-9)
    grid, phi = dens.density()
    assert np.trapezoid(phi, grid) == pytest.approx(1.0, abs=1e-3)
    assert dens.settings.method == "slq" and dens.settings.extra["n_runs"] == 3


def test_slq_on_model_hessian(bert_case):
    m, bs, H, ev = bert_case
    op = HessianOperator(m, bert_loss, bs)
    dens = slq_density(op, n_iter=op.n, n_runs=8, seed=0)
    grid, phi = dens.density(n_grid=4000)
    assert np.trapezoid(phi, grid) == pytest.approx(1.0, abs=2e-3)
    # each run's mean is v^T H v / n exactly (full Krylov space); their spread bounds the error
    per_run = np.array(dens.convergence.history)
    se = per_run.std(ddof=1) / np.sqrt(len(per_run))
    assert abs(dens.mean - ev.sum() / op.n) < 5 * se + 1e-12
    # quadrature nodes of a full run are the eigenvalues
    assert rel(np.sort(dens.nodes[0])[::-1][:3], ev[:3]) < 1e-6


def test_group_spectrum_matches_dense_blocks(bert_case):
    m, bs, H, ev = bert_case
    op = HessianOperator(m, bert_loss, bs)
    res = group_spectrum(op, groups=None, k=1, tol=1e-10, max_iter=200)
    assert list(res) == op.pset.names
    for name, gs in res.items():
        sl = op.pset.slice_of(name)
        block = H[sl, sl]
        assert rel(gs.top, float(torch.linalg.eigvalsh(block).max())) < 1e-3
        assert rel(gs.trace.trace, float(block.trace())) < 1e-3
        assert gs.n_params == block.shape[0] and gs.eigen.settings.extra["group"] == name
    # a group cut inside a parameter (a slice of one weight) and a whole-module group
    w = op.pset.names[0]
    mask = op.pset.mask({w: slice(0, 10)})
    res2 = group_spectrum(op, groups={"first10": mask, "head": ["head.weight", "head.bias"]}, tol=1e-10)
    idx = torch.nonzero(mask).flatten()
    assert rel(res2["first10"].top, float(torch.linalg.eigvalsh(H[idx][:, idx]).max())) < 1e-3
    hs = torch.cat([torch.arange(op.pset.slice_of(n).start, op.pset.slice_of(n).stop) for n in ["head.weight", "head.bias"]])
    assert rel(res2["head"].trace.trace, float(H[hs][:, hs].trace())) < 1e-3


def test_validation_errors():
    A = torch.eye(3, dtype=torch.float64)
    with pytest.raises(LandscapeError):
        lanczos(A, k=4)
    with pytest.raises(LandscapeError):
        top_eigenvalues(A, method="arnoldi")
    with pytest.raises(LandscapeError):
        hutchpp(A, n_matvecs=2)
    with pytest.raises(LandscapeError):
        DenseOperator(torch.ones(2, 3))
    with pytest.raises(LandscapeError):
        group_spectrum(DenseOperator(A), groups="param")


def test_start_vectors(bert_case):
    m, bs, H, ev = bert_case
    op = HessianOperator(m, bert_loss, bs)
    for start, used in (("gradient", "gradient + 10% random"), ("random", "random"), (op.grad.clone(), "given")):
        res = lanczos(op, k=1, tol=1e-9, start=start)
        assert res.settings.extra["start"] == used
        assert rel(res.top, ev[0]) < 1e-3
    # operators without a gradient fall back to a random start
    assert lanczos(H, k=1).settings.extra["start"] == "random (no gradient available)"
    with pytest.raises(LandscapeError):
        lanczos(op, start="bogus")
    with pytest.raises(LandscapeError):
        top_eigenvalues(op, method="power", which="LA")
