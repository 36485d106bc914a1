"""DP-SGD mechanics on the prefix model: clipping, noise scale, accounting, ledger."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dpflat.config import ModelConfig, PrivacyConfig
from dpflat.models import build_model
from dpflat.engine import epsilon_for, make_private, noise_for_target
from dpflat.privacy import DP, NOT_DP_NONPRIVATE, NOT_DP_PAPER, PrivacyLedger, PrivateSplit

N, L = 64, 12


def _dataset(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 5000, (N, L), generator=g)
    am = torch.ones(N, L, dtype=torch.long)
    am[::3, 8:] = 0  # some padding
    y = torch.randint(0, 2, (N,), generator=g)
    return [{"input_ids": ids[i], "attention_mask": am[i], "labels": y[i]} for i in range(N)]


def _setup(C: float, backbone="tiny-bert"):
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, prefix_len=3, prefix_init="random", attn="eager", head_dropout=0.0), 2)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loader = torch.utils.data.DataLoader(_dataset(), batch_size=16)
    dp = make_private(model, opt, loader, PrivacyConfig(epsilon=3.0, max_grad_norm=C), total_steps=20, n_private=N)
    return model, dp


def _per_example_grads(model, batch):
    """Reference per-example gradients by plain autograd, one example at a time."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(len(batch["labels"])):
        logits = model(input_ids=batch["input_ids"][i : i + 1], attention_mask=batch["attention_mask"][i : i + 1])
        loss = F.cross_entropy(logits, batch["labels"][i : i + 1])
        out.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    return torch.stack(out)


