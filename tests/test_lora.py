"""LoRA as a second trainable family (--peft lora, dpflat/lora.py) on tiny encoders and decoders:
the start is the pretrained model, adapters of a dropped layer are exactly absent, Opacus'
per-example gradients match microbatches of one, a DP run finishes, and what is not built is refused."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from dpflat import decoders
from dpflat.config import ConfigError, ModelConfig, PrivacyConfig, RunConfig
from dpflat.engine import make_private
from dpflat.models import build_model

BACKBONES = ["tiny-bert", "tiny-llama", "tiny-gpt2"]
N, L = 24, 9


def _model(backbone, **kw):
    extra = {} if backbone in ("tiny-bert",) else {"label_words": "bad,good"}
    return build_model(ModelConfig(backbone=backbone, peft="lora", lora_rank=2, prefix_len=2, attn="eager",
                                   **extra, **kw), 2, seed=0)


def _batch(B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 5000, (B, L), generator=g)
    am = torch.ones(B, L, dtype=torch.long)
    am[1::2, 6:] = 0
    return ids, am


def _perturb_adapters(model):
    """Give every adapter a non-zero B (it starts at zero) so that it acts."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_adapters_only_train_and_start_as_the_pretrained_model(backbone):
    model = _model(backbone).eval()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or n.startswith("head.") for n in names)
    assert not model.prefix.embedding.weight.requires_grad
    assert sum("lora_A" in n for n in names) == 3 * (1 if backbone == "tiny-gpt2" else 2)  # per layer: q,v / c_attn
    ids, am = _batch()
    with torch.no_grad():
        start = model(input_ids=ids, attention_mask=am)
        with decoders.prefixes_removed(model):  # every adapter off: the backbone alone
            off = model(input_ids=ids, attention_mask=am)
        torch.testing.assert_close(start, off)  # B = 0: the adapters add exactly nothing at the start
        _perturb_adapters(model)
        assert not torch.allclose(model(input_ids=ids, attention_mask=am), off)


@pytest.mark.parametrize("backbone", ["tiny-bert", "tiny-llama"])
def test_keep_layers_puts_adapters_on_those_layers_only(backbone):
    model = _model(backbone, keep_layers="0,2")
    assert [len(m) for m in model.adapters] == [2, 0, 2]
    assert not any(".1." in n and "lora_" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("backbone", ["tiny-bert", "tiny-llama"])
def test_switched_off_layer_adapter_is_exactly_absent(backbone):
    """The keep-mask switches adapters: layer 1 off -> its adapter is not computed (changing it
    changes nothing, bit for bit) and it gets no gradient."""
    model = _model(backbone).eval()
    _perturb_adapters(model)
    ids, am = _batch(seed=2)
    model.prefix.set_keep([True, False, True])
    lay1 = [p for m in model.adapters[1] for p in m.lora_B.parameters()]
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=am)
        for p in lay1:
            p.add_(1.0)
        assert torch.equal(model(input_ids=ids, attention_mask=am), before)
    model(input_ids=ids, attention_mask=am).sum().backward()
    assert all(p.grad is None for p in lay1)
    assert all(p.grad is not None for m in model.adapters[0] for p in m.lora_B.parameters())


