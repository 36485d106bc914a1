"""Issue 14: a stated ε must hold.

Secret mechanism randomness (two runs of one config differ; ``--noise-seed`` reproduces;
the seed is written nowhere), exact replay after kill -9, refusals (``--no-poisson``,
δ >= 1/N, a non-finite loss), no ε for runs that are not DP, "unknown guarantee" without
a ledger, and the independent cross-check of the claimed ε.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from dpflat import cli
from dpflat.accountants import from_ledger, poisson_check
from dpflat.config import ConfigError
from dpflat.engine import MechanismRNG, noise_for_target
from dpflat.privacy import DP, NOT_DP_PAPER, UNKNOWN
from dpflat.runs import RunDir, load_results
from dpflat.train import LOSS_KEY, NonFiniteLoss, train

REPO = Path(__file__).resolve().parents[1]
SEED = 7315550013  # a noise seed whose decimal form cannot occur by chance in the run folder
SHORT = {"train": {"epochs": 0.5}}  # 2 steps of the tiny config


def _params(run_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- secret randomness
def test_default_runs_differ_a_noise_seed_reproduces_and_is_written_nowhere(tmp_path, make_cfg):
    runs = {name: train(make_cfg(tmp_path / name, **SHORT), noise_seed=seed)
            for name, seed in (("a", None), ("b", None), ("s1", SEED), ("s2", SEED))}
    assert len({r["run_id"] for r in runs.values()}) == 1  # one config: the same public run id
    assert not _same(_params(runs["a"]["run_dir"]), _params(runs["b"]["run_dir"]))
    assert _same(_params(runs["s1"]["run_dir"]), _params(runs["s2"]["run_dir"]))
    led_a = json.loads(Path(runs["a"]["run_dir"], "ledger.json").read_text())
    led_s = json.loads(Path(runs["s1"]["run_dir"], "ledger.json").read_text())
    assert led_a["noise_source"] == "os-entropy" and led_s["noise_source"] == "operator-supplied"
    assert runs["s1"]["noise_source"] == "operator-supplied"
    assert "model.safetensors" in " ".join(led_s["release"]["covered"])
    assert any("train_loss_private" in x for x in led_s["release"]["private_diagnostics_not_covered"])
    # the seed is nowhere under the output root (config, metrics, ledger, result, table, checkpoints)
    needle = str(SEED).encode()
    files = [p for p in (tmp_path / "s1").rglob("*") if p.is_file()]
    assert any(p.name == "state.pt" for p in files) and any(p.name == "results.parquet" for p in files)
    for p in files:
        assert needle not in p.read_bytes(), p
    assert str(SEED) not in runs["s1"]["run_id"]


_KILL = """
import os, signal, sys, torch
torch.set_num_threads(1)
from dpflat.config import RunConfig
from dpflat.train import train
cfg = RunConfig.load(sys.argv[1])
def on_step(row):
    if row["step"] == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)  # after the step's outputs, before its checkpoint
train(cfg, on_step=on_step, noise_seed=None if sys.argv[3] == "none" else int(sys.argv[3]))
"""


def _kill_at(tmp_path: Path, cfg, step: int, noise_seed: int | None) -> None:
    """Train ``cfg`` in a child process that kill -9s itself right after ``step``'s outputs."""
    cfg.save(tmp_path / "cfg.json")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    p = subprocess.run([sys.executable, "-c", _KILL, str(tmp_path / "cfg.json"), str(step), str(noise_seed).lower()],
                       cwd=REPO, env=env, capture_output=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]