@pytest.mark.parametrize("backbone", ["tiny-bert", "tiny-roberta"])
def test_opacus_per_example_grads_match_autograd(backbone):
    model, dp = _setup(1.0, backbone)
    model.train()
    batch = next(iter(torch.utils.data.DataLoader(_dataset(1), batch_size=6)))
    logits = dp.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    F.cross_entropy(logits, batch["labels"]).backward()
    gs = torch.cat([p.grad_sample.flatten(1) for p in model.parameters() if p.requires_grad], dim=1)
    dp.model.disable_hooks()
    ref = _per_example_grads(model, batch)
    dp.model.enable_hooks()
    torch.testing.assert_close(gs, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("C", [1e-3, 0.1, 1.0, 100.0])
def test_every_clipped_example_gradient_norm_at_most_C(C):
    model, dp = _setup(C)
    opt = dp.optimizer
    opt.noise_multiplier = 0.0  # isolate clipping
    model.train()
    data = _dataset(2)
    for i in range(8):  # one example per step: summed_grad is exactly that example's clipped gradient
        ex = {k: v.unsqueeze(0) for k, v in data[i].items()}
        logits = dp.model(input_ids=ex["input_ids"], attention_mask=ex["attention_mask"])
        F.cross_entropy(logits, ex["labels"]).backward()
        raw = torch.cat([p.grad_sample.flatten() for p in opt.params])
        opt.pre_step()
        clipped = torch.cat([p.summed_grad.flatten() for p in opt.params])
        assert clipped.norm() <= C * (1 + 1e-5)
        torch.testing.assert_close(clipped, raw * min(1.0, C / (raw.norm().item() + 1e-6)), rtol=1e-5, atol=1e-9)
        opt.zero_grad(set_to_none=True)
        for p in opt.params:
            p.summed_grad = None


def test_noise_std_is_sigma_times_C():
    """The added noise is N(0, (sigma*C)^2) per coordinate.

    The noise comes from a secret generator (never torch's seeded one), so the draws differ on
    every run: the bounds are set at 6 standard errors of the estimate over ~13k draws, which
    fails by chance about once in 10^9 runs yet catches a 10 % scale error or a 0.06 sigma*C bias.
    """
    C = 0.5
    model, dp = _setup(C)
    opt = dp.optimizer
    assert opt.noise_multiplier == pytest.approx(dp.sigma)
    model.train()
    batch = next(iter(torch.utils.data.DataLoader(_dataset(3), batch_size=16)))
    draws = []
    for _ in range(20):
        opt.zero_grad(set_to_none=True)
        logits = dp.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        (0.0 * logits.sum()).backward()  # zero per-example gradients: what remains is the noise
        opt.pre_step()
        draws.append(torch.cat([p.grad.flatten() for p in opt.params]) * opt.expected_batch_size)
    assert not torch.equal(draws[0], draws[1])  # fresh noise on every step
    noise = torch.cat(draws).double() / (dp.sigma * C)
    n = noise.numel()
    assert n > 10_000
    assert abs(noise.std().item() - 1.0) < 6 / math.sqrt(2 * n)
    assert abs(noise.mean().item()) < 6 / math.sqrt(n)


@settings(max_examples=12, deadline=None)
@given(
    eps=st.sampled_from([0.5, 1.0, 3.0, 8.0]),
    q=st.floats(0.005, 0.2),
    steps=st.integers(10, 400),
    accountant=st.sampled_from(["rdp", "prv"]),
)
def test_reported_epsilon_never_exceeds_target(eps, q, steps, accountant):
    cfg = PrivacyConfig(epsilon=eps, accountant=accountant)
    delta = 1e-5
    sigma = noise_for_target(cfg, q, steps, delta)
    spent = epsilon_for(accountant, q, sigma, steps, delta)
    assert spent <= eps
    assert spent >= 0.9 * eps  # the search is tight, not merely safe


def test_delta_default_is_one_over_n_to_1_1():
    assert PrivacyConfig().resolve_delta(1000) == pytest.approx(1000 ** -1.1)
    assert PrivacyConfig(delta=1e-6).resolve_delta(1000) == 1e-6


def test_ledger_guarantee_follows_reads():
    led = PrivacyLedger(mechanism="dp-sgd", epsilon=2.5, delta=1e-5)
    split = PrivateSplit(list(range(10)), led)
    split.read("train/dp-sgd", "clipped+noise", accounted=True)
    split.count("train/dp-sgd", "clipped+noise", True, 10)
    assert led.guarantee == DP and led.claimed_epsilon == 2.5 and "ε=2.50" in led.label()
    split.read("awp/paper-ascent", "raw grad", accounted=False)  # declared, even before any batch
    assert led.guarantee == NOT_DP_PAPER and led.claimed_epsilon is None
    back = PrivacyLedger.from_dict(led.to_dict())
    assert back.guarantee == NOT_DP_PAPER and back.to_dict()["unaccounted_reads"] == 1
    assert PrivacyLedger(mechanism="none").guarantee == NOT_DP_NONPRIVATE
    # not DP as a whole: the DP-SGD part's ε under its own name, no "epsilon" key (issue 14)
    assert math.isclose(led.to_dict()["dpsgd_part_epsilon"], 2.5) and "epsilon" not in led.to_dict()


def test_a_run_folder_ledger_is_read_through_rundir_and_validated(tmp_path):
    """RunDir.ledger reads the file; a hand-edited guarantee or a broken file reads as unknown."""
    import json

    from dpflat.privacy import UNKNOWN, guarantee_of
    from dpflat.runs import RunDir

    led = PrivacyLedger(mechanism="dp-sgd", epsilon=2.5, delta=1e-5)
    PrivateSplit(list(range(10)), led).read("train/dp-sgd", "clipped+noise", accounted=True)
    rd = RunDir(tmp_path)
    assert rd.ledger() is None and guarantee_of(rd.ledger()) == UNKNOWN
    rd.ledger_file.write_text(json.dumps(led.to_dict()))
    assert guarantee_of(rd.ledger()) == DP
    rd.ledger_file.write_text(json.dumps({**led.to_dict(), "guarantee": "(ε, δ)-DP", "reads": [
        {"who": "awp/paper-ascent", "how": "raw grad", "accounted": False, "examples": 5}]}))
    assert guarantee_of(rd.ledger()) == UNKNOWN
    rd.ledger_file.write_text("{not json")
    assert guarantee_of(rd.ledger()) == UNKNOWN
    assert PrivacyLedger.from_dict(led.to_dict()).epsilon == 2.5


def test_the_ledger_imports_without_opacus_or_torch():
    """Readers of run folders (report, tables) use the ledger without the training stack."""
    import subprocess
    import sys

    code = ("import sys, dpflat.privacy as p; p.PrivacyLedger(); "
            "assert 'opacus' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_replayed_reads_add_to_the_same_row():
    """A cached paper-mode teacher's tuning reads are counted in the run that reuses it (one row, summed)."""
    led = PrivacyLedger()
    split = PrivateSplit(list(range(10)), led)
    split.read("bb-distill/paper-teacher", "teacher", accounted=False)
    split.count_replayed("bb-distill/paper-teacher", "teacher", False, batches=3, examples=24)
    split.count("bb-distill/paper-teacher", "teacher", False, 5)
    (r,) = led.reads
    assert (r.count, r.examples, r.accounted) == (4, 29, False) and led.guarantee == NOT_DP_NONPRIVATE
    restored = PrivacyLedger()
    restored.resume_counts(led.to_dict())
    assert restored.reads == led.reads and restored.batch_sizes == led.batch_sizes


# --------------------------------------------------------------------------- a DP step's dropout is secret
def test_dropout_seeds_come_from_a_secret_replayable_stream():
    from dpflat.engine import MechanismRNG

    a, b = MechanismRNG.create(), MechanismRNG.create()  # OS entropy: two runs draw different masks
    assert [a.step_seed() for _ in range(3)] != [b.step_seed() for _ in range(3)]
    c, d = MechanismRNG.create(noise_seed=7), MechanismRNG.create(noise_seed=7)  # operator-supplied: reproducible
    assert [c.step_seed() for _ in range(3)] == [d.step_seed() for _ in range(3)]
    state = c.state_dict()  # a checkpoint continues the stream exactly (replay after a crash)
    after = [c.step_seed() for _ in range(3)]
    e = MechanismRNG.create()
    e.load_state_dict(state)
    assert [e.step_seed() for _ in range(3)] == after


def test_a_dp_steps_dropout_masks_do_not_follow_the_public_seed(tmp_path, make_cfg):
    """Two DP runs with the same public seed and different secret streams draw different head
    dropout masks at step 1; the same secret stream draws the same ones; a non-private run's
    masks follow the public seed."""
    from dpflat.models import PrefixModel
    from dpflat.train import train

    masks: list[torch.Tensor] = []
    orig = PrefixModel.forward

    def spy(self, *a, **k):
        if self.training and self.dropout.p > 0:
            h = self.dropout.register_forward_hook(lambda m, i, o: masks.append((o == 0).clone()))
            try:
                return orig(self, *a, **k)
            finally:
                h.remove()
        return orig(self, *a, **k)

    def first_mask(name, noise_seed, **over):
        masks.clear()
        cfg = make_cfg(tmp_path / name, model={"head": "linear", "head_dropout": 0.5},
                       train={"group_by_length": "off"}, **over)
        train(cfg, max_steps=1, noise_seed=noise_seed)
        return masks[0]

    PrefixModel.forward = spy
    try:
        m1, m2, m1b = first_mask("a", 1), first_mask("b", 2), first_mask("c", 1)
        n1, n2 = (first_mask(f"np{i}", i, privacy={"enabled": False}) for i in (1, 2))
    finally:
        PrefixModel.forward = orig
    assert not torch.equal(m1, m2) and torch.equal(m1, m1b)
    assert torch.equal(n1, n2)
