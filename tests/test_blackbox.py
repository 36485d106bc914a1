"""Black-box DP-Flat: forward-only access, the DPZero clip, the ledger per mode, runs and resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dpflat as dp
from dpflat import blackbox as bbm
from dpflat.cli import main
from dpflat.config import ConfigError, RunConfig
from dpflat.privacy import DP, NOT_DP_NONPRIVATE, NOT_DP_PAPER
from dpflat.runs import RunDir, load_results, run_id
from dpflat.sweep import cells, sweep, trainer


def bb_cfg(make_cfg, out: Path, variant: str = "bb-dp", mode: str = "safe", **over) -> RunConfig:
    cfg = dp.apply_variant(make_cfg(out), variant, mode)
    over.setdefault("blackbox", {})
    over["blackbox"] = {"prompt_tokens": 4, "prompt_dim": 16, **over["blackbox"]}
    return cfg.replace(**over)


@pytest.fixture
def spy_backbone(monkeypatch):
    """Wrap the backbone loader: record every encoder call and whether autograd was on."""
    seen = {"calls": 0, "grad_enabled": [], "models": []}
    real = bbm.box.load_backbone

    def load(cfg, seed=0):
        m = real(cfg, seed=seed)

        def hook(mod, args, kwargs):
            seen["calls"] += 1
            seen["grad_enabled"].append(torch.is_grad_enabled())

        m.register_forward_pre_hook(hook, with_kwargs=True)
        seen["models"].append(m)
        return m

    monkeypatch.setattr(bbm.box, "load_backbone", load)
    return seen


# --------------------------------------------------------------------------- forward only
def test_the_model_is_only_called_forward_without_grad(tmp_path, make_cfg, spy_backbone):
    cfg = bb_cfg(make_cfg, tmp_path / "runs", "bb-dpflat", "safe")
    phases: list[str] = []
    res = bbm.train(cfg, on_phase=phases.append)
    assert res["finished"] and res["steps"] == 8
    assert phases == ["data", "distill", "training"]  # the set-up phases a status line shows (the teacher prompt)
    # the landscape tools differentiate w.r.t. z under enable_grad: the box still sees no grad
    out = bbm.prompt_sharpness(res["run_dir"], n_examples=32, rho=0.5, grid=3, grad_directions=4)
    assert spy_backbone["calls"] > 20
    assert not any(spy_backbone["grad_enabled"]), "the encoder was called with autograd on"
    for m in spy_backbone["models"]:
        assert all(not p.requires_grad and p.grad is None for p in m.parameters())
    assert out["prompt_sam_sharpness"] >= 0 and out["prompt_indicator"] >= 0


def test_prompt_model_exposes_only_z(tmp_path, make_cfg):
    cfg = bb_cfg(make_cfg, tmp_path / "runs")
    card = dp.get_task(cfg.data.task)
    m = bbm.build_prompt_model(cfg, card)
    names = [n for n, _ in m.named_parameters()]
    assert names == ["z"] and m.z.numel() == 16 + 2  # d + a bias per class
    batch = {"input_ids": torch.randint(1000, 2000, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long),
             "labels": torch.tensor([0, 1, 0])}
    loss = bbm.prompt_loss(m, batch)
    loss.backward()  # a zeroth-order estimate, from forward queries only
    assert m.z.grad is not None and torch.isfinite(m.z.grad).all() and m.z.grad.abs().sum() > 0
    ref = torch.nn.functional.cross_entropy(m(**batch), batch["labels"])
    assert float(loss.detach()) == pytest.approx(float(ref), rel=1e-5)


# --------------------------------------------------------------------------- the DPZero estimate
@settings(max_examples=60)
@given(
    deltas=st.lists(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=2, max_size=2), min_size=1, max_size=20),
    clip=st.floats(0.01, 100.0),
    drop=st.integers(0, 19),
)
def test_each_example_moves_the_dp_sum_by_at_most_the_clip(deltas, clip, drop):
    d = torch.tensor(deltas, dtype=torch.float64)
    clipped = bbm.clip_rows(d, clip)
    assert (clipped.norm(dim=1) <= clip * (1 + 1e-9)).all()
    # neighbouring batches (one example removed): same noise draw, sums differ by <= C
    i = drop % len(deltas)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    with_i = bbm.dpzero_coefficients(d, clip, 0.7, 1.0, g1).double()
    without = bbm.dpzero_coefficients(torch.cat([d[:i], d[i + 1:]]), clip, 0.7, 1.0, g2).double()
    assert float((with_i - without).norm()) <= clip * (1 + 1e-5) + 1e-6


def test_dp_noise_has_the_calibrated_scale():
    g = torch.Generator().manual_seed(0)
    zeros = torch.zeros(5, 1)
    draws = torch.stack([bbm.dpzero_coefficients(zeros, 2.0, 1.5, 10.0, g) for _ in range(4000)])
    assert float(draws.std()) == pytest.approx(1.5 * 2.0 / 10.0, rel=0.05)
    assert float(bbm.dpzero_coefficients(torch.tensor([[3.0], [-0.5]]), 1.0, 0.0, 4.0, g)) == pytest.approx(0.125)


def test_dp_step_bounds_one_examples_influence(tmp_path, make_cfg):
    """A real DPZero step: an outlier example cannot move z more than the clip allows."""
    cfg = bb_cfg(make_cfg, tmp_path / "runs")
    m = bbm.build_prompt_model(cfg, dp.get_task("sst2"))
    batch = {"input_ids": torch.randint(1000, 2000, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long),
             "labels": torch.tensor([0, 1, 1, 0])}
    flipped = {**batch, "labels": torch.tensor([0, 1, 1, 1])}  # one example changed
    moves = []
    for b in (batch, flipped):
        state = bbm.zo._make_opt(torch.zeros(m.proj.dim), "sgd", 1.0)
        bbm.zo_step(m, state, b, step_seed=11, k=1, mu=5.0, dp=(1e-3, 0.0, 4.0))
        moves.append(state.param.data.clone())
    u = bbm.directions(11, 1, m.proj.dim)[0]
    # z moves by lr * coef * u; swapping one example changes coef by <= 2C / expected batch
    assert float((moves[0] - moves[1]).norm()) <= 2 * 1e-3 / 4.0 * float(u.norm()) * (1 + 1e-4)


def test_distillation_pull_is_the_exact_gradient():
    z, t = torch.randn(7, requires_grad=True), torch.randn(7)
    for squared in (False, True):
        val = 0.3 * ((z - t).norm() ** 2 if squared else (z - t).norm())
        (g,) = torch.autograd.grad(val, z)
        assert torch.allclose(bbm.distill_grad(z.detach(), t, 0.3, squared), g, atol=1e-6)


# --------------------------------------------------------------------------- ledger per variant
def test_ledger_and_guarantee_of_every_variant_and_mode(tmp_path, make_cfg):
    base = bb_cfg(make_cfg, tmp_path / "runs")
    table = sweep(base, ["bb-nonprivate", "bb-dp", "bb-dpflat"], [3.0], [0], ["safe", "paper"], progress=False)
    by = {r.variant: r for r in table.itertuples()}
    assert set(by) == {"bb-nonprivate", "bb-dp", "bb-dpflat-safe", "bb-dpflat-paper"}
    for v in ("bb-dp", "bb-dpflat-safe"):
        r = by[v]
        assert r.guarantee == DP and 0 < r.epsilon <= 3.0 + 1e-9 and (r.dpsgd_part_epsilon is None or np.isnan(r.dpsgd_part_epsilon))
        ledger = json.loads(Path(r.run_dir, "ledger.json").read_text())
        assert ledger["unaccounted_reads"] == 0 and {x["who"] for x in ledger["reads"]} == {bbm.TRAIN_WHO}
        assert ledger["sample_rate"] == pytest.approx(32 / 128) and ledger["steps"] == 8
        assert ledger["mechanism"] == "dpzero"  # the sampled Gaussian mechanism, named for what ran
        from dpflat.accountants import from_ledger

        assert from_ledger(ledger).ledger_matches is True  # claim vs dp-accounting RDP and PLD, Poisson batches
    paper = by["bb-dpflat-paper"]
    assert paper.guarantee == NOT_DP_PAPER and paper.epsilon is None or np.isnan(paper.epsilon)
    ledger = json.loads(Path(paper.run_dir, "ledger.json").read_text())
    teacher_reads = [x for x in ledger["reads"] if x["who"] == bbm.PAPER_WHO]
    assert len(teacher_reads) == 1 and not teacher_reads[0]["accounted"] and teacher_reads[0]["examples"] >= 128
    assert ledger["claimed_epsilon"] is None
    nonpriv = by["bb-nonprivate"]
    assert nonpriv.guarantee == NOT_DP_NONPRIVATE and (nonpriv.epsilon is None or np.isnan(nonpriv.epsilon))
    safe_res = json.loads(Path(by["bb-dpflat-safe"].run_dir, "result.json").read_text())
    assert safe_res["info"]["teacher_data"] == "public split"
    # same grid again: nothing retrained, same rows
    again = sweep(base, ["bb-nonprivate", "bb-dp", "bb-dpflat"], [3.0], [0], ["safe", "paper"], progress=False)
    assert sorted(again["run_id"]) == sorted(table["run_id"]) and len(load_results(base.train.output_dir)) == 4


def test_cached_paper_teacher_still_marks_the_run_not_dp(tmp_path, make_cfg):
    cfgs = [bb_cfg(make_cfg, tmp_path / "runs", "bb-dpflat", "paper", privacy={"epsilon": e}) for e in (2.0, 8.0)]
    first, second = (bbm.train(c) for c in cfgs)
    info2 = json.loads(Path(second["run_dir"], "result.json").read_text())["info"]
    assert info2["teacher_cached"] is True
    for r in (first, second):
        assert r["guarantee"] == NOT_DP_PAPER and r["epsilon"] is None
        reads = json.loads(Path(r["run_dir"], "ledger.json").read_text())["reads"]
        assert any(x["who"] == bbm.PAPER_WHO and x["count"] > 0 and x["examples"] > 0 for x in reads)


# --------------------------------------------------------------------------- runs, resume, dispatch
def test_interrupted_run_resumes_to_the_same_result(tmp_path, make_cfg):
    a = bb_cfg(make_cfg, tmp_path / "a", "bb-dpflat", "safe")
    b = bb_cfg(make_cfg, tmp_path / "b", "bb-dpflat", "safe")
    part = bbm.train(a, max_steps=3, noise_seed=11)
    assert not part["finished"] and part["step"] == 3 and not RunDir(part["run_dir"]).done
    res = bbm.train(a)  # the generator state comes from the checkpoint, not from a seed
    ref = bbm.train(b, noise_seed=11)
    assert res["steps"] == ref["steps"] == 8 and res["epsilon"] == pytest.approx(ref["epsilon"], rel=1e-12)
    za = RunDir(res["run_dir"]).load_model_state()["z"]
    zb = RunDir(ref["run_dir"]).load_model_state()["z"]
    assert torch.allclose(za, zb, atol=1e-6)
    rows = RunDir(res["run_dir"]).metrics()
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert bbm.train(a)["run_id"] == res["run_id"] and len(load_results(a.train.output_dir)) == 1


def test_variants_dispatch_and_white_box_ids_are_unchanged(make_cfg, tmp_path):
    base = make_cfg(tmp_path)
    wb = dp.apply_variant(base, "dp")
    assert "blackbox" not in wb.to_dict() and trainer(wb).__module__ == "dpflat.train"
    b = dp.apply_variant(wb, "bb-dpflat", "paper")
    assert b.variant == "bb-dpflat-paper" and b.blackbox.active and trainer(b).__module__ == "dpflat.blackbox.loop"
    assert run_id(dp.apply_variant(b, "dp")) == run_id(wb)  # switching back drops the black-box section
    assert RunConfig.from_dict(b.to_dict()) == b
    grid = cells(base, ["bb-nonprivate", "bb-dp", "bb-dpflat"], [3.0, 8.0], [0, 1], ["safe", "paper"])
    names = [c.variant for c in grid]
    assert names.count("bb-nonprivate") == 2 and names.count("bb-dp") == 4
    assert names.count("bb-dpflat-safe") == 4 and names.count("bb-dpflat-paper") == 4


def test_white_box_train_refuses_a_black_box_config(tmp_path, make_cfg):
    """``dpflat.train.train`` given a bb-* config must not quietly train a prefix model: it points to
    the dispatcher (``sweep.trainer``), which trains it as black box (so does the CLI)."""
    from safetensors.torch import load_file

    from dpflat.train import train as wb_train

    cfg = dp.apply_variant(bb_cfg(make_cfg, tmp_path / "runs"), "bb-dp")
    with pytest.raises(ConfigError, match="sweep.trainer"):
        wb_train(cfg, max_steps=1)
    assert not RunDir.for_config(cfg).path.exists()  # refused before any folder
    res = trainer(cfg)(cfg, max_steps=1)
    assert not res["finished"] and res["step"] == 1
    cks = sorted(p.name for p in Path(res["run_dir"]).glob("ckpt-*"))
    assert cks == ["ckpt-0000000", "ckpt-0000001"]  # the start of the run is a checkpoint too (issue 26)
    for name in cks:
        assert set(load_file(str(Path(res["run_dir"]) / name / "trainable.safetensors"))) == {"z"}


@pytest.mark.parametrize("over, msg", [
    ({"flat": {"awp": True}}, "only cross-model flattening"),
    ({"blackbox": {"zo_optimizer": "cma"}}, "non-private only"),
    ({"blackbox": {"prompt_dim": 0}}, "prompt_dim"),
    ({"blackbox": {"zo_mu": -1.0}}, "zo_mu"),
    ({"blackbox": {"readout_template": "no slot"}}, "readout_template"),
    ({"privacy": {"poisson": False}}, "Poisson"),
])
def test_bad_black_box_configs_fail_with_one_clear_line(make_cfg, tmp_path, over, msg):
    with pytest.raises(ConfigError, match=msg):
        bb_cfg(make_cfg, tmp_path, "bb-dp", **over)


def test_cli_train_and_sweep(tmp_path, shared_data, capsys):
    common = ["--task", "sst2", "--data-dir", str(shared_data), "--backbone", "tiny-bert", "--max-length", "24",
              "--train-size", "64", "--eval-size", "32", "--public-size", "64", "--batch-size", "32",
              "--epochs", "1", "--prompt-tokens", "2", "--prompt-dim", "8", "--output-dir", str(tmp_path),
              "--no-progress"]
    assert main(["train", "--variant", "bb-dp", "--epsilon", "4", *common]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["variant"] == "bb-dp" and row["guarantee"] == DP and row["epsilon"] <= 4
    assert main(["sweep", "--variants", "bb-nonprivate,bb-dp,bb-dpflat", "--modes", "safe,paper",
                 "--epsilons", "4", *common]) == 0
    out = capsys.readouterr().out
    for v in ("bb-nonprivate", "bb-dp", "bb-dpflat-safe", "bb-dpflat-paper", NOT_DP_PAPER):
        assert v in out
    assert len(load_results(tmp_path)) == 4
    assert main(["train", "--variant", "bb-dp", "--awp", *common]) == 2
    assert "only cross-model flattening" in capsys.readouterr().err


def test_cma_baseline_runs_non_private(tmp_path, make_cfg):
    pytest.importorskip("cma")
    cfg = bb_cfg(make_cfg, tmp_path / "runs", "bb-nonprivate", blackbox={"zo_optimizer": "cma"})
    phases: list[str] = []
    res = bbm.train(cfg, on_phase=phases.append)
    assert phases == ["data", "training"]
    assert res["guarantee"] == NOT_DP_NONPRIVATE and res["info_cma_generations"] >= 1
    assert 0.0 <= res["accuracy"] <= 1.0


def test_sigkill_mid_run_resumes_to_the_uninterrupted_result(tmp_path, make_cfg):
    from tests.conftest import kill_training_at

    over = {"train": {"epochs": 4, "checkpoint_every": 1}}
    cfg = bb_cfg(make_cfg, tmp_path / "killed", "bb-dp", **over)
    ref_cfg = bb_cfg(make_cfg, tmp_path / "clean", "bb-dp", **over)
    cfg.save(tmp_path / "cfg.json")
    rd = RunDir.for_config(cfg)
    kill_training_at(tmp_path / "cfg.json", rd.path, 3, "--noise-seed", "11", timeout=120, poll=0.01,
                     env={"OMP_NUM_THREADS": "1"})
    assert not rd.done
    res, ref = bbm.train(cfg), bbm.train(ref_cfg, noise_seed=11)
    assert res["steps"] == ref["steps"] == 16 and res["epsilon"] == pytest.approx(ref["epsilon"], rel=1e-12)
    assert torch.allclose(RunDir(res["run_dir"]).load_model_state()["z"], RunDir(ref["run_dir"]).load_model_state()["z"],
                          atol=1e-6)
