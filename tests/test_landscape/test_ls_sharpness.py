"""Sharpness on quadratics (exact values) and tiny models; every number has a definition."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from ls_helpers import one_thread  # noqa: F401  (autouse fixture)
from ls_helpers import Quadratic, bert_batches, bert_loss, mlp, mlp_batches, mlp_loss, quad_batches, quad_loss, tiny_bert

from landscape import LandscapeError, group_sharpness, prefix_indicator, sam_sharpness
from landscape.sharpness import SharpnessDefinition


def _quad(seed=0, n=5):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = M @ M.T + 0.5 * torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, generator=g, dtype=torch.float64)
    th = torch.randn(n, generator=g, dtype=torch.float64)
    return Quadratic(A, b, th), A, b, th


def _L(A, b, t):
    return float(0.5 * t @ A @ t + b @ t)


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 1000), rho=st.floats(0.01, 1.0), n_random=st.integers(0, 3))
def test_indicator_is_exact_on_a_quadratic(seed, rho, n_random):
    q, A, b, th = _quad(seed)
    res = prefix_indicator(q, quad_loss, quad_batches(), rho=rho, n_random=n_random, seed=seed)
    L0 = _L(A, b, th)
    g = A @ th + b
    dirs = [g / g.norm()]
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n_random):
        z = torch.randn(5, generator=gen, dtype=torch.float64)
        z = z / z.norm()
        dirs += [z, -z]
    want = [_L(A, b, th + rho * d) for d in dirs]
    np.testing.assert_allclose(res.per_direction, want, rtol=1e-12)
    assert res.base_loss == pytest.approx(L0, rel=1e-12)
    assert res.value == pytest.approx((max([L0, *want]) - L0) / (1 + L0), rel=1e-10, abs=1e-14)
    d = res.definition
    assert (d.kind, d.rho, d.radius, d.n_directions) == ("prefix_indicator", rho, rho, 1 + 2 * n_random)
    assert "(L(P+u) - L(P)) / (1 + L(P))" in d.formula and d.n_examples == 6 and d.n_batches == 2
    torch.testing.assert_close(q.theta.detach(), th)


def test_sam_one_step_is_the_sam_point_and_more_steps_do_not_decrease():
    q, A, b, th = _quad(1)
    rho = 0.3
    g = A @ th + b
    one = sam_sharpness(q, quad_loss, quad_batches(), rho=rho, steps=1)
    assert one.value == pytest.approx(_L(A, b, th + rho * g / g.norm()) - _L(A, b, th), rel=1e-12)
    many = sam_sharpness(q, quad_loss, quad_batches(), rho=rho, steps=8)
    lam = float(torch.linalg.eigvalsh(A).max())
    assert one.value <= many.value <= rho * float(g.norm()) + 0.5 * lam * rho**2 + 1e-12
    assert many.definition.ascent_steps == 8 and len(many.per_direction) == 8
    assert many.definition.formula.startswith("max_{||u||_2 <= r}")


def test_sam_at_a_minimum_falls_back_to_random_and_respects_the_ball():
    A = torch.diag(torch.tensor([4.0, 1.0, 0.5], dtype=torch.float64))
    q = Quadratic(A)  # theta = 0: zero gradient
    rho = 0.2
    res = sam_sharpness(q, quad_loss, quad_batches(), rho=rho, steps=20)
    assert 0 < res.value <= 0.5 * 4.0 * rho**2 + 1e-12
    assert res.value > 0.5 * 0.5 * rho**2  # ascent moved toward the sharp axis


def test_relative_radius():
    q, A, b, th = _quad(2)
    res = prefix_indicator(q, quad_loss, quad_batches(), rho=0.1, relative=True, n_random=1)
    assert res.definition.radius == pytest.approx(0.1 * float(th.norm()))
    assert res.definition.relative


def test_group_sharpness_confines_the_perturbation():
    m, bs = mlp(0), mlp_batches(0)
    m.train()
    before = [p.detach().clone() for p in m.parameters()]
    res = group_sharpness(m, mlp_loss, bs, groups=None, rho=0.05, n_random=0)
    assert list(res) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    for name, r in res.items():
        alone = prefix_indicator(m, mlp_loss, bs, rho=0.05, params=[name], n_random=0)
        assert r.value == pytest.approx(alone.value, rel=1e-10, abs=1e-15)
        assert r.definition.group == name and r.definition.n_params == alone.definition.n_params
    sam = group_sharpness(m, mlp_loss, bs, groups="module", kind="sam", rho=0.05, steps=2)
    assert set(sam) == {"0", "2"} and all(s.definition.kind == "sam" for s in sam.values())
    assert m.training and all(torch.equal(a, p.detach()) for a, p in zip(before, m.parameters()))
    with pytest.raises(LandscapeError):
        group_sharpness(m, mlp_loss, bs, kind="other")
    with pytest.raises(LandscapeError):
        group_sharpness(m, mlp_loss, bs, kind="sam", n_random=3)  # an indicator option


def test_indicator_on_tiny_bert_dict_batches_is_nonnegative_and_documented():
    m, bs = tiny_bert(4), bert_batches(4)
    res = prefix_indicator(m, bert_loss, bs, rho=0.5, n_random=2, params=lambda n: n.startswith("head"))
    assert res.value >= 0 and res.max_loss >= res.base_loss
    d = dataclasses.asdict(res.definition)
    assert d["params"] == ["head.weight", "head.bias"] and d["n_examples"] == 5
    assert "normalised gradient" in d["directions"] and "2 random" in d["directions"]
    assert float(res) == res.value and res.to_dict()["definition"]["rho"] == 0.5


def test_definition_validation():
    with pytest.raises(LandscapeError):
        SharpnessDefinition("sam", rho=0.0, radius=0.0, relative=False, directions="", n_directions=1,
                            n_batches=1, n_examples=1, n_params=1, formula="")
    q, *_ = _quad(0)
    with pytest.raises(LandscapeError):
        prefix_indicator(q, quad_loss, quad_batches(), rho=-1)
    with pytest.raises(LandscapeError):
        sam_sharpness(q, quad_loss, quad_batches(), steps=0)
