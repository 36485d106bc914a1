"""HVP equals the dense Hessian (torch.autograd.functional.hessian) times v."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from ls_helpers import one_thread  # noqa: F401  (autouse fixture)
from ls_helpers import TRAINABLE, bert_batches, bert_loss, dense_hessian, mlp, mlp_batches, mlp_loss, tiny_bert
from torch import nn

from landscape import GaussNewtonOperator, HessianOperator, LandscapeError, ParamSet, dataset_loss, hvp
from landscape._params import dataset_grad

METHODS = [("double_backward", True), ("double_backward", False), ("func", False), ("auto", False)]


@pytest.fixture(scope="module")
def mlp_case():
    m = mlp(0)
    bs = mlp_batches(0)
    return m, bs, dense_hessian(m, mlp_loss, bs)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), which=st.sampled_from(METHODS))
def test_hvp_matches_dense_mlp(mlp_case, seed, which):
    m, bs, H = mlp_case
    method, cache = which
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    op = HessianOperator(m, mlp_loss, bs, method=method, cache_graph=cache)
    torch.testing.assert_close(op.matvec(v), H @ v, rtol=1e-9, atol=1e-10)


@pytest.fixture(scope="module")
def bert_case():
    m = tiny_bert(0, dropout=0.1)
    bs = bert_batches(0)
    return m, bs, dense_hessian(m, bert_loss, bs)


@pytest.mark.parametrize("method,cache", METHODS)
def test_hvp_bert_eval_mode_and_mode_restored(bert_case, method, cache):
    m, bs, H = bert_case
    m.train()
    m.bert.embeddings.eval()  # a mixed-mode model: each module's flag must come back as it was
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    op = HessianOperator(m, bert_loss, bs, method=method, cache_graph=cache)
    assert op.n == sum(p.numel() for n, p in m.named_parameters() if n in TRAINABLE)
    hv = op.matvec(v)
    torch.testing.assert_close(hv, H @ v, rtol=1e-7, atol=1e-9)  # dropout off: deterministic and exact
    torch.testing.assert_close(op.matvec(v), hv)
    assert m.training and m.head.training and not m.bert.embeddings.training
    assert op.info()["n_examples"] == 5 and op.info()["n_batches"] == 2


def test_loss_and_grad_match_direct(bert_case):
    m, bs, _ = bert_case
    op = HessianOperator(m, bert_loss, bs)
    ps = ParamSet.from_model(m)
    l, g = dataset_grad(m, bert_loss, bs, ps)
    assert op.loss == pytest.approx(l, rel=1e-12)
    assert op.loss == pytest.approx(dataset_loss(m, bert_loss, bs), rel=1e-12)
    torch.testing.assert_close(op.grad, g)


def test_cache_rebuilds_after_parameter_change():
    m, bs = mlp(1), mlp_batches(1)
    op = HessianOperator(m, mlp_loss, bs)
    v = torch.ones(op.n, dtype=torch.float64)
    op.matvec(v)
    with torch.no_grad():
        m[0].weight.mul_(1.5)
    torch.testing.assert_close(op.matvec(v), dense_hessian(m, mlp_loss, bs) @ v, rtol=1e-9, atol=1e-10)
    op.clear()
    assert op._cache is None


def test_func_failure_falls_back_to_double_backward():
    m, bs = mlp(2), mlp_batches(2)

    def loss_with_item(model, b):  # reading the data pointer fails under torch.func transforms
        loss = mlp_loss(model, b)
        loss.detach().numpy()
        return loss

    op = HessianOperator(m, loss_with_item, bs, method="auto", cache_graph=False)
    v = torch.randn(op.n, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        hv = op.matvec(v)
    assert op.method_used == "double_backward" and op.fallback_reason
    assert any("torch.func" in str(x.message) for x in w)
    torch.testing.assert_close(hv, dense_hessian(m, mlp_loss, bs) @ v, rtol=1e-9, atol=1e-10)


def test_param_filters_and_frozen_selection():
    m, bs = mlp(3), mlp_batches(3)
    m[0].weight.requires_grad_(False)
    names = ["0.weight", "2.bias"]
    H = dense_hessian(m, mlp_loss, bs, names)
    v = torch.randn(H.shape[0], dtype=torch.float64)
    for spec in (names, lambda n: n in names, [m[0].weight, m[2].bias]):
        torch.testing.assert_close(hvp(m, mlp_loss, bs, v, params=spec, method="double_backward"), H @ v, rtol=1e-9, atol=1e-10)
    op = HessianOperator(m, mlp_loss, bs, params=names)
    torch.testing.assert_close(op.matvec(v), H @ v, rtol=1e-9, atol=1e-10)
    assert not m[0].weight.requires_grad  # flag restored
    with pytest.raises(LandscapeError):
        ParamSet.from_model(m, ["nope"])
    with pytest.raises(LandscapeError):
        ParamSet.from_model(m, lambda n: False)


def test_hvp_accepts_list_vectors_and_checks_shape():
    m, bs = mlp(4), mlp_batches(4)
    op = HessianOperator(m, mlp_loss, bs)
    v = torch.randn(op.n, dtype=torch.float64)
    torch.testing.assert_close(hvp(m, mlp_loss, bs, op.pset.unflatten(v)), op.matvec(v))
    with pytest.raises(LandscapeError):
        op.matvec(torch.ones(op.n + 1, dtype=torch.float64))


def test_gauss_newton_is_hessian_for_linear_mse_and_psd_for_mlp():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2).double()
    bs = [(torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)) for _ in range(2)]
    out_fn = lambda m, b: m(b[0])  # noqa: E731
    crit = lambda o, b: F.mse_loss(o, b[1])  # noqa: E731
    G = GaussNewtonOperator(lin, out_fn, crit, bs)
    H = dense_hessian(lin, lambda m, b: crit(out_fn(m, b), b), bs)
    v = torch.randn(G.n, dtype=torch.float64)
    torch.testing.assert_close(G.matvec(v), H @ v, rtol=1e-9, atol=1e-10)

    m, mb = mlp(5), mlp_batches(5)
    G = GaussNewtonOperator(m, lambda m_, b: m_(b[0]), lambda o, b: F.cross_entropy(o, b[1]), mb)
    D = torch.stack([G.matvec(e) for e in torch.eye(G.n, dtype=torch.float64)], 1)
    torch.testing.assert_close(D, D.T, rtol=1e-8, atol=1e-10)
    assert torch.linalg.eigvalsh(0.5 * (D + D.T)).min() > -1e-9


def test_dense_method_matches_reference(mlp_case):
    m, bs, H = mlp_case
    torch.testing.assert_close(HessianOperator(m, mlp_loss, bs).dense(), H, rtol=1e-9, atol=1e-10)


def test_groups_specs():
    m = tiny_bert(0)
    ps = ParamSet.from_model(m)
    assert set(ps.groups("param")) == set(ps.groups()) == set(TRAINABLE)
    mods = ps.groups("module")
    assert set(mods) == {"head", "bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.0.output.LayerNorm"}
    layers = ps.groups("layer")
    assert set(layers) == {"head", "bert.encoder.layer.1", "bert.encoder.layer.0"}
    chunks = ps.chunk_groups("head.weight", 2, dim=0, fmt="class {i}")  # (2, 32): one row per class
    assert list(chunks) == ["class 0", "class 1"]
    idx = ps.groups({**chunks, "bias": ["head.bias"]})
    sl = ps.slice_of("head.weight")
    assert torch.equal(idx["class 1"], torch.arange(sl.start + 32, sl.start + 64))
    assert sum(len(v) for v in idx.values()) == 66
    with pytest.raises(LandscapeError):
        ps.chunk_groups("head.weight", 3, dim=1)
    with pytest.raises(LandscapeError):
        ps.groups("bogus")


def test_auto_without_cache_times_both_and_keeps_one():
    m, bs = mlp(6), mlp_batches(6)
    op = HessianOperator(m, mlp_loss, bs, method="auto", cache_graph=False)
    v = torch.randn(op.n, dtype=torch.float64)
    H = dense_hessian(m, mlp_loss, bs)
    for _ in range(2):
        torch.testing.assert_close(op.matvec(v), H @ v, rtol=1e-9, atol=1e-10)
    assert set(op.timings) == {"double_backward_s", "func_s"}
    assert op.method_used in ("func", "double_backward") and op.info()["method"] == op.method_used


def test_bf16_precision_is_autocast_and_close_to_fp32():
    """bf16 runs the matmuls in bfloat16 (the product differs from fp32: the path is live)
    and stays close: the top eigenvalue within 2%, the product within a few percent."""
    from landscape import lanczos

    m = tiny_bert(0, dtype=torch.float32, dropout=0.0)
    bs = bert_batches(0)
    seen = []
    m.head.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    exact = HessianOperator(m, bert_loss, bs)
    fast = HessianOperator(m, bert_loss, bs, precision="bf16")
    v = torch.randn(exact.n, generator=torch.Generator().manual_seed(3))
    hv, hv16 = exact.matvec(v), fast.matvec(v)
    assert seen[0] == torch.float32 and seen[-1] == torch.bfloat16
    rel = float((hv16 - hv).norm() / hv.norm())
    assert 0 < rel < 0.05
    assert fast.info()["precision"] == "bf16" and exact.info()["precision"] == "fp32"
    top = lanczos(exact, k=1, tol=1e-8, max_iter=200, which="LM").eigenvalues[0]
    top16 = lanczos(fast, k=1, tol=1e-8, max_iter=200, which="LM").eigenvalues[0]
    assert top16 == pytest.approx(top, rel=0.02)
    with pytest.raises(LandscapeError, match="precision"):
        HessianOperator(m, bert_loss, bs, precision="int8")