def _rows(run_dir) -> list[dict]:
    """metrics.jsonl without the throughput column (wall-clock time differs between processes)."""
    return [{k: v for k, v in json.loads(x).items() if k != "examples_per_s"}
            for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_between_checkpoints_then_resume_is_bit_identical(tmp_path, make_cfg):
    """Killed at step 6 (checkpoint at 4, an eval at 6 may have written best.safetensors), then
    resumed *without* the noise seed: the generator state comes from the checkpoint, the lost
    steps are replayed exactly, and the run equals the uninterrupted one bit for bit."""
    over = {"train": {"epochs": 2, "checkpoint_every": 4, "eval_every": 2}}
    cfg, ref_cfg = make_cfg(tmp_path / "killed", **over), make_cfg(tmp_path / "clean", **over)
    cfg.save(tmp_path / "cfg.json")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    p = subprocess.run([sys.executable, "-c", _KILL, str(tmp_path / "cfg.json"), "6", str(SEED)], cwd=REPO, env=env,
                       capture_output=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    rd = RunDir.for_config(cfg)
    assert not rd.done and (rd.path / "LATEST").read_text().strip() == "ckpt-0000004"
    assert [json.loads(x)["step"] for x in rd.metrics_file.read_text().splitlines()] == list(range(1, 7))
    res = train(cfg)  # resume: no noise seed given
    ref = train(ref_cfg, noise_seed=SEED)
    assert res["steps"] == ref["steps"] == 8 and res["best_step"] == ref["best_step"]
    assert res["epsilon"] == ref["epsilon"] and res["accuracy"] == ref["accuracy"]
    for f in ("model.safetensors", "last.safetensors", "best.safetensors"):
        assert (rd.path / f).read_bytes() == (RunDir.for_config(ref_cfg).path / f).read_bytes(), f
    drop = lambda r: {k: v for k, v in r.items() if k != "examples_per_s"}  # noqa: E731
    rows = [drop(json.loads(x)) for x in rd.metrics_file.read_text().splitlines()]
    ref_rows = [drop(json.loads(x)) for x in RunDir.for_config(ref_cfg).metrics_file.read_text().splitlines()]
    assert rows == ref_rows and [r["step"] for r in rows] == list(range(1, 9))  # no duplicates after the restart
    led, ref_led = (RunDir(r["run_dir"]).private_diagnostics() for r in (res, ref))
    assert led["batch_sizes"] == ref_led["batch_sizes"] and led["batch_sizes"]["steps"] == 8 == res["steps"]


@pytest.mark.parametrize("noise_seed", [SEED, None], ids=["noise-seed", "os-entropy"])
def test_sigkill_before_the_first_checkpoint_then_resume_is_bit_identical(tmp_path, make_cfg, noise_seed):
    """Issue 26: killed at step 3, before the first regular checkpoint (6), after an eval (2) wrote
    best.safetensors. The start of the run is a checkpoint (the secret generator state before the
    first draw), so the resumed run -- given no noise seed -- replays steps 1-3 with the killed
    attempt's batches and noise and logs one row per step. With OS entropy the killed attempt's
    own rows are the reference, and two resumes of the same folder agree bit for bit."""
    import shutil

    over = {"train": {"epochs": 2, "checkpoint_every": 6, "eval_every": 2}}
    cfg = make_cfg(tmp_path / "killed", **over)
    _kill_at(tmp_path, cfg, 3, noise_seed)
    rd = RunDir.for_config(cfg)
    assert (rd.path / "LATEST").read_text().strip() == "ckpt-0000000" and rd.best_file.is_file()
    killed_rows = _rows(rd.path)
    assert [r["step"] for r in killed_rows] == [1, 2, 3]
    twin = make_cfg(tmp_path / "twin", **over)  # the same killed folder, resumed a second time
    shutil.copytree(tmp_path / "killed", tmp_path / "twin")
    part = train(cfg, max_steps=1)  # resumed from step 0; no eval yet: the killed attempt's best is gone
    assert part["step"] == 1 and not rd.best_file.exists() and [r["step"] for r in _rows(rd.path)] == [1]
    res = train(cfg)
    rows = _rows(rd.path)
    assert [r["step"] for r in rows] == list(range(1, 9)) and rows[:3] == killed_rows  # the same noise, replayed
    if noise_seed is None:
        ref = train(twin)
    else:  # with the operator seed the uninterrupted run is the reference
        ref = train(make_cfg(tmp_path / "clean", **over), noise_seed=noise_seed)
    assert res["steps"] == ref["steps"] == 8 and res["accuracy"] == ref["accuracy"] and res["epsilon"] == ref["epsilon"]
    assert rows == _rows(ref["run_dir"])
    for f in ("model.safetensors", "last.safetensors", "best.safetensors"):
        assert (rd.path / f).read_bytes() == (Path(ref["run_dir"]) / f).read_bytes(), f
    led, ref_led = (RunDir(r["run_dir"]).private_diagnostics() for r in (res, ref))
    assert led["batch_sizes"] == ref_led["batch_sizes"] and led["batch_sizes"]["steps"] == 8


@pytest.mark.parametrize("variant", ["dp", "nonprivate"])
@pytest.mark.parametrize("stop", [1, 6])  # inside the first and inside the second pass (4 steps each)
def test_a_run_resumed_inside_a_pass_replays_the_uninterrupted_one(tmp_path, make_cfg, variant, stop):
    """The crash-accounting argument (a lost step is replayed bit for bit) must hold wherever the
    checkpoint falls. It held only at pass boundaries: a resumed run began a new pass, whose
    iterator drew a base seed from the secret sampler (and restarted the pass's length), so every
    step after a checkpoint inside a pass drew other batches and noise than the lost ones."""
    over = {"train": {"epochs": 2, "checkpoint_every": 1, "eval_every": 2}}
    cfg, ref_cfg = make_cfg(tmp_path / "cut", **over), make_cfg(tmp_path / "clean", **over)
    if variant == "nonprivate":
        cfg, ref_cfg = (c.replace(privacy={"enabled": False}, variant="nonprivate") for c in (cfg, ref_cfg))
    part = train(cfg, max_steps=stop, noise_seed=SEED)
    assert not part.get("finished") and part["step"] == stop
    res = train(cfg)  # a new call: the generator states come from the checkpoint
    ref = train(ref_cfg, noise_seed=SEED)
    drop = lambda r: {k: v for k, v in r.items() if k != "examples_per_s"}  # noqa: E731
    rows, ref_rows = ([drop(json.loads(x)) for x in RunDir(r["run_dir"]).metrics_file.read_text().splitlines()]
                      for r in (res, ref))
    assert rows == ref_rows and [r["step"] for r in rows] == list(range(1, 9))
    for f in ("model.safetensors", "last.safetensors"):
        assert (Path(res["run_dir"]) / f).read_bytes() == (Path(ref["run_dir"]) / f).read_bytes(), f


def test_secure_rng_without_torchcsprng_is_refused_with_one_line():
    try:
        import torchcsprng  # noqa: F401
        pytest.skip("torchcsprng is installed")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match="torchcsprng") as e:
        MechanismRNG.create(secure=True)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- refusals
def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    rc = cli.main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def test_no_poisson_dp_run_is_refused_with_one_line(tmp_path, make_cfg, capsys):
    cfg = make_cfg(tmp_path / "runs")
    cfg.save(tmp_path / "cfg.json")
    rc, out, err = _cli(["train", "--config", str(tmp_path / "cfg.json"), "--no-poisson"], capsys)
    assert rc == 2 and "Poisson" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ConfigError, match="Poisson"):
        cfg.replace(privacy={"poisson": False})
    cfg.replace(privacy={"poisson": False, "enabled": False})  # non-private shuffled batches stay allowed


