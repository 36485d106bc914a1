"""Data-parallel DP training: 2 CPU processes (gloo) against one process, on tiny-bert.

One spawn of two ranks does all the distributed work (it is the expensive part on a
2-core machine) and saves what it saw; the tests below compare it with single-process
runs of the same configs. A last test runs the CLI under torchrun.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import tiny_run_config
from dpflat import distributed as dist_mod
from dpflat.config import RunConfig
from dpflat import train as train_mod
from dpflat.privacy import DP, NOT_DP_PAPER, PrivacyLedger
from dpflat.runs import RunDir, RunLocked, load_results

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
FLAT = {"awp": True, "awp_epochs": 1.0, "layers": True, "n_drop": 1, "layers_warmup_steps": 2,
        "layers_examples": 32, "layers_directions": 1, "distill": True, "teacher_epochs": 0.5}


def _configs(out: Path, data: Path) -> dict:
    """The runs the ranks train (and the single process repeats), by name."""
    base = tiny_run_config(out, data)
    return {
        # all three levels (safe): their state must be identical on both ranks
        "dpflat": base.replace(variant="dpflat", flat=FLAT, train={"output_dir": str(out / "dpflat")}),
        # interrupted after 3 steps, then resumed
        "resume": base.replace(train={"output_dir": str(out / "resume"), "checkpoint_every": 1}),
        # no dropout: the same batches give the same model, up to summation order
        # paper-mode AWP: its per-step perturbation comes from rank 0's first micro-batch
        "paper_awp": base.replace(variant="dpflat", flat={"awp": True, "awp_mode": "paper", "awp_epochs": 1.0},
                                  train={"output_dir": str(out / "paper_awp"), "epochs": 1}),
        "nonprivate": base.replace(variant="nonprivate", privacy={"enabled": False}, model={"head_dropout": 0.0},
                                   train={"output_dir": str(out / "nonprivate"), "epochs": 1}),
        # one config trained twice (two output roots), default randomness: the noise must differ
        "noise_a": base.replace(train={"output_dir": str(out / "noise_a"), "epochs": 1}),
        "noise_b": base.replace(train={"output_dir": str(out / "noise_b"), "epochs": 1}),
    }


def _digest(t: torch.Tensor | None) -> str | None:
    return None if t is None else hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _clip_check(cfg, rank: int) -> dict:
    """One logical step on a fixed batch of 16, split between the ranks, through our make_private.

    ``cfg`` must have no dropout: the ranks' shards would draw different masks.

    Returns the clipped-gradient sum over both ranks (captured before the noise), the
    gradient the optimizer then used, and σ, C and the expected batch size.
    """
    from dpflat.engine import make_private

    _, _, tokd = train_mod.prepare_data(cfg)
    model = train_mod.build_model(cfg.model, 2, seed=cfg.train.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    loader = torch.utils.data.DataLoader(tokd["private"], batch_size=cfg.train.batch_size)
    dp = make_private(model, opt, loader, cfg.privacy, 8, len(tokd["private"]))
    batch = next(iter(torch.utils.data.DataLoader(tokd["private"], batch_size=16)))
    if dist_mod.is_distributed():
        batch = dist_mod.shard(batch)
    captured = {}
    clip = dp.optimizer.clip_and_accumulate

    def clip_and_keep() -> None:
        clip()
        captured.update({n: p.summed_grad.detach().clone() for n, p in zip(_names(model), dp.optimizer.params)})

    dp.optimizer.clip_and_accumulate = clip_and_keep
    torch.manual_seed(123)
    train_mod._per_example_loss(_Ctx(), dp.model, [], batch).mean().backward()
    dp.optimizer.step()
    if dist_mod.is_distributed():
        for t in captured.values():
            dist.all_reduce(t)
    return {"clipped_sum": captured, "grad": {n: p.grad.detach().clone() for n, p in zip(_names(model), params)},
            "sigma": dp.sigma, "C": cfg.privacy.max_grad_norm, "expected_batch": dp.optimizer.expected_batch_size,
            "optimizer": type(dp.optimizer).__name__, "sampler": type(dp.loader.batch_sampler).__name__}


def _rank0_errors(cfg) -> list[str]:
    """Errors raised on rank 0 alone (a failing call, a run locked by a live process) reach every rank."""
    seen = []
    try:
        dist_mod.on_main(lambda: 1 / 0)
    except ZeroDivisionError:
        seen.append("on_main")
    rd = RunDir.for_config(cfg)
    if dist_mod.is_main():
        rd.create(cfg)
        (rd.path / ".lock").write_text(str(os.getppid()))  # the pytest process: alive
    dist.barrier()
    try:
        train_mod.train(cfg)
    except RunLocked:
        seen.append("locked")
    return seen


def _names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


class _Ctx:
    """The bits of TrainContext the loss reads."""

    device = torch.device("cpu")
    cfg = RunConfig()


def _worker(rank: int, port: int, out: str, data: str) -> None:
    """One rank: every distributed run, with what it saw saved to ``out/rank{rank}.pt``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    cfgs = _configs(Path(out), Path(data))
    seen: dict = {"errors": _rank0_errors(cfgs["resume"].replace(train={"output_dir": str(Path(out) / "locked")}))}
    seen.update({"clip": _clip_check(cfgs["dpflat"].replace(model={"head_dropout": 0.0}), rank)})
    model_box, level_box, tally = [], [], {"examples": 0}
    orig_build, orig_levels, orig_record = train_mod.build_model, train_mod.build_levels, PrivacyLedger.record

    def build(*a, **k):
        model_box.append(orig_build(*a, **k))
        return model_box[-1]

    def levels(*a, **k):
        level_box.append(orig_levels(*a, **k))
        return level_box[-1]

    def record(self, who, how, accounted, examples):
        if who in (train_mod.TRAIN_WHO, "train/non-private"):
            tally["examples"] += int(examples)
        return orig_record(self, who, how, accounted, examples)

    train_mod.build_model, train_mod.build_levels, PrivacyLedger.record = build, levels, record

    def watch(steps: list) -> callable:
        def on_step(row: dict) -> None:
            model, lvs = model_box[-1], {lv.name: lv for lv in level_box[-1]}
            steps.append({
                "step": row["step"],
                "params": _digest(torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])),
                "awp_direction": _digest(lvs["awp"].direction) if "awp" in lvs else None,
                "awp_v": _digest(lvs["awp"]._v) if "awp" in lvs else None,
                "teacher": _digest(lvs["distill"].teacher) if "distill" in lvs else None,
                "keep": model.prefix.keep_mask.tolist(),
            })
        return on_step

    for name in ("dpflat", "paper_awp", "nonprivate", "noise_a", "noise_b"):
        seen[name] = {"steps": []}
        tally["examples"] = 0
        seen[name]["result"] = train_mod.train(cfgs[name], on_step=watch(seen[name]["steps"]))
        seen[name]["examples"] = [tally["examples"]]
        seen[name]["final"] = {k: v.clone() for k, v in model_box[-1].trainable_state().items()}
    # interrupted after 3 steps (rank 0 checkpoints every step), then resumed from its checkpoint
    seen["resume"] = {"steps": [], "examples": []}
    for stop in (3, None):
        tally["examples"] = 0
        res = train_mod.train(cfgs["resume"], max_steps=stop, on_step=watch(seen["resume"]["steps"]))
        seen["resume"]["stopped" if stop else "result"] = res
        seen["resume"]["examples"].append(tally["examples"])
    torch.save(seen, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, shared_data) -> dict:
    """What each of the two ranks saw, and the single-process runs of the same configs."""
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out / "ddp"), str(shared_data)), nprocs=WORLD, join=True)
    ranks = [torch.load(out / "ddp" / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    single_cfgs = _configs(out / "single", shared_data)
    single = {"clip": _clip_check(single_cfgs["dpflat"].replace(model={"head_dropout": 0.0}), 0)}
    for name in ("dpflat", "nonprivate"):
        box = []
        orig = train_mod.build_model

        def build(*a, _box=box, **k):
            _box.append(orig(*a, **k))
            return _box[-1]

        with pytest.MonkeyPatch.context() as m:
            m.setattr(train_mod, "build_model", build)
            single[name] = {"result": train_mod.train(single_cfgs[name]),
                            "final": box[-1].trainable_state()}
    return {"ranks": ranks, "single": single, "out": out}


def _rank_gen(seed: int, rank: int) -> torch.Generator:
    from dpflat.engine import MechanismRNG

    return MechanismRNG.create(noise_seed=seed, rank=rank).sampler


def test_the_sampler_keeps_ranks_in_step_and_draws_independently():
    n, q, steps = 40, 0.02, 50
    a = list(dist_mod.RankPoissonSampler(total_size=n, sample_rate=q, steps=steps, replica=0, replicas=2,
                                         generator=_rank_gen(0, 0)))
    b = list(dist_mod.RankPoissonSampler(total_size=n, sample_rate=q, steps=steps, replica=1, replicas=2,
                                         generator=_rank_gen(0, 1)))
    assert len(a) == len(b) == steps  # Opacus' sampler would drop the many empty local batches here
    assert any(len(x) == 0 for x in a) and any(len(x) == 0 for x in b)
    assert {i % 2 for x in a for i in x} <= {0} and {i % 2 for x in b for i in x} <= {1}
    # same noise seed, yet not the same positions picked on both ranks
    assert [[i // 2 for i in x] for x in a] != [[i // 2 for i in x] for x in b]
    again = list(dist_mod.RankPoissonSampler(total_size=n, sample_rate=q, steps=steps, replica=0, replicas=2,
                                             generator=_rank_gen(0, 0)))
    assert again == a  # reproducible from an operator-supplied noise seed...
    torch.manual_seed(0)
    x = list(dist_mod.RankPoissonSampler(total_size=n, sample_rate=q, steps=steps, replica=0, replicas=2))
    torch.manual_seed(0)
    y = list(dist_mod.RankPoissonSampler(total_size=n, sample_rate=q, steps=steps, replica=0, replicas=2))
    assert x != y  # ...but by default secret: not a function of the (public) global seed


def test_each_example_is_sampled_at_the_global_rate():
    n, q, steps = 50, 0.1, 400
    counts = torch.zeros(n)
    for r in range(2):
        for batch in dist_mod.RankPoissonSampler(total_size=n, sample_rate=q, steps=steps, replica=r, replicas=2,
                                                 generator=_rank_gen(1, r)):
            counts[batch] += 1
    rate = counts / steps
    assert rate.mean().item() == pytest.approx(q, abs=0.01)
    assert (rate - q).abs().max().item() < 0.06  # 4+ sd of a binomial(400, 0.1) rate is 0.06


def test_clipped_sum_matches_one_process_and_noise_is_added_once(two_ranks):
    r0, r1 = (r["clip"] for r in two_ranks["ranks"])
    one = two_ranks["single"]["clip"]
    assert r0["optimizer"] == "DistributedDPOptimizer" and r0["sampler"] == "RankPoissonSampler"
    assert one["optimizer"] == "DPOptimizer"
    for name, s in one["clipped_sum"].items():
        torch.testing.assert_close(r0["clipped_sum"][name], s, rtol=1e-5, atol=1e-6)
        assert torch.equal(r0["grad"][name], r1["grad"][name])  # one released gradient
    # the released gradient is (clipped sum + noise) / B with B the global expected batch
    B = one["expected_batch"]
    assert r0["expected_batch"] * WORLD == B
    noise = torch.cat([(r0["grad"][k] * B - r0["clipped_sum"][k]).flatten() for k in one["clipped_sum"]])
    sd = r0["sigma"] * r0["C"]
    assert noise.numel() > 500
    assert noise.std().item() == pytest.approx(sd, rel=0.12)  # twice the noise would be 1.41 sd


def test_noise_differs_across_runs_of_one_config_under_torchrun(two_ranks):
    """Two 2-process runs of one config (default, secret randomness): different models, the
    ranks of each run in step, and the ledger says where the randomness came from."""
    r0 = two_ranks["ranks"][0]
    a, b = r0["noise_a"]["final"], r0["noise_b"]["final"]
    assert any(not torch.equal(a[k], b[k]) for k in a)
    for name in ("noise_a", "noise_b"):
        assert two_ranks["ranks"][0][name]["steps"] == two_ranks["ranks"][1][name]["steps"]
        rd = RunDir(r0[name]["result"]["run_dir"])
        led = json.loads(rd.ledger_file.read_text())
        assert led["noise_source"] == "os-entropy" and rd.private_diagnostics()["batch_sizes"]["steps"] == 4


def test_rank0_errors_and_the_run_lock_reach_every_rank(two_ranks):
    assert [r["errors"] for r in two_ranks["ranks"]] == [["on_main", "locked"]] * WORLD


def test_same_seed_same_epsilon_as_one_process(two_ranks):
    for name in ("dpflat", "resume"):
        res = [r[name]["result"] for r in two_ranks["ranks"]]
        ref = two_ranks["single"]["dpflat"]["result"]
        assert res[0] == res[1]  # every rank returns rank 0's row
        assert res[0]["guarantee"] == DP and res[0]["steps"] == ref["steps"] == 8
        for k in ("epsilon", "sigma", "sample_rate", "delta"):
            assert res[0][k] == ref[k], k


def test_ranks_hold_identical_parameters_and_levels_after_each_step(two_ranks):
    for name, n_steps in (("dpflat", 8), ("paper_awp", 4), ("nonprivate", 4), ("resume", 8)):
        a, b = (r[name]["steps"] for r in two_ranks["ranks"])
        assert [s["step"] for s in a] == list(range(1, n_steps + 1)), name
        assert a == b, name
    steps = two_ranks["ranks"][0]["dpflat"]["steps"]
    assert all(s["awp_direction"] is not None and s["teacher"] is not None for s in steps)
    assert sum(steps[0]["keep"]) == 2  # one layer dropped, the same one on both ranks
    assert len({s["params"] for s in steps}) == len(steps)  # they did train
    paper = two_ranks["ranks"][0]["paper_awp"]["steps"]
    assert all(s["awp_v"] is not None for s in paper) and len({s["awp_v"] for s in paper}) == len(paper)


def test_nonprivate_ranks_follow_the_single_process(two_ranks):
    mine, ref = two_ranks["ranks"][0]["nonprivate"]["final"], two_ranks["single"]["nonprivate"]["final"]
    for k, v in ref.items():
        torch.testing.assert_close(mine[k], v, rtol=1e-4, atol=1e-5)


def test_ledger_counts_every_rank_once_and_one_results_row(two_ranks):
    ranks = two_ranks["ranks"]
    for name in ("dpflat", "paper_awp", "nonprivate", "resume"):
        rd = RunDir(ranks[0][name]["result"]["run_dir"])
        ledger = rd.private_diagnostics()  # every read's counts (ledger.json leaves out the accounted ones')
        (train_read,) = [r for r in ledger["reads"] if r["who"] in (train_mod.TRAIN_WHO, "train/non-private")]
        # the examples both ranks touched, each counted once (also across the resume)
        assert train_read["examples"] == sum(sum(r[name]["examples"]) for r in ranks), name
        assert all(sum(r[name]["examples"]) > 0 for r in ranks)
        table = load_results(rd.path.parent)
        assert len(table) == 1 and table.iloc[0]["run_id"] == rd.path.name
        n_steps = ranks[0][name]["result"]["steps"]
        assert [json.loads(x)["step"] for x in rd.metrics_file.read_text().splitlines()] == list(range(1, n_steps + 1))
    # the dpflat ledger: setup ran once (safe levels read no private data), training on both ranks
    led = json.loads(RunDir(ranks[0]["dpflat"]["result"]["run_dir"]).ledger_file.read_text())
    assert led["guarantee"] == DP and [r["who"] for r in led["reads"]] == [train_mod.TRAIN_WHO]
    led = json.loads(RunDir(ranks[0]["paper_awp"]["result"]["run_dir"]).ledger_file.read_text())
    assert led["guarantee"] == NOT_DP_PAPER and led["claimed_epsilon"] is None


def test_interrupted_run_resumes_with_right_steps_and_epsilon(two_ranks):
    ranks = two_ranks["ranks"]
    stopped = ranks[0]["resume"]["stopped"]
    assert stopped["finished"] is False and stopped["step"] == 3
    assert all(len(r["resume"]["examples"]) == 2 and min(r["resume"]["examples"]) > 0 for r in ranks)
    res = ranks[0]["resume"]["result"]
    assert res["finished"] and res["steps"] == 8
    assert res["epsilon"] == two_ranks["single"]["dpflat"]["result"]["epsilon"]


def test_cli_under_torchrun_writes_one_results_row(tmp_path, shared_data):
    cfg = tiny_run_config(tmp_path / "runs", shared_data).replace(train={"epochs": 1, "num_threads": 1})
    cfg_file = tmp_path / "cfg.json"
    cfg.save(cfg_file)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           "-m", "dpflat", "train", "--config", str(cfg_file)]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    assert len(rows) == 1  # printed by rank 0 only
    table = load_results(cfg.train.output_dir)
    assert len(table) == 1 and table.iloc[0]["steps"] == 4 and table.iloc[0]["guarantee"] == DP
    rd = RunDir(rows[0]["run_dir"])
    assert not (rd.path / ".lock").exists() and rd.done
