"""The sharpness trajectory (``--sharpness-every``): a diagnostic that changes nothing.

Why: it runs inside the training loop of a DP run, so it must (1) never read the private
split (its numbers are released and not accounted), (2) leave the trained model exactly as
it would have been, and (3) work for every kind of run (DP, DP-Flat, non-private).
"""

from __future__ import annotations

import json

import pytest
import torch

from dpflat.config import ConfigError, TrainConfig, apply_variant
from dpflat.flat import build_levels
from dpflat.flat.trajectory import LANCZOS_PRODUCTS, SharpnessTrajectory
from dpflat.runs import RunDir


def load_trajectory(run_dir):
    """The rows a run folder holds, read the one way the library reads them."""
    return RunDir(run_dir).trajectory()
from dpflat.train import train

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")

FLAT_TINY = {"layers_warmup_steps": 2, "layers_examples": 32, "layers_directions": 1, "teacher_epochs": 0.5,
             "n_drop": 1}


def _cfg(make_cfg, out, variant, **train_over):
    cfg = apply_variant(make_cfg(out), variant)
    return cfg.replace(train={"epochs": 1, "eval_every": 0, "checkpoint_every": 2, "sharpness_examples": 16,
                              **train_over}, flat=FLAT_TINY)


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match=r"sharpness_data must be one of public\|eval"):
        TrainConfig(sharpness_data="private")
    with pytest.raises(ConfigError, match="sharpness_every"):
        TrainConfig(sharpness_every=-1)


def test_off_by_default_and_a_step_callback_not_a_level(make_cfg, tmp_path):
    from dpflat.flat import build_callbacks
    from dpflat.flat.base import FlatLevel

    cfg = apply_variant(make_cfg(tmp_path), "dpflat")
    assert build_callbacks(cfg) == []
    on = cfg.replace(train={"sharpness_every": 3})
    (cb,) = build_callbacks(on)
    assert isinstance(cb, SharpnessTrajectory) and not isinstance(cb, FlatLevel)
    assert not any(isinstance(lv, SharpnessTrajectory) for lv in build_levels(on)) and len(build_levels(on)) == 3


@pytest.mark.parametrize("variant", ["dp", "dpflat", "nonprivate"])
def test_every_kind_of_run_records_a_trajectory(make_cfg, tmp_path, variant):
    cfg = _cfg(make_cfg, tmp_path / "runs", variant, sharpness_every=2)
    res = train(cfg)
    rows = load_trajectory(res["run_dir"])
    steps = res["steps"]
    assert [r["step"] for r in rows] == sorted({*range(2, steps + 1, 2), steps})
    for r in rows:
        assert r["diagnostic"] is True and r["data"] == "public" and r["n_examples"] == 16
        assert torch.isfinite(torch.tensor([r["top_eigenvalue"], r["sam_sharpness"], r["loss"]])).all()
        assert r["sam_sharpness"] >= 0 and r["hvp_products"] <= LANCZOS_PRODUCTS + 2
    assert res["info_sharpness_every"] == 2 and res["info_sharpness_seconds_per_point"] > 0


def test_it_changes_nothing_and_reads_no_private_data(make_cfg, tmp_path):
    """Same weights and the same ledger with and without it; the private split is never read by it."""
    # one operator-supplied noise seed for both: by default each run's DP noise is secret and differs
    plain = train(_cfg(make_cfg, tmp_path / "a", "dpflat"), noise_seed=11)
    traced = train(_cfg(make_cfg, tmp_path / "b", "dpflat", sharpness_every=1, sharpness_data="eval"), noise_seed=11)
    assert load_trajectory(traced["run_dir"])[0]["data"] == "eval"
    assert traced["accuracy"] == plain["accuracy"] and traced["epsilon"] == plain["epsilon"]
    from safetensors.torch import load_file

    a = load_file(f"{plain['run_dir']}/model.safetensors")
    b = load_file(f"{traced['run_dir']}/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ledgers = [json.loads(open(f"{r['run_dir']}/ledger.json").read()) for r in (plain, traced)]
    assert ledgers[0]["reads"] == ledgers[1]["reads"], "the trajectory added a read of the private split"


def test_the_level_cannot_reach_the_private_split(make_cfg, tmp_path):
    """Its data comes from ctx.public / ctx.eval only: a ctx whose private split raises still works."""
    from dpflat.flat.base import TrainContext

    class Forbidden:
        def __getattr__(self, name):
            raise AssertionError("the trajectory touched the private split")

    cfg = _cfg(make_cfg, tmp_path, "nonprivate", sharpness_every=1)
    from dpflat.models import build_model, load_tokenizer
    from dpflat.train import prepare_data

    card, _, tokd = prepare_data(cfg, load_tokenizer(cfg.model))
    model = build_model(cfg.model, len(card.labels), seed=0)
    ctx = TrainContext(cfg, model, Forbidden(), tokd["public"], tokd["eval"], Forbidden(), torch.device("cpu"),
                       total_steps=1, steps_per_epoch=1)
    lv = SharpnessTrajectory(cfg.train)
    rd = lv.run_dir(ctx)
    rd.path.mkdir(parents=True)
    lv.setup(ctx)
    lv.step_end(ctx, 0)
    assert len(load_trajectory(rd.path)) == 1 and rd.sharpness_file.is_file()


def test_empty_public_split_is_one_clear_error(make_cfg, tmp_path):
    cfg = _cfg(make_cfg, tmp_path, "dp", sharpness_every=1).replace(data={"public_size": 0})
    with pytest.raises(ConfigError, match="split is empty"):
        train(cfg)


def test_resume_keeps_rows_up_to_the_checkpoint(make_cfg, tmp_path):
    cfg = _cfg(make_cfg, tmp_path / "runs", "dp", sharpness_every=1)
    part = train(cfg, max_steps=3)
    assert not part["finished"]
    full = train(cfg)
    rows = load_trajectory(full["run_dir"])
    assert [r["step"] for r in rows] == list(range(1, full["steps"] + 1))
