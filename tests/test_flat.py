"""Acceptance tests of the three flattening levels (within-layer AWP, cross-layer
selection, cross-model distillation) and of how their modes reach the ledger.

The end-to-end part trains each (variant, mode) at most once per module, through the
CLI, on tiny-bert and 64 SST-2 examples, with probes attached: forward/backward
counters on the backbone and weight snapshots around every AWP perturb/restore and
every optimizer step.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant
from torch import nn

from dpflat import engine as engine_mod
from dpflat import train as train_mod
from dpflat.cli import main
from dpflat.config import ConfigError, FlatConfig, ModelConfig, PrivacyConfig, RunConfig
from dpflat.flat import awp as awp_mod
from dpflat.flat import distill as distill_mod
from dpflat.flat import layers as layers_mod
from dpflat.flat.awp import AWP, perturbation
from dpflat.flat.distill import Distillation, distill_term
from dpflat.flat.layers import greedy_drop
from dpflat.models import PrefixEncoder, build_model
from dpflat.engine import make_private
from dpflat.privacy import DP, NOT_DP_PAPER
from dpflat.runs import RunDir, load_results
from dpflat.train import TRAIN_WHO, _per_example_loss

EPS = 8.0
PAPER_WHO = {"dp+awp": awp_mod.PAPER_WHO, "dp+layers": layers_mod.PAPER_WHO, "dp+distill": distill_mod.PAPER_WHO}
SAFE_VARIANTS = ["dp", "dp+awp", "dp+layers", "dp+distill", "dpflat"]


def _layer_mask(pe: PrefixEncoder, keep) -> torch.Tensor:
    """A 0/1 tensor of the prefix weight's shape: 1 on the coordinates of kept layers."""
    m = torch.zeros_like(pe.embedding.weight)
    for l, k in enumerate(keep):
        pe.layer_view(m)[l] = float(k)
    return m


# =========================================================================== AWP (unit)
@settings(max_examples=40, deadline=None)
@given(
    L=st.integers(1, 5),
    m=st.integers(1, 4),
    heads=st.integers(1, 2),
    head_dim=st.integers(1, 4),
    gamma=st.floats(1e-4, 0.5),
    wscale=st.sampled_from([1e-3, 0.02, 1.0, 300.0]),
    dscale=st.sampled_from([1e-6, 1.0, 1e4]),
    zero=st.integers(0, 4),
    seed=st.integers(0, 2**16),
)
def test_perturbation_has_per_layer_norm_gamma_times_layer_norm(L, m, heads, head_dim, gamma, wscale, dscale, zero,
                                                                seed):
    pe = PrefixEncoder(L, heads, head_dim, m)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(pe.embedding.weight.shape, generator=g) * wscale
    d = torch.randn(w.shape, generator=g) * dscale
    zero %= L
    pe.layer_view(d)[zero] = 0.0  # a layer the direction leaves alone
    v = perturbation(w, d, pe.layer_view, gamma)
    assert v.shape == w.shape
    V, W, D = pe.layer_view(v), pe.layer_view(w), pe.layer_view(d)
    for l in range(L):
        if l == zero:
            assert torch.equal(V[l], torch.zeros_like(V[l])), "zero direction must give a zero perturbation"
            continue
        # v_l = gamma * ||P_l|| * d_l / ||d_l||: the norm, and the direction of that very layer's d
        assert V[l].norm().item() == pytest.approx(gamma * W[l].norm().item(), rel=1e-4)
        torch.testing.assert_close(V[l], D[l] * (gamma * W[l].norm() / D[l].norm()), rtol=1e-4, atol=1e-30)


def _awp_ctx(L=3, m=4, seed=0, wscale=1.0):
    pe = PrefixEncoder(L, 2, 3, m)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        pe.embedding.weight.copy_(torch.randn(pe.embedding.weight.shape, generator=g) * wscale)
    return SimpleNamespace(model=SimpleNamespace(prefix=pe), total_steps=10, steps_per_epoch=5)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), gamma=st.floats(1e-3, 0.5), wscale=st.sampled_from([1e-2, 1.0, 77.0]))
