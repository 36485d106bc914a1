"""The cheaper DP-Flat setup selects the same layers and trains the same model.

- the levels' fits (teacher, layer scorer) run in length groups with dropout off: the same
  steps as padded batches; they stop at their val plateau and keep the best parameters;
- scoring S on length-regrouped batches (padding cut) gives the same S for every
  candidate (float noise only) and so the same greedy ranking, on a fixed seed;
- the safe setup cache: a second run that shares backbone, public split, seed and
  settings reuses the layer selection and the teacher, and trains exactly the model
  a run without the cache trains; paper mode never writes the cache.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from dpflat.cli import main
from dpflat.config import ModelConfig
from dpflat.flat import _cache
from dpflat.flat import distill as distill_mod
from dpflat.flat.layers import fixed_batches, greedy_drop, scoring_batches
from dpflat.models import build_model


def _ragged_dataset(n: int = 40, width: int = 16, seed: int = 0):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(3, width + 1, (n,), generator=g)
    am = (torch.arange(width).unsqueeze(0) < lens.unsqueeze(1)).long()
    ids = torch.randint(5, 100, (n, width), generator=g) * am
    labels = torch.randint(0, 2, (n,), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": am.tolist(),
                              "token_type_ids": torch.zeros_like(ids).tolist(), "labels": labels.tolist()}).with_format("torch")


@pytest.mark.parametrize("seed", [0, 1])
def test_regrouped_scoring_gives_the_same_ranking(seed):
    torch.set_num_threads(1)
    model = build_model(ModelConfig(backbone="tiny-bert", prefix_len=2, prefix_init="random"), 2, seed=seed).eval()
    ds = _ragged_dataset(seed=seed)
    plain, fast = fixed_batches(ds, 40), scoring_batches(ds, 40, group=8)
    assert sum(b["input_ids"].numel() for b in fast) < sum(b["input_ids"].numel() for b in plain)
    keep_a, trace_a = greedy_drop(model, plain, n_drop=2, rho=0.05, n_random=2, seed=seed)
    keep_b, trace_b = greedy_drop(model, fast, n_drop=2, rho=0.05, n_random=2, seed=seed)
    assert keep_a == keep_b
    for ra, rb in zip(trace_a, trace_b):
        assert ra["dropped"] == rb["dropped"]
        assert rb["S"] == pytest.approx(ra["S"], rel=1e-4, abs=1e-7)
        assert ra["candidates"].keys() == rb["candidates"].keys()
        for k in ra["candidates"]:
            assert rb["candidates"][k] == pytest.approx(ra["candidates"][k], rel=1e-4, abs=1e-7)


def test_a_fit_in_length_groups_is_the_padded_fit():
    """The levels' fits cut each batch by length (padding cut, dropout off): the same AdamW steps
    on the same examples as whole padded batches, to float summation order."""
    import torch.nn.functional as F

    from dpflat.flat._fit import fit_to_plateau

    torch.set_num_threads(1)
    model = build_model(ModelConfig(backbone="tiny-bert", prefix_len=2, prefix_init="random", head_dropout=0.1), 2,
                        seed=0)
    ds = _ragged_dataset(n=64, seed=2)
    a, report = fit_to_plateau(model, ds, None, max_steps=4, batch_size=48, lr=0.05, device=torch.device("cpu"), seed=3)
    ref = __import__("copy").deepcopy(model).eval()  # eval: the fit's dropout is off
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=0.05)
    loader = torch.utils.data.DataLoader(ds, batch_size=48, shuffle=True, generator=torch.Generator().manual_seed(3))
    done = 0
    while done < 4:
        for b in loader:
            opt.zero_grad()
            F.cross_entropy(ref(**{k: v for k, v in b.items() if k != "labels"}), b["labels"]).backward()
            opt.step()
            done += 1
            if done == 4:
                break
    flat = lambda m: torch.cat([p.detach().flatten() for p in m.parameters() if p.requires_grad])  # noqa: E731
    assert report.steps == 4 and report.stopped == "budget"
    assert not torch.equal(flat(a), flat(model))  # the fit moved the prefix
    assert torch.allclose(flat(a), flat(ref), rtol=1e-4, atol=1e-6)


def test_a_fit_stops_at_its_val_plateau_and_keeps_the_best_parameters():
    from dpflat.flat._fit import fit_to_plateau

    torch.set_num_threads(1)
    model = build_model(ModelConfig(backbone="tiny-bert", prefix_len=2, prefix_init="random"), 2, seed=0)
    ds, val = _ragged_dataset(n=64, seed=2), _ragged_dataset(n=32, seed=5)
    fit, r = fit_to_plateau(model, ds, val, max_steps=400, batch_size=16, lr=0.05, device=torch.device("cpu"),
                            seed=1, eval_every=2, patience=2)
    assert r.stopped == "plateau" and r.steps < 400
    assert r.curve[0][0] == 0 and r.val_accuracy == max(acc for _, acc in r.curve)
    assert dict(r.curve)[r.best_step] == r.val_accuracy
    # the returned parameters are the best step's: evaluating them gives its accuracy
    from dpflat.evaluate import evaluate

    assert evaluate(fit, val, 256)["accuracy"] == pytest.approx(r.val_accuracy)


def test_the_plateau_mean_is_the_mean_of_the_states_from_the_best_evaluation_to_the_stop():
    """``plateau_mean`` (the layer scorer's model): the same steps as the best-on-val fit, then the
    mean of the parameters at the evaluations from the best one to the stop, with its own val
    accuracy. Checked against the states recorded by a wrapper of the optimizer's step."""
    from dpflat.evaluate import evaluate
    from dpflat.flat import _fit

    torch.set_num_threads(1)
    model = build_model(ModelConfig(backbone="tiny-bert", prefix_len=2, prefix_init="random"), 2, seed=0)
    ds, val = _ragged_dataset(n=64, seed=2), _ragged_dataset(n=32, seed=5)
    kw = dict(max_steps=400, batch_size=16, lr=0.05, device=torch.device("cpu"), seed=1, eval_every=2, patience=3)
    states, orig = [], _fit._step

    def step(student, opt, b, device):
        n = orig(student, opt, b, device)
        states.append({k: p.detach().clone() for k, p in student.named_parameters() if p.requires_grad})
        return n

    _fit._step = step
    try:
        best, rb = _fit.fit_to_plateau(model, ds, val, **kw)
        n_best = len(states)
        mean, rm = _fit.fit_to_plateau(model, ds, val, plateau_mean=True, **kw)
    finally:
        _fit._step = orig
    assert (rm.steps, rm.best_step, rm.curve) == (rb.steps, rb.best_step, rb.curve)  # the same fit
    assert rm.stopped == "plateau" and rm.best_step > 0
    run = states[n_best:]
    at = [run[s - 1] for s in range(rm.best_step, rm.steps + 1, 2)]  # the evaluations from best to stop
    assert len(at) == 4  # the best one and the three without a gain
    got = {k: p for k, p in mean.named_parameters() if p.requires_grad}
    for k in got:
        assert torch.allclose(got[k], torch.stack([s[k] for s in at]).mean(0), atol=1e-6), k
    assert rm.val_accuracy == pytest.approx(evaluate(mean, val, 256)["accuracy"])


def _args(out: Path, data: Path, mode: str, eps: float) -> list[str]:
    return [
        "train", "--variant", "dpflat", "--mode", mode, "--backbone", "tiny-bert", "--data-dir", str(data),
        "--train-size", "64", "--eval-size", "32", "--public-size", "32", "--max-length", "16",
        "--prefix-len", "2", "--prefix-init", "random", "--epochs", "1", "--batch-size", "16",
        "--physical-batch-size", "8", "--checkpoint-every", "100", "--output-dir", str(out), "--no-progress",
        "--epsilon", str(eps), "--awp-epochs", "1", "--layers-examples", "32",
        "--layers-directions", "1", "--teacher-epochs", "0.5", "--teacher-batch-size", "16",
    ]


def _run(out: Path, data: Path, mode: str, eps: float, teachers: list | None = None) -> dict:
    """One tiny DP-Flat run through the CLI; appends the teacher prefix it used to ``teachers``."""
    orig = distill_mod.Distillation.setup

    def spy(self, ctx):
        orig(self, ctx)
        if teachers is not None:
            teachers.append(self.teacher.detach().clone())

    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(buf):
        mp.setattr(distill_mod.Distillation, "setup", spy)
        assert main(_args(out, data, mode, eps)) == 0
    row = json.loads(buf.getvalue().strip().splitlines()[-1])
    return json.loads((Path(row["run_dir"]) / "result.json").read_text())


def _info(res: dict) -> dict:
    return res.get("info", res)


def test_safe_setup_cache_reuses_selection_and_teacher_and_trains_the_same_model(tmp_path, shared_data, monkeypatch):
    torch.set_num_threads(1)
    out = tmp_path / "runs"
    teachers: list[torch.Tensor] = []
    first = _run(out, shared_data, "safe", 8.0, teachers)
    files = sorted(p.name for p in (out / ".setup-cache").iterdir())
    assert len(files) == 3 and {f.rsplit("-", 1)[0] for f in files} == {"layers", "fit-scorer", "fit-teacher"}
    second = _run(out, shared_data, "safe", 3.0, teachers)  # another ε: same public work
    i1, i2 = _info(first), _info(second)
    assert i1["layers_cached"] is False and i1["teacher_cached"] is False
    assert i2["layers_cached"] is True and i2["teacher_cached"] is True
    assert i2["layers_keep"] == i1["layers_keep"] and i2["teacher_accuracy"] == i1["teacher_accuracy"]
    assert i2["layers_trace"] == i1["layers_trace"]
    # the same ε=3 run without the cache computes the same setup outcome, to the bit
    monkeypatch.setenv("DPFLAT_NO_SETUP_CACHE", "1")
    cold = _run(tmp_path / "cold", shared_data, "safe", 3.0, teachers)
    assert not (tmp_path / "cold" / ".setup-cache").exists()
    ic = _info(cold)
    assert ic["layers_cached"] is False and ic["teacher_cached"] is False
    assert ic["layers_keep"] == i2["layers_keep"] and ic["teacher_accuracy"] == i2["teacher_accuracy"]
    assert ic["layers_trace"] == i2["layers_trace"]
    assert len(teachers) == 3 and torch.equal(teachers[0], teachers[1]) and torch.equal(teachers[1], teachers[2])


def test_paper_mode_never_writes_the_setup_cache(tmp_path, shared_data):
    torch.set_num_threads(1)
    out = tmp_path / "runs"
    _run(out, shared_data, "paper", 8.0)
    assert not (out / ".setup-cache").exists()


def test_cache_key_changes_with_every_input():
    base = {"model": "a", "public": "b", "seed": 0, "lr": 0.1}
    k = _cache.key("teacher", base)
    assert k.startswith("teacher-")
    for name, val in [("model", "x"), ("public", "y"), ("seed", 1), ("lr", 0.2)]:
        assert _cache.key("teacher", {**base, name: val}) != k
    assert _cache.key("layers", base) != k


def test_bench_train_levels_times_each_level_in_its_own_cold_run(tmp_path, make_cfg):
    """``bench_train --end-to-end --levels`` on a tiny model: one row per whole run (dp at both ends),
    the set-up seconds of the levels that have one, and no run sharing another's setup cache."""
    import sys

    from dpflat import privacy as privacy_mod
    from dpflat.config import apply_variant
    from dpflat.flat.distill import Distillation
    from dpflat.flat.layers import LayerSelection

    # importing bench_train wraps these for its timers: put them back for the rest of the session
    saved = (privacy_mod.PrivateSplit.count, LayerSelection.setup, Distillation.setup)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import bench_train

        def tiny(variant, out, eps, threads):
            cfg = apply_variant(make_cfg(Path(out)), variant, "safe")
            return cfg.replace(privacy={"epsilon": eps}, flat={"layers_warmup_steps": 2, "layers_examples": 16,
                                                               "n_drop": 1, "teacher_epochs": 0.5})

        bench_train._cli_default = tiny
        text = bench_train.main(["--end-to-end", "--levels", "--no-append"])
    finally:
        privacy_mod.PrivateSplit.count, LayerSelection.setup, Distillation.setup = saved
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| dp")]
    assert [r[1].strip() for r in rows] == ["dp", "dp+awp", "dp+layers", "dp+distill", "dp"]
    setup = {r[1].strip(): float(r[4]) for r in rows}
    assert setup["dp+layers"] > 0 and setup["dp+distill"] > 0 and setup["dp+awp"] == 0
    assert all(float(r[7]) >= 0 for r in rows)  # peak RSS over the run's start
