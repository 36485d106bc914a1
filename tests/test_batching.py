"""Physical batches grouped by length (dpflat/batching.py): a cheaper cut of the same logical batch."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import dpflat.evaluate as ev
from dpflat.batching import GroupedSplittingSampler, plan_chunks, real_lengths, split_batch, trim
from dpflat.models import build_model
from dpflat.train import LOSS_KEY, prepare_data, train


def _cost(lengths, parts, chunk_cost):
    return sum(len(p) * max(lengths[i] for i in p) + chunk_cost for p in parts)


@given(st.lists(st.integers(1, 64), min_size=0, max_size=40), st.integers(1, 12), st.integers(0, 200))
def test_a_plan_covers_every_example_once_within_the_cap(lengths, cap, chunk_cost):
    parts = plan_chunks(lengths, cap, chunk_cost)
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(1 <= len(p) <= cap for p in parts)
    # shortest first, and each batch holds neighbours in length order
    assert [lengths[i] for i in flat] == sorted(lengths)


def _all_cuts(n):
    for k in range(n):
        for cuts in itertools.combinations(range(1, n), k):
            bounds = [0, *cuts, n]
            yield [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]


@given(st.lists(st.integers(1, 30), min_size=1, max_size=7), st.integers(1, 7), st.integers(0, 60))
def test_a_plan_is_the_cheapest_cut(lengths, cap, chunk_cost):
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best = min(_cost(lengths, [[order[j] for j in p] for p in cut], chunk_cost)
               for cut in _all_cuts(len(lengths)) if all(len(p) <= cap for p in cut))
    assert _cost(lengths, plan_chunks(lengths, cap, chunk_cost), chunk_cost) == best


def test_a_plan_computes_far_fewer_positions_on_sst2_lengths():
    """The point of it: SST-2-like lengths (short, spread wide) in a batch of 128."""
    torch.manual_seed(0)
    lengths = (torch.distributions.Gamma(2.0, 0.1).sample((128,)).clamp(3, 64)).long().tolist()
    arrival = sum(64 * max(lengths[i : i + 64]) for i in range(0, 128, 64))
    grouped = _cost(lengths, plan_chunks(lengths, 64, 0), 0)
    assert grouped < 0.75 * arrival and grouped >= sum(lengths)


def test_real_lengths_and_trim():
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert real_lengths(mask).tolist() == [2, 1, 1]
    b = trim({"input_ids": torch.arange(12).view(3, 4), "attention_mask": mask, "labels": torch.tensor([0, 1, 0])})
    assert b["input_ids"].shape == (3, 2) and b["labels"].shape == (3,)


class _Opt:
    def __init__(self):
        self.signals = []

    def signal_skip_step(self, do_skip):
        self.signals.append(do_skip)


def test_the_sampler_tells_the_optimizer_which_batch_ends_the_logical_one():
    lengths = torch.tensor([5, 40, 3, 9, 33, 7, 12, 60])
    opt = _Opt()
    logical = [[0, 1, 2, 3, 4, 5, 6, 7], [], [6]]
    out = list(GroupedSplittingSampler(logical, lengths, max_examples=3, optimizer=opt, chunk_cost=0))
    # the first logical batch in parts of <= 3, then the empty one (yielded once), then [6]
    n_first = len(out) - 2
    assert sorted(i for p in out[:n_first] for i in p) == logical[0]
    assert all(len(p) <= 3 for p in out[:n_first])
    assert out[n_first:] == [[], [6]]
    assert opt.signals == [True] * (n_first - 1) + [False, False, False]


def _small(make_cfg, tmp_path, name, group, **over):
    return make_cfg(tmp_path / name, model={"head_dropout": 0.0}, data={"max_length": 32},
                    train={"group_by_length": group, "physical_batch_size": 8, "checkpoint_every": 100}, **over)


@pytest.mark.parametrize("private", [True, False])
def test_grouped_training_is_the_same_run_as_arrival_order(private, tmp_path, make_cfg):
    """Dropout off (tiny-bert has none; head dropout 0): the same Poisson batches, clipped
    per-example gradients, noise and steps; only float summation order differs."""
    from safetensors.torch import load_file

    from dpflat.models import PrefixModel

    runs, positions = {}, {}
    forward = PrefixModel.forward

    def counting(self, input_ids, *a, **kw):
        if self.training:
            positions[group] = positions.get(group, 0) + input_ids.numel()
        return forward(self, input_ids, *a, **kw)

    PrefixModel.forward = counting
    try:
        for group in ("on", "off"):
            cfg = _small(make_cfg, tmp_path, group, group, privacy={"enabled": private})
            losses = []
            res = train(cfg, on_step=lambda r: losses.append(r[LOSS_KEY]), noise_seed=11)
            runs[group] = (losses, load_file(f"{res['run_dir']}/last.safetensors"))
    finally:
        PrefixModel.forward = forward
    assert positions["on"] < 0.8 * positions["off"]  # the cut did change: fewer padded positions
    (la, sa), (lb, sb) = runs["on"], runs["off"]
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=1e-4, atol=1e-5)
    for k in sa:
        torch.testing.assert_close(sa[k].float(), sb[k].float(), rtol=1e-4, atol=1e-5)


def test_grouped_physical_batches_give_the_same_clipped_per_example_gradients(tmp_path, make_cfg):
    """Opacus' per-example gradients of the prefix and head, padded batch vs length groups."""
    from opacus import GradSampleModule

    cfg = _small(make_cfg, tmp_path, "g", "on")
    card, _, tokd = prepare_data(cfg)
    model = build_model(cfg.model, len(card.labels), seed=0).train()
    gsm = GradSampleModule(model)
    ds = tokd["private"].select(range(24))
    batch = ds[:]

    def per_example(b):
        gsm.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.grad_sample = None
        logits = gsm(**ev.model_inputs(b, "cpu"))
        torch.nn.functional.cross_entropy(logits, b["labels"]).backward()
        flat = torch.cat([p.grad_sample.flatten(1) for p in model.parameters() if p.requires_grad], 1)
        return flat * len(b["labels"])  # Opacus scales a mean loss's per-example grads by 1/B

    whole = per_example(batch)
    parts = split_batch(batch, 7, chunk_cost=0)
    assert len(parts) > 1 and max(p["input_ids"].shape[1] for p in parts) <= batch["input_ids"].shape[1]
    grouped = torch.zeros_like(whole)
    pos = {int(i): k for k, i in enumerate(batch["idx"])}
    for p in parts:
        g = per_example(p)
        for j, i in enumerate(p["idx"].tolist()):
            grouped[pos[i]] = g[j]
    clip = lambda g: g / (g.norm(dim=1, keepdim=True) / 1.0).clamp_min(1.0)  # noqa: E731 - C = 1
    torch.testing.assert_close(clip(grouped), clip(whole), rtol=1e-4, atol=1e-6)


def test_evaluation_in_length_order_gives_the_same_rows(tmp_path, make_cfg):
    cfg = _small(make_cfg, tmp_path, "e", "on")
    card, _, tokd = prepare_data(cfg)
    model = build_model(cfg.model, len(card.labels), seed=0)
    ds = tokd["val"]
    a = ev.per_example_losses(model, ds, 16)
    assert ev.length_order(ds) is not None
    orig = ev.length_order
    try:
        ev.length_order = lambda d: None
        b = ev.per_example_losses(model, ds, 16)
    finally:
        ev.length_order = orig
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(a["label"], b["label"])
    np.testing.assert_array_equal(a["idx"], b["idx"])