def test_awp_perturb_then_restore_is_bit_exact(seed, gamma, wscale):
    ctx = _awp_ctx(seed=seed, wscale=wscale)
    w = ctx.model.prefix.embedding.weight
    awp = AWP(FlatConfig(awp=True, awp_gamma=gamma, awp_epochs=1))
    awp.direction = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed + 1))
    before = w.detach().clone()
    awp.step_begin(ctx, 0, {"labels": torch.zeros(2)})
    for _ in range(2):  # two physical chunks of one logical step
        awp.perturb(ctx)
        moved = w.detach().clone()
        assert not torch.equal(moved, before), "AWP did not move the weights"
        v = perturbation(before, awp.direction, ctx.model.prefix.layer_view, gamma)
        torch.testing.assert_close(moved - before, v, rtol=1e-3, atol=1e-5 * wscale)
        awp.restore(ctx)
        assert torch.equal(w, before), "restore must give back the saved weights bit for bit"
    awp.restore(ctx)  # a restore without a perturb is a no-op
    assert torch.equal(w, before)


def test_awp_step_state_is_shared_in_paper_mode_only():
    """torchrun shares a step's level state through the FlatLevel methods, never AWP's private fields."""
    from dpflat.flat.base import FlatLevel

    ctx = _awp_ctx()
    ctx.device = torch.device("cpu")
    assert FlatLevel().step_state() is None  # a level with nothing per step shares nothing
    assert AWP(FlatConfig(awp=True, awp_mode="safe")).step_state() is None  # the all-reduced gradient already is
    paper = AWP(FlatConfig(awp=True, awp_mode="paper"))
    assert paper.step_state() == {"v": None}  # no perturbation this step: still a collective on every rank
    v = torch.randn(ctx.model.prefix.embedding.weight.shape)
    other = AWP(FlatConfig(awp=True, awp_mode="paper"))
    other.load_step_state({"v": v}, ctx)
    before = ctx.model.prefix.embedding.weight.detach().clone()
    other.perturb(ctx)
    torch.testing.assert_close(ctx.model.prefix.embedding.weight.detach() - before, v)  # rank 0's v is applied
    other.restore(ctx)
    assert torch.equal(ctx.model.prefix.embedding.weight, before)


def test_awp_does_nothing_after_its_warmup_or_without_a_direction():
    ctx = _awp_ctx()
    w = ctx.model.prefix.embedding.weight
    before = w.detach().clone()
    awp = AWP(FlatConfig(awp=True, awp_gamma=0.1, awp_epochs=0.5))  # 0.5 of 10 steps
    assert awp.active_steps(ctx) == 5
    awp.step_begin(ctx, 0, {"labels": torch.zeros(2)})  # safe mode, first step: no noisy gradient yet
    awp.perturb(ctx)
    assert torch.equal(w, before)
    awp.direction = torch.ones_like(w)
    awp.step_begin(ctx, 4, {"labels": torch.zeros(2)})
    awp.perturb(ctx)
    assert not torch.equal(w, before)
    awp.restore(ctx)
    awp.step_begin(ctx, 5, {"labels": torch.zeros(2)})  # warm-up over
    awp.perturb(ctx)
    assert torch.equal(w, before)


# =========================================================================== end-to-end runs
@dataclass
class Probe:
    """What one training run did to the backbone and the prefix weights."""

    backbone: nn.Module | None = None
    weight: torch.Tensor | None = None
    grad_forwards: int = 0  # forward passes with autograd on (training, AWP ascent)
    nograd_forwards: int = 0  # evaluation
    backwards: int = 0
    clean: torch.Tensor | None = None  # prefix weight at the start of the current logical step
    last_post: torch.Tensor | None = None  # prefix weight right after the last optimizer step
    begin_eq_post: list[bool] = field(default_factory=list)
    perturb_moved: list[bool] = field(default_factory=list)
    restore_exact: list[bool] = field(default_factory=list)
    pre_step_eq_clean: list[bool] = field(default_factory=list)
    step_moved: list[bool] = field(default_factory=list)
    opt_steps: int = 0

    def attach_model(self, model) -> None:
        self.backbone, self.weight = model.backbone, model.prefix.embedding.weight

        def hook(mod, args, kwargs, out):
            if mod is not self.backbone:  # a deep copy (teacher, warm-up scorer) carries the hook along
                return
            h = out.last_hidden_state
            if torch.is_grad_enabled() and h.requires_grad:
                self.grad_forwards += 1
                h.register_hook(self._count_backward)
            else:
                self.nograd_forwards += 1

        model.backbone.register_forward_hook(hook, with_kwargs=True)

    def _count_backward(self, g):
        self.backwards += 1

    def attach_optimizer(self, opt) -> None:
        def pre(o, a, k):
            self.opt_steps += 1
            self._pre = self.weight.detach().clone()
            if self.clean is not None:
                self.pre_step_eq_clean.append(torch.equal(self._pre, self.clean))

        def post(o, a, k):
            self.step_moved.append(not torch.equal(self.weight, self._pre))
            self.last_post = self.weight.detach().clone()

        opt.register_step_pre_hook(pre)
        opt.register_step_post_hook(post)