def _dataset(seed=0):
    ids, am = _batch(N, seed)
    y = torch.randint(0, 2, (N,), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": ids[i], "attention_mask": am[i], "labels": y[i]} for i in range(N)]


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_opacus_per_example_grads_of_adapters_match_microbatches_of_one(backbone, mode):
    """hooks: each example's gradient; ghost (clipping from per-example norms): the clipped sum."""
    model = _model(backbone)
    _perturb_adapters(model)  # B = 0 would make A's gradients vanish
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    loader = torch.utils.data.DataLoader(_dataset(), batch_size=8)
    dp = make_private(model, opt, loader, PrivacyConfig(epsilon=3.0, max_grad_norm=1.0, grad_sample_mode=mode),
                      total_steps=10, n_private=N)
    batch = next(iter(torch.utils.data.DataLoader(_dataset(1), batch_size=5)))
    dp.model.disable_hooks()
    ref = []
    for i in range(5):
        logits = model(input_ids=batch["input_ids"][i:i + 1], attention_mask=batch["attention_mask"][i:i + 1])
        loss = F.cross_entropy(logits, batch["labels"][i:i + 1])
        ref.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    dp.model.enable_hooks()
    logits = dp.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    if mode == "hooks":
        F.cross_entropy(logits, batch["labels"]).backward()
        gs = torch.cat([p.grad_sample.flatten(1) for p in params], dim=1)
        torch.testing.assert_close(gs, torch.stack(ref), rtol=1e-4, atol=1e-6)
        return
    from dpflat.engine import backward_private

    dp.optimizer.noise_multiplier = 0.0
    backward_private(dp, F.cross_entropy(logits, batch["labels"], reduction="none"))
    dp.optimizer.pre_step()
    clipped = torch.cat([p.summed_grad.flatten() for p in dp.optimizer.params])
    torch.testing.assert_close(clipped, sum(r * min(1.0, 1.0 / (r.norm().item() + 1e-6)) for r in ref),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backbone", ["tiny-llama", "tiny-bert"])
def test_dp_lora_run_end_to_end(make_cfg, tmp_path, backbone):
    from dpflat.runs import run_id
    from dpflat.train import train

    cfg = make_cfg(tmp_path / "runs", model={"backbone": backbone, "peft": "lora", "lora_rank": 2})
    row = train(cfg, noise_seed=0)
    assert row["finished"] and row["guarantee"].startswith("(")
    res = json.loads((tmp_path / "runs" / row["run_id"] / "result.json").read_text())
    assert 0.0 <= res["info"]["val_accuracy_adapters_off"] <= 1.0
    assert "val_accuracy_prefix_reset" not in res["info"]
    if backbone == "tiny-llama":  # a decoder's floor: the prompt with no adapter
        assert res["info"]["zero_shot_val_accuracy"] == res["info"]["val_accuracy_adapters_off"]
    assert run_id(cfg) != run_id(cfg.replace(model={"peft": "prefix"}))
    if backbone == "tiny-llama":  # the landscape tools over the trainable adapters (+ nothing else)
        from dpflat import analysis

        s = analysis.analyze_run(row["run_dir"], top_k=2, grid=3, n_examples=32, density=False, progress=False)
        trainable = [p for p in analysis.load_run(row["run_dir"]).model.parameters() if p.requires_grad]
        assert len(s["eigenvalues"]) == 2 and s["n_params"] == sum(p.numel() for p in trainable)


def test_lora_fields_leave_existing_run_ids_alone():
    """Fields added for LoRA count in a run's identity only when set: prefix runs keep their ids."""
    from dpflat.config import identity_dict

    d = identity_dict(RunConfig().to_dict())
    assert not {"peft", "lora_rank", "lora_alpha"} & set(d["model"])
    d = identity_dict(RunConfig().replace(model={"peft": "lora", "lora_rank": 4}).to_dict())
    assert d["model"]["peft"] == "lora" and d["model"]["lora_rank"] == 4 and "lora_alpha" not in d["model"]


def test_black_box_variants_are_refused_with_lora(make_cfg, tmp_path):
    from dpflat.config import apply_variant
    from dpflat.sweep import trainer

    cfg = apply_variant(make_cfg(tmp_path / "runs", model={"backbone": "tiny-bert", "peft": "lora"}), "bb-dp")
    with pytest.raises(ConfigError, match="--peft lora trains adapters by gradients"):
        trainer(cfg)(cfg)


# --------------------------------------------------------------------------- AWP on the adapters
def _awp_ctx(model, gamma=0.1):
    from dpflat.config import FlatConfig
    from dpflat.flat.awp_lora import LoraAWP
    from dpflat.flat.base import TrainContext

    cfg = RunConfig().replace(model={"backbone": "tiny-llama", "peft": "lora"}, flat={"awp": True, "awp_gamma": gamma})
    ctx = TrainContext(cfg, model, None, None, None, None, torch.device("cpu"), total_steps=10, steps_per_epoch=10)
    return LoraAWP(FlatConfig(awp=True, awp_gamma=gamma)), ctx


def test_lora_awp_perturbs_each_layer_by_gamma_of_its_adapter_norm_and_restores_exactly():
    from dpflat.flat import build_levels
    from dpflat.flat.awp_lora import LoraAWP, adapter_groups

    assert [type(lv) for lv in build_levels(RunConfig().replace(model={"peft": "lora"}, flat={"awp": True}))] == [LoraAWP]
    model = _model("tiny-llama")
    _perturb_adapters(model)
    awp, ctx = _awp_ctx(model, gamma=0.1)
    groups = adapter_groups(model)
    before = [[p.detach().clone() for p in g] for g in groups]
    g = torch.Generator().manual_seed(3)
    awp.direction = [[torch.randn(p.shape, generator=g) for p in grp] for grp in groups]
    awp.step_begin(ctx, 0, {"labels": torch.zeros(2)})
    awp.perturb(ctx)
    for grp, old in zip(groups, before):
        moved = torch.sqrt(sum(((p - o) ** 2).sum() for p, o in zip(grp, old)))
        norm = torch.sqrt(sum((o ** 2).sum() for o in old))
        torch.testing.assert_close(moved, 0.1 * norm, rtol=1e-4, atol=1e-7)
    awp.restore(ctx)
    assert all(torch.equal(p, o) for grp, old in zip(groups, before) for p, o in zip(grp, old))
    awp.step_begin(ctx, 5, {"labels": torch.zeros(2)})  # after awp_epochs (0.5 of 10 steps): off
    assert awp._v is None


def test_dp_awp_run_on_lora_adapters(make_cfg, tmp_path):
    from dpflat.train import train

    cfg = make_cfg(tmp_path / "runs", model={"backbone": "tiny-llama", "peft": "lora", "lora_rank": 2},
                   flat={"awp": True, "awp_epochs": 1.0}, variant="dp+awp")
    row = train(cfg, noise_seed=0)
    assert row["finished"] and row["guarantee"].startswith("(") and row["info_awp_mode"] == "safe"


def test_dp_layer_selection_chooses_the_layers_that_keep_adapters(make_cfg, tmp_path):
    """Cross-layer flattening under LoRA (safe mode: public split): the indicator moves the adapter
    weights, the dropped layer's adapters are switched off and frozen, and stay at their start (B = 0),
    also across a resume (Opacus is given the kept adapters only)."""
    from dpflat import analysis
    from dpflat.train import train

    cfg = make_cfg(tmp_path / "runs", model={"backbone": "tiny-llama", "peft": "lora", "lora_rank": 2},
                   flat={"layers": True, "n_drop": 1, "layers_scorer": "warmup", "layers_warmup_steps": 4,
                         "layers_examples": 32}, variant="dp+layers")
    first = train(cfg, noise_seed=0, max_steps=2)  # stopped, then resumed: the saved mask decides what trains
    assert not first.get("finished")
    row = train(cfg, noise_seed=0)
    assert row["finished"] and row["guarantee"].startswith("(")
    kept = [int(i) for i in row["keep_layers"].split(",")]
    assert len(kept) == 2
    model = analysis.load_run(row["run_dir"]).model
    dropped = ({0, 1, 2} - set(kept)).pop()
    ids, am = _batch()
    model(input_ids=ids, attention_mask=am)  # the keep-mask switches the adapters in each forward
    for m in model.adapters[dropped]:
        assert m.disable_adapters and not any(p.requires_grad for p in m.lora_B.parameters())
        assert all(torch.count_nonzero(p) == 0 for p in m.lora_B.parameters())
    assert any(torch.count_nonzero(p) > 0 for m in model.adapters[kept[0]] for p in m.lora_B.parameters())


# --------------------------------------------------------------------------- distillation toward a teacher's adapters
def test_lora_distillation_pulls_the_kept_adapters_toward_the_teacher_by_lr_lambda():
    from dpflat.config import FlatConfig
    from dpflat.flat.distill_lora import LoraDistillation, _kept

    model = _model("tiny-llama", keep_layers="0,2")
    teacher = _model("tiny-llama", keep_layers="0,2")
    _perturb_adapters(teacher)
    lv = LoraDistillation(FlatConfig(distill=True, distill_lambda=0.5), lr=0.1)
    lv.teacher = lv.take(teacher)
    assert set(lv.teacher) == set(_kept(model)) and all(".1." not in n for n in lv.teacher)
    dist = lambda: float(torch.sqrt(sum(((p.detach() - lv.teacher[n]) ** 2).sum()  # noqa: E731
                                        for n, p in _kept(model).items())))
    d0 = dist()
    assert lv.pull(model) == pytest.approx(d0)
    assert dist() == pytest.approx(d0 - 0.05, rel=1e-5)  # moved lr * lambda along the straight line
    lv.lr = 1e6
    lv.pull(model)
    assert dist() == pytest.approx(0.0, abs=1e-6)  # never crosses the teacher


def test_dpflat_on_lora_runs_all_three_levels(make_cfg, tmp_path):
    """The dpflat variant (safe: public split only) with --peft lora: layer selection, a teacher's
    adapters, AWP; DP-accounted, and the teacher's fit is reported."""
    from dpflat.config import apply_variant
    from dpflat.train import train

    cfg = apply_variant(make_cfg(tmp_path / "runs", model={"backbone": "tiny-llama", "peft": "lora", "lora_rank": 2}),
                        "dpflat", "safe").replace(flat={"n_drop": 1, "teacher_epochs": 1, "layers_scorer": "warmup",
                                                        "layers_warmup_steps": 4, "layers_examples": 32})
    row = train(cfg, noise_seed=0)
    assert row["finished"] and row["guarantee"].startswith("(")
    assert len(row["keep_layers"].split(",")) == 2 and row["info_teacher_data"] == "public split"
    assert 0.0 <= row["info_teacher_val_accuracy"] <= 1.0
    assert row["info_distill_teacher_adapters"] == 2 * 2 * 2  # 2 kept layers x (q, v) x (A, B)
