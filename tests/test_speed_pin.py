"""Speed work must not change what is computed.

``PINNED`` holds the per-step training losses and final test loss of fixed tiny-model
runs. First recorded with commit 19bbc60 (before the speed issue's later changes and
before distributed training); re-recorded when the DP mechanism's randomness moved
from the public global RNG to secret generators (issue 14), after showing that with the
old randomness source substituted back the loop reproduced the old pins exactly, and
when the splits became content-disjoint private / public / val / test (issue 17: the
private rows and the selection split changed), and on 2026-12-07 (issue 27) when each logical
batch became cut into physical batches grouped by length (other dropout draws; with
``--group-by-length off`` the old runs come out to 1e-7, ``ARRIVAL_ORDER_EVAL_LOSS``) and the
logged loss became the logical batch's mean (it was the last physical batch's); the dpflat pin
again the same day, when the teacher and the layer scorer became fits to their val plateau
with dropout off. The runs pin the mechanism with
``--noise-seed`` (``NOISE_SEED``): by default it is secret. Any later change that alters the numbers (a different batch
order, a skipped pass, a changed clip, a reordered RNG draw) fails here; a deliberate
change of the method must regenerate them, and say so in its commit:

    python tests/test_speed_pin.py        # prints the current values as JSON

The tolerance is floating-point noise only: the safe-AWP run differs from the plain
DP run by ~1e-5 relative, so 5e-6 still tells them apart.

Also here: the exact speed-ups are exact (padding-column trim; evaluation under
``inference_mode`` in eval mode).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import dpflat.evaluate as ev_mod
from dpflat.evaluate import MODEL_KEYS, evaluate
from dpflat.models import build_model
from dpflat.train import LOSS_KEY, prepare_data, train

RTOL, ATOL = 5e-6, 1e-7
NOISE_SEED = 20261203  # operator-supplied: pins the Poisson batches and the noise

VARIANTS = {
    "dp": {},
    "dp-awp": {"flat": {"awp": True, "awp_epochs": 2.0}},
    "dpflat": {"flat": {"awp": True, "awp_epochs": 2.0, "layers": True, "distill": True}},
    "nonprivate": {"privacy": {"enabled": False}},
}

PINNED = {
    "dp": {"losses": [0.607011485744167, 0.7914658908186287, 1.7622218973496382, 1.4250478329865828, 0.9186451775687081, 1.15346883905345, 0.7449792058844316, 0.7994318497486603],
           "eval_loss": 1.4590446949005127},
    "dp-awp": {"losses": [0.607011485744167, 0.7914640492406385, 1.76221404356115, 1.425042193868886, 0.9186538696289063, 1.1535008035857102, 0.7449858314112613, 0.7994327056102264],
           "eval_loss": 1.4590643644332886},
    "dpflat": {"losses": [0.6069652325398213, 0.7998945959683122, 1.7731381023631376, 1.438661119212275, 0.9359382356916155, 1.1732607381097202, 0.7680744497399581, 0.8252258056249374],
           "eval_loss": 1.4561388492584229},
    "nonprivate": {"losses": [0.7206530272960663, 0.9640126153826714, 0.6848939806222916, 0.6133798509836197, 0.8459772765636444, 0.5985742658376694, 0.7330787032842636, 0.6316515803337097],
           "eval_loss": 1.0821114778518677},
}


#: ``--group-by-length off`` (Opacus' arrival-order cut): the test losses of the runs pinned before
#: 2026-12-07, when the per-step loss row was the last physical batch's and batches were cut in
#: arrival order. The arrival-order path still computes exactly these runs.
ARRIVAL_ORDER_EVAL_LOSS = {"dp": 1.4318410158157349, "dp-awp": 1.4318562746047974, "nonprivate": 0.8489528894424438}


def run(cfg) -> dict:
    losses: list[float] = []
    res = train(cfg, on_step=lambda r: losses.append(r[LOSS_KEY]), noise_seed=NOISE_SEED)
    return {"losses": losses, "eval_loss": res["eval_loss"]}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_losses_are_pinned(name, tmp_path, make_cfg):
    got = run(make_cfg(tmp_path, **VARIANTS[name]))
    want = PINNED[name]
    assert len(got["losses"]) == len(want["losses"])
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want["losses"]), rtol=RTOL, atol=ATOL)
    assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=RTOL, abs=ATOL)


@pytest.mark.parametrize("name", ["dp", "nonprivate"])
def test_the_arrival_order_cut_still_trains_the_old_runs(name, tmp_path, make_cfg):
    over = json.loads(json.dumps(VARIANTS[name]))
    over.setdefault("train", {})["group_by_length"] = "off"
    got = run(make_cfg(tmp_path, **over))
    assert got["eval_loss"] == pytest.approx(ARRIVAL_ORDER_EVAL_LOSS[name], rel=1e-6)


def test_pins_tell_awp_from_plain_dp():
    """The tolerance is tight enough to see γ=0.01 safe AWP (else the pins could not fail)."""
    a, b = torch.tensor(PINNED["dp"]["losses"]), torch.tensor(PINNED["dp-awp"]["losses"])
    assert not torch.allclose(a, b, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["dp", "dp-awp"])
def test_ghost_clipping_trains_the_same_run_as_hooks(name, tmp_path, make_cfg):
    """Ghost clipping computes each example's gradient norm without the gradient; the clipped,
    noised update (same Poisson batches, same noise draws) and so the run must be the same."""
    over = VARIANTS[name]
    hooks = run(make_cfg(tmp_path / "hooks", **over))
    ghost_cfg = make_cfg(tmp_path / "ghost", **over).replace(privacy={"grad_sample_mode": "ghost"})
    ghost = run(ghost_cfg)
    torch.testing.assert_close(torch.tensor(ghost["losses"]), torch.tensor(hooks["losses"]), rtol=1e-4, atol=1e-6)
    assert ghost["eval_loss"] == pytest.approx(hooks["eval_loss"], rel=1e-4)


def test_bf16_autocast_runs_under_opacus_and_stays_close(tmp_path, make_cfg):
    """precision=bf16 (the GPU default) trains under Opacus' hooks, is recorded with the run,
    differs from fp32 (the autocast is live) but only by bf16 rounding."""
    fp32 = run(make_cfg(tmp_path / "fp32", **VARIANTS["dp-awp"]))
    cfg = make_cfg(tmp_path / "bf16", **VARIANTS["dp-awp"]).replace(train={"precision": "bf16"})
    losses: list[float] = []
    res = train(cfg, on_step=lambda r: losses.append(r[LOSS_KEY]), noise_seed=NOISE_SEED)
    assert res["info_precision"] == "bf16" and res["guarantee"] == "(ε, δ)-DP"
    a, b = torch.tensor(losses), torch.tensor(fp32["losses"])
    assert not torch.equal(a, b)
    torch.testing.assert_close(a, b, rtol=0.05, atol=0.02)


def test_precision_auto_is_fp32_on_cpu_and_keeps_run_ids(make_cfg, tmp_path):
    from dpflat.runs import run_id

    cfg = make_cfg(tmp_path)
    assert cfg.train.precision == "auto" and cfg.train.resolved_precision() == "fp32"
    assert run_id(cfg) != run_id(cfg.replace(train={"precision": "bf16"}))
    assert run_id(cfg) == run_id(cfg.replace(train={"precision": "auto", "device": "cuda"}))


def _untrimmed(batch, device):
    return {k: batch[k].to(device) for k in MODEL_KEYS if k in batch}


def test_padding_trim_is_exact(tmp_path, make_cfg, monkeypatch):
    """The all-padding column trim changes the cost, not the losses (up to summation order)."""
    cfg = make_cfg(tmp_path / "a", **VARIANTS["dp-awp"])
    trimmed = run(cfg)
    import dpflat.flat.awp as awp_mod
    import dpflat.flat.layers as layers_mod
    import dpflat.train as train_mod

    for mod in (ev_mod, train_mod, awp_mod, layers_mod):
        if hasattr(mod, "model_inputs"):
            monkeypatch.setattr(mod, "model_inputs", _untrimmed)
    full = run(make_cfg(tmp_path / "b", **VARIANTS["dp-awp"]))
    torch.testing.assert_close(torch.tensor(full["losses"]), torch.tensor(trimmed["losses"]), rtol=1e-5, atol=1e-6)
    assert full["eval_loss"] == pytest.approx(trimmed["eval_loss"], rel=1e-5)


def test_fast_evaluation_equals_a_plain_forward(tmp_path, make_cfg):
    """evaluate() (inference_mode, trimmed, big batches) = eval-mode forward with autograd, per batch of 7."""
    cfg = make_cfg(tmp_path)
    card, _, tokd = prepare_data(cfg)
    model = build_model(cfg.model, len(card.labels), seed=0)
    fast = evaluate(model, tokd["eval"], batch_size=256)
    model.eval()
    losses = []
    for b in torch.utils.data.DataLoader(tokd["eval"], batch_size=7):
        logits = model(**_untrimmed(b, "cpu"))
        losses.append(torch.nn.functional.cross_entropy(logits, b["labels"], reduction="none").detach())
    assert fast["loss"] == pytest.approx(float(torch.cat(losses).mean()), rel=1e-5)
    assert fast["n"] == len(tokd["eval"])


if __name__ == "__main__":  # regenerate PINNED (see the module docstring)
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import SHARED_DATA, tiny_run_config

    torch.set_num_threads(1)
    out = {}
    for name, over in VARIANTS.items():
        with tempfile.TemporaryDirectory() as d:
            out[name] = run(tiny_run_config(Path(d), SHARED_DATA, **over))
    print(json.dumps(out, indent=1))