def _spy_awp(mp: pytest.MonkeyPatch, probe: Probe) -> None:
    orig_begin, orig_perturb, orig_restore = AWP.step_begin, AWP.perturb, AWP.restore

    def step_begin(self, ctx, step, batch):
        probe.clean = ctx.model.prefix.embedding.weight.detach().clone()
        if probe.last_post is not None:
            probe.begin_eq_post.append(torch.equal(probe.clean, probe.last_post))
        return orig_begin(self, ctx, step, batch)

    def perturb(self, ctx):
        orig_perturb(self, ctx)
        probe.perturb_moved.append(not torch.equal(ctx.model.prefix.embedding.weight, probe.clean))

    def restore(self, ctx):
        orig_restore(self, ctx)
        probe.restore_exact.append(torch.equal(ctx.model.prefix.embedding.weight, probe.clean))

    mp.setattr(AWP, "step_begin", step_begin)
    mp.setattr(AWP, "perturb", perturb)
    mp.setattr(AWP, "restore", restore)


# --- speed: the runs here share q, steps and δ, so the accountant's answers are memoised
# (same inputs, same numbers; the RDP sums dominate a tiny run's time otherwise).
_ORIG_NOISE = engine_mod.noise_for_target
_ORIG_GET_EPS = RDPAccountant.get_epsilon


@functools.lru_cache(maxsize=None)
def _noise_cached(epsilon, accountant, q, steps, delta):
    return _ORIG_NOISE(PrivacyConfig(epsilon=epsilon, accountant=accountant), q, steps, delta)


def _noise_for_target(cfg, q, steps, delta):
    return _noise_cached(cfg.epsilon, cfg.accountant, q, steps, delta)


_EPS_MEMO: dict = {}


def _rdp_get_epsilon(self, delta, alphas=None):
    key = (tuple(self.history), delta, None if alphas is None else tuple(alphas))
    if key not in _EPS_MEMO:
        _EPS_MEMO[key] = _ORIG_GET_EPS(self, delta, alphas)
    return _EPS_MEMO[key]


