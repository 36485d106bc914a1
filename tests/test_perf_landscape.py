"""The faster landscape paths give the same numbers as the plain ones.

- block products (``HessianOperator.matmat``: one batched double backward) equal
  single products, row by row;
- regrouping batches by length (``rebatch``) leaves the dataset loss, the Hessian
  products and the surfaces unchanged (it only cuts padding);
- Hutchinson with given probes / block products equals the sample-by-sample estimate.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "test_landscape"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from ls_helpers import bert_loss, dense_hessian, mlp, mlp_batches, mlp_loss, tiny_bert  # noqa: E402
from landscape import HessianOperator, LandscapeError, dataset_loss, hutchinson, loss_surface_2d, random_direction  # noqa: E402
from landscape._params import rebatch_by_length  # noqa: E402


def ragged_batches(seed: int = 0, sizes=(4, 3, 5), width=9):
    """HF dict batches padded to ``width``, each row with its own real length (1..width)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in sizes:
        ids = torch.randint(1, 100, (s, width), generator=g)
        lens = torch.randint(1, width + 1, (s,), generator=g)
        am = (torch.arange(width).unsqueeze(0) < lens.unsqueeze(1)).long()
        out.append({"input_ids": ids * am, "attention_mask": am, "labels": torch.randint(0, 2, (s,), generator=g)})
    return out


def test_rebatch_groups_by_length_and_cuts_padding():
    bl = ragged_batches()
    rb = rebatch_by_length(bl, 4)
    assert sum(len(b["labels"]) for b in rb) == 12
    widths = [b["input_ids"].shape[1] for b in rb]
    assert widths == sorted(widths) and sum(w * len(b["labels"]) for w, b in zip(widths, rb)) < 12 * 9
    for b in rb:  # every kept column holds a real token of some row; no real token was cut
        assert bool(b["attention_mask"][:, -1].any())
    n_real = sum(int(b["attention_mask"].sum()) for b in bl)
    assert sum(int(b["attention_mask"].sum()) for b in rb) == n_real
    # non-dict batches pass through untouched
    mb = mlp_batches()
    assert rebatch_by_length(mb) == mb
    with pytest.raises(LandscapeError):
        rebatch_by_length(bl, 0)


def test_rebatch_same_loss_and_hessian_products():
    model = tiny_bert(dropout=0.0)
    bl = ragged_batches()
    v = torch.randn(HessianOperator(model, bert_loss, bl).n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    plain = HessianOperator(model, bert_loss, bl)
    fast = HessianOperator(model, bert_loss, bl, rebatch=4)
    assert fast.info()["rebatch"].startswith("by length")
    assert len(fast.batches) == 3 and fast.batches[0]["input_ids"].shape[1] < 9
    torch.testing.assert_close(fast.matvec(v), plain.matvec(v), rtol=1e-9, atol=1e-11)
    assert fast.loss == pytest.approx(plain.loss, rel=1e-12)
    assert dataset_loss(model, bert_loss, rebatch_by_length(bl, 2)) == pytest.approx(dataset_loss(model, bert_loss, bl), rel=1e-12)
    # and both equal the dense reference Hessian
    H = dense_hessian(model, bert_loss, bl)
    torch.testing.assert_close(fast.matvec(v), H @ v, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("cached", [True, False])
def test_block_products_equal_single_products(cached):
    model = tiny_bert(dropout=0.0)
    bl = ragged_batches(sizes=(3, 2))
    op = HessianOperator(model, bert_loss, bl, cache_graph=cached, method="double_backward")
    V = torch.randn(5, op.n, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    before = op.n_matvecs
    HV = op.matmat(V)
    assert op.n_matvecs - before == 5 and HV.shape == V.shape
    single = torch.stack([op.matvec(v) for v in V])
    torch.testing.assert_close(HV, single, rtol=1e-10, atol=1e-12)
    with pytest.raises(LandscapeError):
        op.matmat(V[:, :-1])


def test_block_products_mlp_dense():
    model = mlp()
    bl = mlp_batches()
    op = HessianOperator(model, mlp_loss, bl)
    H = dense_hessian(model, mlp_loss, bl)
    V = torch.randn(3, op.n, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(op.matmat(V), V @ H, rtol=1e-9, atol=1e-11)


def test_hutchinson_probes_and_blocks_match_single_products():
    model = tiny_bert(dropout=0.0)
    bl = ragged_batches(sizes=(3, 2))
    op = HessianOperator(model, bert_loss, bl)
    g = torch.Generator().manual_seed(5)
    Z = (torch.randint(0, 2, (7, op.n), generator=g) * 2 - 1).double()
    single = hutchinson(op, max_iter=7, tol=0.0, probes=Z)
    block = hutchinson(op, max_iter=7, tol=0.0, probes=Z, block_size=3)
    expect = [float(z @ op.matvec(z)) for z in Z]
    np.testing.assert_allclose(single.samples, expect, rtol=1e-10)
    np.testing.assert_allclose(block.samples, expect, rtol=1e-10)
    assert block.trace == pytest.approx(float(np.mean(expect)), rel=1e-10)
    assert block.convergence.n_matvecs == 7
    # the early stop is checked per sample: a block run stops at the same sample as a single run
    s1 = hutchinson(op, max_iter=50, tol=0.05, seed=1)
    s3 = hutchinson(op, max_iter=50, tol=0.05, seed=1, block_size=4)
    assert s3.samples == pytest.approx(s1.samples, rel=1e-10) and s3.trace == pytest.approx(s1.trace, rel=1e-10)
    with pytest.raises(LandscapeError):
        hutchinson(op, probes=Z[:, :3])


def test_surface_rebatch_same_values_and_bf16_close():
    model = tiny_bert(dtype=torch.float32, dropout=0.0)
    bl = ragged_batches()
    d1, d2 = random_direction(model, seed=0), random_direction(model, seed=1)
    xs = np.linspace(-0.5, 0.5, 3)
    a = loss_surface_2d(model, bert_loss, bl, d1, d2, xs, progress=False)
    b = loss_surface_2d(model, bert_loss, bl, d1, d2, xs, progress=False, rebatch=True)
    np.testing.assert_allclose(b.losses, a.losses, rtol=2e-6)
    assert b.settings["rebatch"] is True
    c = loss_surface_2d(model, bert_loss, bl, d1, d2, xs, progress=False, precision="bf16")
    assert c.settings["precision"] == "bf16"
    np.testing.assert_allclose(c.losses, a.losses, rtol=5e-2)
