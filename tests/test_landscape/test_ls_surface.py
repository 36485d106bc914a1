"""Directions and loss grids: filter norms, exact quadratic profiles, centre = model loss."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from ls_helpers import one_thread  # noqa: F401  (autouse fixture)
from ls_helpers import Quadratic, bert_batches, bert_loss, mlp, mlp_batches, mlp_loss, quad_batches, quad_loss, tiny_bert

from landscape import (
    HessianOperator,
    LandscapeError,
    ParamSet,
    Surface,
    dataset_loss,
    eigen_directions,
    interpolation_direction,
    lanczos,
    loss_surface_1d,
    loss_surface_2d,
    random_direction,
)
from landscape._params import merge_batches


@functools.lru_cache(maxsize=1)
def _bert():
    return tiny_bert(0)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), ignore_1d=st.booleans())
def test_filter_normalised_direction_has_weight_filter_norms(seed, ignore_1d):
    m = _bert()
    ps = ParamSet.from_model(m)
    d = random_direction(m, seed=seed, norm="filter", ignore_1d=ignore_1d)
    for dp, w in zip(ps.unflatten(d.vector), ps.params):
        if w.dim() <= 1:
            if ignore_1d:
                assert torch.count_nonzero(dp) == 0
            else:
                torch.testing.assert_close(dp, w.detach())
            continue
        torch.testing.assert_close(dp.reshape(dp.shape[0], -1).norm(dim=1), w.detach().reshape(w.shape[0], -1).norm(dim=1))
    assert d.kind == "random" and d.info == {"seed": seed, "norm": "filter", "ignore_1d": ignore_1d}
    # same seed, same direction; other seed, other direction
    torch.testing.assert_close(random_direction(m, seed=seed, ignore_1d=ignore_1d).vector, d.vector)
    assert not torch.allclose(random_direction(m, seed=seed + 1, ignore_1d=ignore_1d).vector, d.vector)


def test_layer_model_unit_norms():
    m = mlp(0)
    ps = ParamSet.from_model(m)
    d = random_direction(m, norm="layer", ignore_1d=False)
    for dp, w in zip(ps.unflatten(d.vector), ps.params):
        assert float(dp.norm()) == pytest.approx(float(w.detach().norm()), rel=1e-9)
    assert float(random_direction(m, norm="model").vector.norm()) == pytest.approx(float(ps.get_flat().norm()), rel=1e-9)
    assert float(random_direction(m, norm="unit").vector.norm()) == pytest.approx(1.0)
    with pytest.raises(LandscapeError):
        random_direction(m, norm="weird")


def _quad(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = M @ M.T + torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, generator=g, dtype=torch.float64)
    th = torch.randn(n, generator=g, dtype=torch.float64)
    return Quadratic(A, b, th), A, b, th


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 1000))
def test_quadratic_gives_exact_1d_profile(seed):
    q, A, b, th = _quad(seed)
    d = torch.randn(6, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    alphas = np.linspace(-2, 2, 9)
    s = loss_surface_1d(q, quad_loss, quad_batches(), d, alphas, progress=False)
    L0 = 0.5 * th @ A @ th + b @ th
    slope = (A @ th + b) @ d
    curv = d @ A @ d
    expect = [float(L0 + a * slope + 0.5 * a * a * curv) for a in alphas]
    np.testing.assert_allclose(s.losses, expect, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(q.theta.detach(), th)  # restored


def test_eigen_direction_curvature_is_the_eigenvalue():
    q, A, b, th = _quad(3)
    top = lanczos(HessianOperator(q, quad_loss, quad_batches()), k=2, tol=1e-12)
    d1, d2 = eigen_directions(top, k=2)
    assert d1.info["eigenvalue"] == pytest.approx(float(torch.linalg.eigvalsh(A).max()))
    h = 1e-2
    s = loss_surface_1d(q, quad_loss, quad_batches(), d1, [-h, 0.0, h], progress=False)
    second = (s.losses[0] - 2 * s.losses[1] + s.losses[2]) / h**2
    assert second == pytest.approx(d1.info["eigenvalue"], rel=1e-6)
    with pytest.raises(LandscapeError):
        eigen_directions(top, k=3)


def test_2d_centre_equals_model_loss_and_state_is_restored(tmp_path):
    m, bs = tiny_bert(2), bert_batches(2)
    m.train()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    d1, d2 = random_direction(m, seed=0), random_direction(m, seed=1)
    xs = np.linspace(-1, 1, 5)
    s = loss_surface_2d(m, bert_loss, bs, d1, d2, xs, np.linspace(-0.5, 0.5, 3), progress=False, label="DP ε=3 · (ε, δ)-DP")
    assert s.losses.shape == (5, 3)
    assert s.center_loss == dataset_loss(m, bert_loss, bs)  # bit-exact: same params, same passes
    assert m.training
    for n, p in m.named_parameters():
        assert torch.equal(p.detach(), before[n])
    # (i, j) is (xs[i], ys[j])
    s1 = loss_surface_1d(m, bert_loss, bs, d1, [xs[4]], progress=False)
    assert s1.losses[0] == pytest.approx(s.losses[4, 1], rel=1e-12)
    st_ = s.settings
    assert st_["label"] == "DP ε=3 · (ε, δ)-DP" and st_["n_examples"] == 5 and st_["n_batches"] == 2
    assert st_["directions"][0]["kind"] == "random" and st_["directions"][1]["seed"] == 1

    npz, js = s.save(tmp_path / "surf")
    assert npz.suffix == ".npz" and js.suffix == ".json"
    assert json.loads(js.read_text())["label"] == "DP ε=3 · (ε, δ)-DP"
    t = Surface.load(tmp_path / "surf.npz")
    np.testing.assert_array_equal(t.losses, s.losses)
    np.testing.assert_array_equal(t.coords[1], s.coords[1])
    np.testing.assert_array_equal(t.directions, s.directions)
    assert t.settings["directions"] == s.settings["directions"] and t.label == s.label


def test_interpolation_reaches_the_other_model():
    a, b = mlp(0), mlp(1)
    bs = mlp_batches(0)
    d = interpolation_direction(a, b)
    s = loss_surface_1d(a, mlp_loss, bs, d, [0.0, 1.0], progress=False)
    assert s.losses[0] == pytest.approx(dataset_loss(a, mlp_loss, bs), rel=1e-12)
    assert s.losses[1] == pytest.approx(dataset_loss(b, mlp_loss, bs), rel=1e-10)
    d2 = interpolation_direction(a, dict(b.named_parameters()), start=ParamSet.from_model(a).get_flat())
    torch.testing.assert_close(d2.vector, d.vector)
    with pytest.raises(LandscapeError):
        interpolation_direction(a, {"0.weight": torch.zeros(5, 4)})


def test_merged_eval_batches_give_the_same_loss():
    m, bs = tiny_bert(3), bert_batches(3, sizes=(3, 2, 4), lens=(7, 5, 6))
    merged = merge_batches(bs, max_examples=100)
    assert len(merged) == 1 and merged[0]["input_ids"].shape == (9, 7)
    assert dataset_loss(m, bert_loss, merged) == pytest.approx(dataset_loss(m, bert_loss, bs), rel=1e-9)
    d = random_direction(m, seed=0)
    a = loss_surface_1d(m, bert_loss, bs, d, [0.5], progress=False)
    b = loss_surface_1d(m, bert_loss, bs, d, [0.5], progress=False, eval_batch_size=64)
    assert a.losses[0] == pytest.approx(b.losses[0], rel=1e-9)


def test_bad_inputs():
    m = mlp(0)
    with pytest.raises(LandscapeError):
        loss_surface_1d(m, mlp_loss, mlp_batches(0), torch.ones(3, dtype=torch.float64), progress=False)
    with pytest.raises(LandscapeError):
        Surface([np.zeros(3)], np.zeros(4))