@pytest.fixture(scope="module", autouse=True)
def _fast():
    """One thread (tiny models; the CPU is shared) and the memoised accountant, for this module only."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine_mod, "noise_for_target", _noise_for_target)
        mp.setattr(RDPAccountant, "get_epsilon", _rdp_get_epsilon)
        yield
    torch.set_num_threads(threads)


def _cli_args(out: Path, data: Path, variant: str, mode: str) -> list[str]:
    return [
        "train", "--variant", variant, "--mode", mode, "--backbone", "tiny-bert", "--data-dir", str(data),
        "--train-size", "64", "--eval-size", "32", "--public-size", "32", "--max-length", "16",
        "--prefix-len", "2", "--prefix-init", "random", "--epochs", "1", "--batch-size", "16",
        "--physical-batch-size", "8", "--checkpoint-every", "100", "--output-dir", str(out), "--no-progress",
        "--epsilon", str(EPS), "--awp-epochs", "1", "--layers-examples", "32",
        "--layers-directions", "1", "--teacher-epochs", "0.5", "--teacher-batch-size", "16",
        "--noise-seed", "5",  # the same secret-mechanism stream for every variant: same batches, comparable passes
    ]


@pytest.fixture(scope="module")
def run(tmp_path_factory, shared_data):
    """``run(variant, mode)`` -> a finished, probed run (trained once per module)."""
    out = tmp_path_factory.mktemp("flat") / "runs"
    done: dict[tuple[str, str], SimpleNamespace] = {}

    def get(variant: str, mode: str) -> SimpleNamespace:
        if (variant, mode) in done:
            return done[(variant, mode)]
        probe = Probe()
        orig_build, orig_private = train_mod.build_model, train_mod.make_private

        def build(*a, **k):
            model = orig_build(*a, **k)
            probe.attach_model(model)
            return model

        def private(*a, **k):
            setup = orig_private(*a, **k)
            probe.attach_optimizer(setup.optimizer.original_optimizer)
            return setup

        buf = io.StringIO()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(train_mod, "build_model", build)
            mp.setattr(train_mod, "make_private", private)
            _spy_awp(mp, probe)
            with contextlib.redirect_stdout(buf):
                rc = main(_cli_args(out, shared_data, variant, mode))
        assert rc == 0
        stdout = buf.getvalue()
        row = json.loads(stdout.strip().splitlines()[-1])
        rd = Path(row["run_dir"])
        table = load_results(out)
        r = SimpleNamespace(
            probe=probe, stdout=stdout, row=row,
            ledger=json.loads((rd / "ledger.json").read_text()),
            private=RunDir(rd).private_diagnostics(),  # every read's counts, the accounted ones' too
            result=json.loads((rd / "result.json").read_text()),
            table_row=table[table["run_id"] == row["run_id"]].iloc[0],
        )
        done[(variant, mode)] = r
        return r

    return get


def _reads(ledger, who):
    return [r for r in ledger["reads"] if r["who"] == who]


@pytest.mark.parametrize("mode", ["safe", "paper"])
def test_awp_restores_weights_exactly_during_training(run, mode):
    p = run("dp+awp", mode).probe
    assert p.opt_steps == 4 and all(p.step_moved), "every optimizer step must change the prefix"
    assert any(p.perturb_moved), "AWP never perturbed: the test would be vacuous"
    if mode == "paper":
        assert all(p.perturb_moved)  # a fresh ascent direction every step
    assert p.restore_exact and all(p.restore_exact), "restore() is not bit-exact"
    # the weights the optimizer steps from are exactly those before the perturbation...
    assert len(p.pre_step_eq_clean) == 4 and all(p.pre_step_eq_clean)
    # ...and nothing but the optimizer moves them between two steps
    assert len(p.begin_eq_post) == 3 and all(p.begin_eq_post)


def test_safe_awp_adds_no_pass_on_private_data_and_paper_awp_does(run):
    dp, safe, paper = run("dp", "safe"), run("dp+awp", "safe"), run("dp+awp", "paper")
    assert any(safe.probe.perturb_moved)
    counts = lambda r: (r.probe.grad_forwards, r.probe.backwards, r.probe.nograd_forwards)  # noqa: E731
    assert dp.probe.grad_forwards > 0 and counts(safe) == counts(dp)  # same seed, same batches, same passes

    def extra(r):
        """Forward and backward passes beyond one per DP-SGD physical batch."""
        chunks = sum(x["count"] for x in _reads(r.private, TRAIN_WHO))
        return r.probe.grad_forwards - chunks, r.probe.backwards - chunks

    assert extra(dp) == extra(safe) == (0, 0)
    # paper mode: exactly one forward+backward per private ascent (one per step): the counter sees them
    ascents = sum(x["count"] for x in _reads(paper.ledger, awp_mod.PAPER_WHO))
    assert ascents == 4 and extra(paper) == (ascents, ascents)


@pytest.mark.parametrize("variant", ["dp+awp", "dp+layers", "dp+distill", "dpflat"])
def test_paper_mode_is_labelled_not_dp_everywhere(run, variant):
    r = run(variant, "paper")
    led = r.ledger
    assert led["guarantee"] == NOT_DP_PAPER and led["claimed_epsilon"] is None
    unacc = {x["who"]: x for x in led["reads"] if not x["accounted"]}
    whos = set(PAPER_WHO.values()) if variant == "dpflat" else {PAPER_WHO[variant]}
    assert set(unacc) == whos and led["unaccounted_reads"] == len(whos)
    assert all(x["count"] > 0 and x["examples"] > 0 for x in unacc.values()), "the private read must have happened"
    # DP-SGD still ran, so the spent ε is known; it just may not be claimed
    assert led["mechanism"] == "dp-sgd" and "epsilon" not in led and 0 < led["dpsgd_part_epsilon"] <= EPS
    for row in (r.result, r.row):
        assert row["guarantee"] == NOT_DP_PAPER and row["epsilon"] is None
        assert row["dpsgd_part_epsilon"] == pytest.approx(led["dpsgd_part_epsilon"]) and "epsilon_spent" not in row
    t = r.table_row
    assert t["guarantee"] == NOT_DP_PAPER and (t["epsilon"] is None or math.isnan(t["epsilon"]))
    assert t["dpsgd_part_epsilon"] == pytest.approx(led["dpsgd_part_epsilon"])
    assert NOT_DP_PAPER in r.stdout
    # every private access is counted: 4 ascents (one per step); the scorer's fit (at most 2 steps: half an
    # epoch of 64 examples in batches of 16, early-stopped on val) + 1 + 3 + 2 indicator evaluations (3 layers,
    # n_drop 2); the teacher's fit (at most 2 steps)
    info = r.result["info"]
    fits = {w: info[k] for w, k in ((layers_mod.PAPER_WHO, "scorer_steps"), (distill_mod.PAPER_WHO, "teacher_steps"))
            if w in whos}
    assert all(1 <= n <= 2 for n in fits.values())
    expected = {awp_mod.PAPER_WHO: 4, layers_mod.PAPER_WHO: fits.get(layers_mod.PAPER_WHO, 0) + 1 + 3 + 2,
                distill_mod.PAPER_WHO: fits.get(distill_mod.PAPER_WHO, 0)}
    assert {w: unacc[w]["count"] for w in whos} == {w: expected[w] for w in whos}
    if layers_mod.PAPER_WHO in whos:
        assert info["layers_data"] == "private split (not DP)"
    if distill_mod.PAPER_WHO in whos:
        assert info["teacher_data"] == "private split (not DP)"


@pytest.mark.parametrize("variant", SAFE_VARIANTS)
def test_safe_mode_reads_private_data_only_through_dp_sgd(run, variant):
    r = run(variant, "safe")
    led = r.ledger
    assert led["unaccounted_reads"] == 0 and all(x["accounted"] for x in led["reads"])
    assert {x["who"] for x in led["reads"]} == {TRAIN_WHO}
    assert led["guarantee"] == DP
    assert led["claimed_epsilon"] is not None and 0 < led["claimed_epsilon"] <= EPS
    assert r.row["guarantee"] == r.result["guarantee"] == r.table_row["guarantee"] == DP
    assert r.row["epsilon"] == pytest.approx(led["claimed_epsilon"]) and r.table_row["epsilon"] <= EPS
    info = r.result["info"]
    # the levels really ran (else this test would pass vacuously)
    if variant in ("dp+awp", "dpflat"):
        assert info["awp_mode"] == "safe"
    if variant in ("dp+layers", "dpflat"):
        assert info["layers_data"] == "public split" and len(r.row["keep_layers"].split(",")) == 1  # 3 - n_drop
        trace = info["layers_trace"]
        assert [t["round"] for t in trace] == [0, 1, 2] and all(t["S"] >= 0 for t in trace)
        assert {t["dropped"] for t in trace[1:]} | {int(r.row["keep_layers"])} == {0, 1, 2}
    if variant in ("dp+distill", "dpflat"):
        assert info["teacher_data"] == "public split"
    if variant == "dp+awp":
        assert any(r.probe.perturb_moved)


# =========================================================================== cross-layer
class _PlantedPrefix(nn.Module):
    def __init__(self, n_layers: int, width: int):
        super().__init__()
        self.n_layers, self.width = n_layers, width
        self.embedding = nn.Embedding(1, n_layers * width)
        self.register_buffer("keep_mask", torch.ones(n_layers, dtype=torch.bool))

    def set_keep(self, keep) -> None:
        self.keep_mask.copy_(torch.as_tensor(keep, dtype=torch.bool))


class PlantedSharpness(nn.Module):
    """Logit margin 2 - sum_{kept l} s_l ||P_l - A_l||^2, every label 1.

    The loss is a strictly increasing function of the penalty, so the prefix of layer
    l has curvature proportional to s_l and nothing else differs between layers. A_l
    is P_l (or a tiny offset from it, giving a gradient), so the base loss L(P) is the
    same whichever layers are kept: the relative indicator (L(P+u)-L(P))/(1+L(P))
    then orders keep-masks by the largest penalty increase in the rho*||P|| ball,
    i.e. by the sharpness of what is kept, not by the size of any layer's weights.
    """

    def __init__(self, sharpness: list[float], width: int, seed: int, offset: float):
        super().__init__()
        L = len(sharpness)
        self.prefix = _PlantedPrefix(L, width)
        self.head = nn.Linear(1, 2)  # the loss helper reads the device from here
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.prefix.embedding.weight.copy_(torch.randn(1, L * width, generator=g))
        anchor = self.prefix.embedding.weight.detach().view(L, width) + offset * torch.randn(L, width, generator=g)
        self.register_buffer("anchor", anchor)
        self.register_buffer("s", torch.tensor(sharpness, dtype=torch.float32))

    @property
    def n_layers(self) -> int:
        return self.prefix.n_layers

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        P = self.prefix.embedding.weight.view(self.n_layers, self.prefix.width)
        pen = (self.s * self.prefix.keep_mask.float() * (P - self.anchor).pow(2).sum(1)).sum()
        z = (2.0 - pen).expand(input_ids.shape[0])
        return torch.stack([-z / 2, z / 2], dim=1)


def _planted_batches(n=8):
    return [{"input_ids": torch.zeros(n, 4, dtype=torch.long), "labels": torch.ones(n, dtype=torch.long)}]


def _check_trace(trace, n_layers, n_drop, keep):
    assert len(trace) == n_drop + 1 and trace[0]["round"] == 0 and trace[0]["dropped"] is None
    kept = set(range(n_layers))
    for rnd, t in enumerate(trace[1:], start=1):
        assert t["round"] == rnd and set(t["candidates"]) == kept  # every kept layer was scored
        best = min(t["candidates"].items(), key=lambda kv: (kv[1], kv[0]))
        assert (t["dropped"], t["S"]) == best and t["S"] >= 0
        kept.discard(t["dropped"])
    assert [i for i, k in enumerate(keep) if k] == sorted(kept)


@settings(max_examples=50, deadline=None)
@given(
    n_layers=st.integers(2, 5),
    planted=st.integers(0, 4),
    ratio=st.floats(30.0, 200.0),
    others=st.lists(st.floats(0.5, 2.0), min_size=5, max_size=5),
    rho=st.floats(0.02, 0.1),
    n_random=st.integers(1, 3),
    offset=st.sampled_from([0.0, 1e-3]),
    seed=st.integers(0, 2**16),
)
def test_greedy_drop_removes_the_planted_sharp_layer_first(n_layers, planted, ratio, others, rho, n_random, offset,
                                                           seed):
    planted %= n_layers
    s = others[:n_layers]
    s[planted] = ratio * max(s)
    model = PlantedSharpness(s, width=64, seed=seed, offset=offset)
    w0 = model.prefix.embedding.weight.detach().clone()
    n_drop = n_layers - 1
    evals = []
    keep, trace = greedy_drop(model, _planted_batches(), n_drop, rho, n_random, seed, on_eval=lambda: evals.append(1))
    assert trace[1]["dropped"] == planted
    assert trace[1]["S"] < trace[0]["S"]  # removing the sharp layer flattens the prefix
    assert trace[1]["candidates"][planted] < 0.5 * min(v for k, v in trace[1]["candidates"].items() if k != planted)
    _check_trace(trace, n_layers, n_drop, keep)
    assert sum(keep) == 1 and not keep[planted]
    assert len(evals) == 1 + sum(n_layers - r for r in range(n_drop))  # the start mask + one per candidate
    # scoring leaves the model as it found it
    assert torch.equal(model.prefix.embedding.weight, w0) and bool(model.prefix.keep_mask.all())


@settings(max_examples=15, deadline=None)
@given(order=st.permutations(range(4)), seed=st.integers(0, 2**16), n_random=st.integers(1, 3))
def test_greedy_drop_removes_layers_from_sharpest_to_flattest(order, seed, n_random):
    s = [10.0 ** order[l] for l in range(4)]  # each layer 10x sharper than the next
    model = PlantedSharpness(s, width=64, seed=seed, offset=0.0)
    keep, trace = greedy_drop(model, _planted_batches(), 3, 0.05, n_random, seed)
    by_sharpness = sorted(range(4), key=lambda l: -s[l])
    assert [t["dropped"] for t in trace[1:]] == by_sharpness[:3]
    assert keep == [l == by_sharpness[3] for l in range(4)]
    assert all(a["S"] > b["S"] for a, b in zip(trace, trace[1:]))


def test_greedy_drop_never_removes_every_kept_prefix():
    model = PlantedSharpness([100.0, 1.0, 1.0], width=16, seed=0, offset=0.0)
    with pytest.raises(ConfigError, match="every prefix"):
        greedy_drop(model, _planted_batches(), 3, 0.05, 1, 0)
    model.prefix.set_keep([True, True, False])  # one layer already gone (--keep-layers)
    with pytest.raises(ConfigError, match="every prefix"):
        greedy_drop(model, _planted_batches(), 2, 0.05, 1, 0)
    keep, trace = greedy_drop(model, _planted_batches(), 1, 0.05, 1, 0)
    assert keep == [False, True, False] and set(trace[1]["candidates"]) == {0, 1}


# =========================================================================== distillation
@settings(max_examples=40, deadline=None)
@given(
    L=st.integers(1, 4),
    m=st.integers(1, 3),
    heads=st.integers(1, 2),
    head_dim=st.integers(1, 3),
    B=st.integers(1, 3),
    lam=st.floats(1e-3, 10.0),
    squared=st.booleans(),
    keep_bits=st.lists(st.booleans(), min_size=4, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_distill_gradient_matches_the_hand_derived_formula(L, m, heads, head_dim, B, lam, squared, keep_bits, seed):
    pe = PrefixEncoder(L, heads, head_dim, m)
    keep = keep_bits[:L]
    pe.set_keep(keep)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        pe.embedding.weight.copy_(torch.randn(pe.embedding.weight.shape, generator=g))
    teacher = torch.randn(pe.embedding.weight.shape, generator=g)
    level = Distillation(FlatConfig(distill=True, distill_lambda=lam, distill_squared=squared))
    level.teacher = teacher
    ctx = SimpleNamespace(model=SimpleNamespace(prefix=pe))
    term = level.extra_loss(ctx, pe(B))
    assert term.shape == (B,)
    term.sum().backward()

    mask = _layer_mask(pe, keep)
    diff = (pe.embedding.weight.detach() - teacher) * mask
    norm = diff.norm()
    value = lam * (norm**2 if squared else norm)
    torch.testing.assert_close(term.detach(), value.expand(B), rtol=1e-5, atol=1e-5)
    per_example = 2 * lam * diff if squared else (lam * diff / norm if norm > 0 else torch.zeros_like(diff))
    # every example's prefix is a lookup of the same weight: the weight gets B copies
    torch.testing.assert_close(pe.embedding.weight.grad, B * per_example, rtol=1e-4, atol=1e-6)
    dropped = mask == 0
    assert torch.equal(pe.embedding.weight.grad[dropped], torch.zeros(int(dropped.sum())))


def test_distill_term_unsquared_gradient_is_lambda_times_unit_vector():
    P = torch.randn(2, 3, 8, requires_grad=True)
    T = torch.randn(3, 8)
    lam = 0.7
    distill_term(P, T, None, lam, squared=False).sum().backward()
    unit = (P - T).detach() / (P - T).detach().flatten(1).norm(dim=1).view(-1, 1, 1)
    torch.testing.assert_close(P.grad, lam * unit)
    assert P.grad.flatten(1).norm(dim=1).tolist() == pytest.approx([lam, lam])


# --- the distillation term under Opacus
N_EX, SEQ, C_CLIP, LAM = 32, 10, 1.0, 3.0


def _examples(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 5000, (N_EX, SEQ), generator=g)
    am = torch.ones(N_EX, SEQ, dtype=torch.long)
    am[::3, 7:] = 0
    y = torch.randint(0, 2, (N_EX,), generator=g)
    return [{"input_ids": ids[i], "attention_mask": am[i], "labels": y[i]} for i in range(N_EX)]


@pytest.fixture(scope="module")
def dp_distill():
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="tiny-bert", prefix_len=3, prefix_init="random", attn="eager",
                                    head_dropout=0.0), 2)
    model.prefix.set_keep([True, False, True])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loader = torch.utils.data.DataLoader(_examples(), batch_size=8)
    # q = 1/4, 4 steps, δ for N = 64 and ε = 8: the same σ as the end-to-end runs (memoised)
    dp = make_private(model, opt, loader, PrivacyConfig(epsilon=EPS, max_grad_norm=C_CLIP), total_steps=4, n_private=64)
    level = Distillation(FlatConfig(distill=True, distill_lambda=LAM))
    w = model.prefix.embedding.weight.detach()
    level.teacher = w + torch.randn(w.shape, generator=torch.Generator().manual_seed(5))
    ctx = SimpleNamespace(model=model, device=torch.device("cpu"), cfg=RunConfig())
    return model, dp, level, ctx


def _clear(model, opt):
    opt.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.grad_sample = None
        p.summed_grad = None


def _ref_grads(model, dp, level, ctx, batch, with_distill=True):
    """Per-example gradients of CE_i (+ distill_i) by plain autograd, one example at a time."""
    params = [p for p in model.parameters() if p.requires_grad]
    dp.model.disable_hooks()
    try:
        out = []
        for i in range(len(batch["labels"])):
            logits, prefix = model(input_ids=batch["input_ids"][i : i + 1],
                                   attention_mask=batch["attention_mask"][i : i + 1], return_prefix=True)
            loss = F.cross_entropy(logits, batch["labels"][i : i + 1])
            if with_distill:
                loss = loss + level.extra_loss(ctx, prefix).sum()
            out.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    finally:
        dp.model.enable_hooks()
    return torch.stack(out)


def test_opacus_per_example_gradient_includes_the_distill_term(dp_distill):
    model, dp, level, ctx = dp_distill
    model.train()
    _clear(model, dp.optimizer)
    batch = next(iter(torch.utils.data.DataLoader(_examples(1), batch_size=6)))
    _per_example_loss(ctx, dp.model, [level], batch).mean().backward()  # the training loop's loss
    params = [p for p in model.parameters() if p.requires_grad]
    gs = torch.cat([p.grad_sample.flatten(1) for p in params], dim=1)
    ref = _ref_grads(model, dp, level, ctx, batch)
    torch.testing.assert_close(gs, ref, rtol=1e-4, atol=1e-6)
    ce_only = _ref_grads(model, dp, level, ctx, batch, with_distill=False)
    assert ((gs - ce_only).norm(dim=1) > 0.5 * LAM).all()  # the distill part is there, of norm ~lambda
    pg = model.prefix.embedding.weight.grad_sample  # (B, m, L*2H)
    for b in range(len(batch["labels"])):
        dropped_layer = model.prefix.layer_view(pg[b])[1]  # layer 1 has no prefix: no CE and no distill gradient
        assert torch.equal(dropped_layer, torch.zeros_like(dropped_layer))
    _clear(model, dp.optimizer)


def test_distill_term_is_clipped_together_with_cross_entropy(dp_distill):
    model, dp, level, ctx = dp_distill
    opt = dp.optimizer
    opt.noise_multiplier = 0.0  # isolate clipping
    model.train()
    _clear(model, opt)
    data = _examples(2)
    for i in range(6):  # one example per step: summed_grad is exactly that example's clipped gradient
        ex = {k: v.unsqueeze(0) for k, v in data[i].items()}
        _per_example_loss(ctx, dp.model, [level], ex).mean().backward()
        raw = torch.cat([p.grad_sample.flatten() for p in opt.params])
        assert raw.norm() > C_CLIP  # CE + lambda * unit vector: clipping is active
        opt.pre_step()
        clipped = torch.cat([p.summed_grad.flatten() for p in opt.params])
        assert clipped.norm() <= C_CLIP * (1 + 1e-5)
        torch.testing.assert_close(clipped, raw * (C_CLIP / (raw.norm().item() + 1e-6)), rtol=1e-5, atol=1e-9)
        # had the distill gradient been added after clipping, the norm would exceed C
        ce = _ref_grads(model, dp, level, ctx, ex, with_distill=False)[0]
        after = ce * min(1.0, C_CLIP / (ce.norm().item() + 1e-6)) + (raw - ce)
        assert after.norm() > 1.5 * C_CLIP
        _clear(model, opt)


def test_level_registry_builds_the_switched_on_levels_in_loop_order():
    """The registry is the one list of levels; its order is the order the loop calls them."""
    from dpflat.config import RunConfig, apply_variant
    from dpflat.flat import CALLBACKS, REGISTRY, build_callbacks, build_levels

    assert [e.name for e in REGISTRY] == ["layers", "distill", "awp"]
    assert [e.name for e in CALLBACKS] == ["trajectory"]  # a step callback, not a level
    cfg = apply_variant(RunConfig(), "dpflat", "safe").replace(train={"sharpness_every": 3})
    assert [lv.name for lv in build_levels(cfg)] == ["layers", "distill", "awp"]
    assert [cb.name for cb in build_callbacks(cfg)] == ["trajectory"]
    assert build_levels(apply_variant(RunConfig(), "dp", "safe")) == []
    assert build_callbacks(apply_variant(RunConfig(), "dp", "safe")) == []