def test_delta_of_at_least_one_over_n_is_refused(tmp_path, make_cfg, capsys):
    cfg = make_cfg(tmp_path / "runs", privacy={"delta": 0.5})  # N = 128
    with pytest.raises(ConfigError, match="1/N"):
        train(cfg)
    assert not (tmp_path / "runs").exists()  # refused before any work: not even the output folder is left
    cfg.save(tmp_path / "cfg.json")
    rc, _, err = _cli(["train", "--config", str(tmp_path / "cfg.json"), "--delta", "0.008"], capsys)  # 1/128 = 0.0078
    assert rc == 2 and "1/N" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ConfigError):
        cfg.privacy.resolve_delta(128)
    assert make_cfg(tmp_path, privacy={"delta": 0.007}).privacy.resolve_delta(128) == 0.007


def test_non_finite_loss_stops_the_run_with_one_line_and_no_result(tmp_path, make_cfg, capsys, monkeypatch):
    import dpflat.train as train_mod

    orig, close, calls = train_mod._per_example_loss, train_mod._close_step, {"n": 0}

    def poisoned(ctx, model, levels, batch):
        per_ex = orig(ctx, model, levels, batch)
        return per_ex * float("nan") if calls["n"] >= 1 else per_ex  # step 1 (all its chunks) is fine

    def counted(*a, **k):
        calls["n"] += 1
        return close(*a, **k)

    monkeypatch.setattr(train_mod, "_per_example_loss", poisoned)
    monkeypatch.setattr(train_mod, "_close_step", counted)
    cfg = make_cfg(tmp_path / "runs")
    cfg.save(tmp_path / "cfg.json")
    rc, out, err = _cli(["train", "--config", str(tmp_path / "cfg.json"), "--noise-seed", "1"], capsys)
    assert rc == 2 and "non-finite" in err and len(err.strip().splitlines()) == 1 and out == ""
    rd = RunDir.for_config(cfg)
    assert not rd.done and load_results(tmp_path / "runs").empty
    rows = [json.loads(x) for x in rd.metrics_file.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and all(math.isfinite(r[LOSS_KEY]) for r in rows)
    calls["n"] = 0
    with pytest.raises(NonFiniteLoss):
        train(cfg, resume=False)


# --------------------------------------------------------------------------- no ε unless DP
def test_paper_mode_shows_no_epsilon_anywhere(tmp_path, make_cfg, capsys):
    cfg = make_cfg(tmp_path / "runs", variant="dp+awp-paper", train={"epochs": 0.5},
                   flat={"awp": True, "awp_mode": "paper", "awp_epochs": 1.0})
    cfg.save(tmp_path / "cfg.json")
    rc, out, _ = _cli(["train", "--config", str(tmp_path / "cfg.json")], capsys)
    assert rc == 0
    printed = json.loads(out.strip().splitlines()[-1])
    rd = RunDir(printed["run_dir"])
    result = json.loads(rd.result_file.read_text())
    ledger = json.loads(rd.ledger_file.read_text())
    rows = [json.loads(x) for x in rd.metrics_file.read_text().splitlines()]
    table = load_results(tmp_path / "runs")
    assert ledger["guarantee"] == NOT_DP_PAPER and "epsilon" not in ledger and ledger["dpsgd_part_epsilon"] > 0
    for shown in (printed, result, table.iloc[0].to_dict()):
        assert shown["guarantee"] == NOT_DP_PAPER
        assert shown["epsilon"] is None or (isinstance(shown["epsilon"], float) and math.isnan(shown["epsilon"]))
        assert "epsilon_spent" not in shown and shown["dpsgd_part_epsilon"] == pytest.approx(ledger["dpsgd_part_epsilon"])
    assert all("epsilon" not in r for r in rows) and any("dpsgd_part_epsilon" in r for r in rows)
    assert all("loss" not in r and LOSS_KEY in r for r in rows)  # the raw private loss is labelled as such

    from dpflat.report import build_report, checked_guarantees, sharpness_vs_epsilon

    checked = checked_guarantees(table, tmp_path / "runs")
    fig = sharpness_vs_epsilon(checked, ("accuracy",))
    # a run that is not DP is a band over the DP runs' ε range, never a point at its target ε
    assert all(list(tr.x) != [cfg.privacy.epsilon] for tr in fig.data)
    assert "not DP" in build_report(tmp_path / "runs").read_text()


def test_a_run_without_a_valid_ledger_has_an_unknown_guarantee(tmp_path, make_cfg):
    from dpflat.analysis import load_run
    from dpflat.report import build_report, checked_guarantees

    res = train(make_cfg(tmp_path / "runs", **SHORT))
    rd = RunDir(res["run_dir"])
    assert res["guarantee"] == DP and load_run(rd.path).guarantee == DP and "ε=" in load_run(rd.path).label
    rd.ledger_file.unlink()
    run = load_run(rd.path)
    assert run.guarantee == UNKNOWN and run.claimed_epsilon is None and "ε=" not in run.label
    t = checked_guarantees(load_results(tmp_path / "runs"), tmp_path / "runs")
    assert t.iloc[0]["guarantee"] == UNKNOWN and math.isnan(t.iloc[0]["epsilon"])
    assert UNKNOWN in build_report(tmp_path / "runs").read_text()
    rd.ledger_file.write_text("{not json")
    assert load_run(rd.path).guarantee == UNKNOWN


# --------------------------------------------------------------------------- DPZero
def test_dpzero_noise_differs_across_runs_and_a_noise_seed_reproduces(tmp_path, make_cfg):
    over = dict(variant="bb-dp", blackbox={"active": True, "prompt_dim": 8, "prompt_tokens": 2}, **SHORT)
    from dpflat.blackbox import train as bb_train

    runs = {name: bb_train(make_cfg(tmp_path / name, **over), noise_seed=seed)
            for name, seed in (("a", None), ("b", None), ("s1", SEED), ("s2", SEED))}
    z = {k: _params(r["run_dir"])["z"] for k, r in runs.items()}
    assert not torch.equal(z["a"], z["b"]) and torch.equal(z["s1"], z["s2"])
    led = json.loads(Path(runs["a"]["run_dir"], "ledger.json").read_text())
    assert led["mechanism"] == "dpzero" and led["noise_source"] == "os-entropy" and "batch_sizes" not in led
    assert RunDir(runs["a"]["run_dir"]).private_diagnostics()["batch_sizes"]["steps"] == 2


# --------------------------------------------------------------------------- the cross-check
def test_cross_check_against_dp_accounting_and_poisson_batch_sizes(tmp_path, make_cfg):
    res = train(make_cfg(tmp_path / "runs"), noise_seed=3)  # 8 steps
    c = from_ledger(res["run_dir"])
    assert c.claim_above_pld is True and c.claim_near_rdp is True
    assert c.poisson["steps"] == 8 and c.poisson["consistent"] is True and c.ledger_matches is True
    assert "independent cross-check: passed" in c.table()
    led = json.loads(Path(res["run_dir"], "ledger.json").read_text())
    # shuffled fixed-size batches (what --no-poisson did): the variance test fails
    fixed = {**led, "batch_sizes": {"steps": 8, "sum": 8 * 32.0, "sumsq": 8 * 32.0**2}}
    assert from_ledger(fixed).poisson["consistent"] is False and from_ledger(fixed).ledger_matches is False
    # a claim below what the recorded mechanism can justify
    low = {**led, "epsilon": 0.5 * c.epsilons["dp_accounting_pld"]}
    assert from_ledger(low).claim_above_pld is False and from_ledger(low).ledger_matches is False
    # Binomial(N, q) sizes pass; sizes with the right mean but 4x the variance do not
    torch.manual_seed(0)
    sizes = torch.distributions.Binomial(128, torch.full((400,), 0.25)).sample().tolist()
    ok = poisson_check({"steps": 400, "sum": sum(sizes), "sumsq": sum(s * s for s in sizes)}, 0.25, 128)
    assert ok["consistent"] is True
    wide = [32 + 2 * (s - 32) for s in sizes]
    assert poisson_check({"steps": 400, "sum": sum(wide), "sumsq": sum(s * s for s in wide)}, 0.25, 128)["consistent"] is False


def test_rdp_optimum_is_inside_the_alpha_grid_for_demo_sized_runs():
    """The demo (1500 examples, batch 128 -> ~24 steps at ε 2 and 8) warned "Optimal order is the
    largest alpha" with Opacus' default grid; the wide grid keeps the optimum inside it."""
    from dpflat.config import PrivacyConfig

    for eps in (0.5, 2.0, 8.0):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            noise_for_target(PrivacyConfig(epsilon=eps), 128 / 1500, 24, 1 / 1500**1.1)
