"""The shared pieces of evaluate.py: one cross-entropy loss, one fixed-batch builder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from datasets import Dataset

from dpflat.config import ModelConfig
from dpflat.evaluate import BATCH_KEYS, ce_loss, fixed_batches
from dpflat.models import build_model


def _dataset(n=20, L=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 5000, (n, L), generator=g)
    lengths = torch.randint(3, L + 1, (n,), generator=g)
    am = (torch.arange(L)[None, :] < lengths[:, None]).long()
    rows = {"input_ids": (ids * am).tolist(), "attention_mask": am.tolist(), "labels": (torch.arange(n) % 3).tolist(),
            "idx": list(range(n))}
    return Dataset.from_dict(rows).with_format("torch")


def test_ce_loss_is_the_mean_cross_entropy_in_fp32_on_the_models_device():
    model = build_model(ModelConfig(backbone="tiny-bert", prefix_len=2, prefix_init="random"), 3).eval()
    b = next(iter(torch.utils.data.DataLoader(_dataset(), batch_size=8)))
    with torch.no_grad():
        want = F.cross_entropy(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]), b["labels"])
        got = ce_loss(model, b)
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-6)
    for p in model.parameters():  # nothing trainable: the device of any parameter
        p.requires_grad_(False)
    with torch.no_grad():
        assert torch.allclose(ce_loss(model, b), want, atol=1e-6)


def test_fixed_batches_are_the_first_rows_in_order_and_regrouping_keeps_every_example():
    ds = _dataset()
    plain = fixed_batches(ds, 13, batch_size=5)
    assert [len(b["labels"]) for b in plain] == [5, 5, 3] and set(plain[0]) == {"input_ids", "attention_mask", "labels",
                                                                            "idx"}
    assert torch.cat([b["idx"] for b in plain]).tolist() == list(range(13))
    kept = fixed_batches(ds, 13, batch_size=5, keys=BATCH_KEYS)
    assert set(kept[0]) == {"input_ids", "attention_mask", "labels"}
    grouped = fixed_batches(ds, 13, batch_size=5, keys=BATCH_KEYS, group=4)
    assert sum(len(b["labels"]) for b in grouped) == 13
    assert sum(b["input_ids"].numel() for b in grouped) <= sum(b["input_ids"].numel() for b in kept)
    assert sorted(torch.cat([b["labels"] for b in grouped]).tolist()) == sorted(torch.cat([b["labels"] for b in kept]).tolist())
    assert len(fixed_batches(ds, 1000)) == 1 and len(fixed_batches(ds, 1000)[0]["labels"]) == 20
