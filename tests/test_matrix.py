"""Every variant on every tiny backbone, in each mode: the level it switches on acts, the others do not.

PEFT's habit (a tiny-model x method matrix): a flattening level that silently does nothing under
one combination (a keep-mask that never reaches the model, a perturbation with no direction, a
distillation term that is always zero) trains without an error, so only a test that looks for the
level's effect catches it. Each cell is one short run (4 logical steps) on tiny BERT or tiny RoBERTa;
spies on the levels' hooks record what each did, and the run's guarantee label is checked.
"""

from __future__ import annotations

import pytest
import torch

from dpflat.config import MODES, NO_MODE_VARIANTS, apply_variant
from dpflat.flat.awp import AWP
from dpflat.flat.distill import Distillation
from dpflat.privacy import DP, NOT_DP_NONPRIVATE, NOT_DP_PAPER
from dpflat.runs import RunDir
from dpflat.sweep import trainer
from tests.conftest import tiny_run_config

BACKBONES = ("tiny-bert", "tiny-roberta")
VARIANTS = ("nonprivate", "dp", "dp+awp", "dp+layers", "dp+distill", "dpflat", "bb-dp")
CELLS = [(v, m) for v in VARIANTS for m in (("safe",) if v in NO_MODE_VARIANTS else MODES)]
N_LAYERS = 3  # tiny_config's encoders
FLAT = {"awp_epochs": 1.0,  # AWP on every step (safe mode has a direction from the second step on)
        "n_drop": 1, "layers_examples": 16, "teacher_epochs": 0.5, "teacher_batch_size": 32}


@pytest.fixture
def spies(monkeypatch):
    """Record what the levels did: how far each AWP perturbation moved the prefix, and every
    distillation term's size."""
    seen = {"awp": [], "distill": []}
    perturb, extra = AWP.perturb, Distillation.extra_loss

    def spy_perturb(self, ctx):
        before = ctx.model.prefix.embedding.weight.detach().clone()
        perturb(self, ctx)
        seen["awp"].append(float((ctx.model.prefix.embedding.weight.detach() - before).norm()))

    def spy_extra(self, ctx, prefix_out):
        out = extra(self, ctx, prefix_out)
        seen["distill"].append(None if out is None else float(out.detach().abs().sum()))
        return out

    monkeypatch.setattr(AWP, "perturb", spy_perturb)
    monkeypatch.setattr(Distillation, "extra_loss", spy_extra)
    return seen


@pytest.mark.parametrize("variant,mode", CELLS, ids=[f"{v}-{m}" for v, m in CELLS])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_each_level_acts_where_it_is_on_and_nowhere_else(backbone, variant, mode, tmp_path, shared_data, spies):
    base = tiny_run_config(tmp_path / "runs", shared_data).replace(model={"backbone": backbone},
                                                                   train={"epochs": 1.0})
    cfg = apply_variant(base, variant, mode).replace(flat=FLAT)
    if cfg.blackbox.active:
        cfg = cfg.replace(blackbox={"prompt_tokens": 4, "prompt_dim": 16})
    res = trainer(cfg)(cfg, noise_seed=5)
    assert res["steps"] == 4

    # the guarantee says what ran
    if not cfg.privacy.enabled:
        assert res["guarantee"] == NOT_DP_NONPRIVATE and res["epsilon"] is None
    elif cfg.flat.paper_levels:
        assert res["guarantee"] == NOT_DP_PAPER and res["epsilon"] is None
    else:
        assert res["guarantee"] == DP and 0 < res["epsilon"] <= cfg.privacy.epsilon

    state = RunDir(res["run_dir"]).load_model_state()
    if cfg.blackbox.active:  # the zeroth-order steps moved the prompt (it starts at zero)
        assert float(state["z"].norm()) > 0 and not spies["awp"] and not spies["distill"]
        return

    # within-layer: the prefix was moved before the forward of the perturbed steps, and put back
    moved = [d for d in spies["awp"] if d > 0]
    if cfg.flat.awp:
        # paper: every step has its ascent direction; safe: every step but the first (no noisy gradient yet)
        assert len(moved) >= (4 if mode == "paper" else 3), spies["awp"]
    else:
        assert not spies["awp"]

    # cross-layer: n_drop layers lost their prefix, in the released model too
    keep = state["prefix.keep_mask"].bool()
    kept = [int(i) for i in res["keep_layers"].split(",")] if res["keep_layers"] else []
    assert kept == torch.nonzero(keep).flatten().tolist()
    assert len(kept) == (N_LAYERS - FLAT["n_drop"] if cfg.flat.layers else N_LAYERS)

    # cross-model: the distillation term was added to the examples' losses, and was not zero
    if cfg.flat.distill:
        assert spies["distill"] and all(x is not None and x > 0 for x in spies["distill"]), spies["distill"]
        assert res.get("info_teacher_steps", 0) >= 1
    else:
        assert not spies["distill"]
