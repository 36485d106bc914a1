"""Decoder LLMs as prefix-tuning backbones (dpflat/decoders.py): tiny random Llama, Qwen2 and GPT-2
built in memory, the causal label-word head, exact layer removal, Opacus per-example gradients,
and a DP run end to end."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from dpflat import decoders
from dpflat.config import ConfigError, ModelConfig, PrivacyConfig
from dpflat.engine import make_private
from dpflat.models import build_model, load_tokenizer

DECODERS = ["tiny-llama", "tiny-gpt2", "tiny-qwen2"]
N, L = 24, 9


def _model(backbone, attn="sdpa", m=3, **kw):
    cfg = ModelConfig(backbone=backbone, prefix_len=m, attn=attn, label_words="bad,good", **kw)
    return build_model(cfg, 2, seed=0)


def _batch(B=4, seed=0, pad=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 5000, (B, L), generator=g)
    am = torch.ones(B, L, dtype=torch.long)
    if pad:
        am[1::2, 6:] = 0  # right padding on every other row
    return ids, am


def _reference(model, ids, am):
    """The same prefix through transformers' own path: a cache holding every layer's prefix keys/values,
    positions 0..L-1 and a hand-written 4D mask (prefix visible to all, causal over the real tokens)."""
    from transformers import DynamicCache

    B, n = ids.shape
    m = model.prefix.prefix_len
    cache = DynamicCache(config=model.backbone.config)
    for l, (k, v) in enumerate(model.prefix.split(model.prefix(B))):
        cache.update(k, v, l)
    mask = torch.cat([torch.ones(n, m, dtype=torch.bool), torch.ones(n, n, dtype=torch.bool).tril()], 1)
    mask = mask.expand(B, 1, n, m + n).clone()
    mask[:, :, :, m:] &= am.bool()[:, None, None, :]
    pos = torch.arange(n).unsqueeze(0).expand(B, -1)
    h = model.backbone(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True).last_hidden_state
    return model.head(h[torch.arange(B), am.sum(1) - 1])


@pytest.mark.parametrize("backbone", DECODERS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("pad", [False, True])
def test_prefix_matches_transformers_cache_path(backbone, attn, pad):
    """Causal mask, grouped-query heads (Llama/Qwen2: 4 query heads, 2 key/value heads) and rotary
    positions: our attention function gives what transformers gives the same prefix as a cache.
    Without padding SDPA would take its is_causal shortcut, which hides the prefix: pad=False checks that."""
    model = _model(backbone, attn).eval()
    ids, am = _batch(pad=pad)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=am), _reference(model, ids, am),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backbone", DECODERS)
def test_label_word_head_is_the_lm_next_token_logits(backbone):
    """Without a prefix the classifier is the LM itself: its next-token logits of the label words
    after each row's last real token (right padding)."""
    from transformers import AutoModelForCausalLM

    model = _model(backbone).eval()
    ids, am = _batch()
    torch.manual_seed(0)  # the same random weights as the model's backbone
    conf = decoders.tiny_config(backbone)
    lm = AutoModelForCausalLM.from_config(conf).eval()
    with torch.no_grad():
        with decoders.prefixes_removed(model):
            ours = model(input_ids=ids, attention_mask=am)
        full = lm(input_ids=ids, attention_mask=am).logits
    ref = full[torch.arange(len(ids)), am.sum(1) - 1][:, model.head.word_ids]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    # and the prefix changes them (it is really injected)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids, attention_mask=am), ours)


def test_grouped_query_prefix_is_per_key_value_head():
    model = _model("tiny-llama", m=5)
    assert (model.prefix.n_heads, model.prefix.head_dim, model.prefix.n_layers) == (2, 8, 3)
    assert model.prefix.embedding.weight.shape == (5, 3 * 2 * 2 * 8)
    assert [p.requires_grad for p in model.parameters()].count(True) == 1  # the prefix alone trains


@pytest.mark.parametrize("backbone", ["tiny-llama", "tiny-gpt2"])
def test_dropped_layer_prefix_is_exactly_absent(backbone):
    """keep_layers 0,2: layer 1 has no prefix at all -- changing its slice changes nothing, bit for
    bit, its gradient is exactly zero, and the output is the reference with no layer-1 prefix."""
    model = _model(backbone, keep_layers="0,2").eval()
    ids, am = _batch(seed=1)
    lv = model.prefix.layer_view
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=am)
        lv()[1].add_(torch.randn_like(lv()[1]))
        assert torch.equal(model(input_ids=ids, attention_mask=am), before)
        lv()[0].add_(0.5)
        assert not torch.equal(model(input_ids=ids, attention_mask=am), before)
    model(input_ids=ids, attention_mask=am).sum().backward()
    g = lv(model.prefix.embedding.weight.grad)
    assert torch.count_nonzero(g[1]) == 0 and torch.count_nonzero(g[0]) > 0 and torch.count_nonzero(g[2]) > 0


def _dataset(seed=0):
    ids, am = _batch(N, seed)
    y = torch.randint(0, 2, (N,), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": ids[i], "attention_mask": am[i], "labels": y[i]} for i in range(N)]


@pytest.mark.parametrize("backbone", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_opacus_per_example_grads_match_microbatches_of_one(backbone, mode):
    """Opacus' per-example gradients (hooks) or per-example norms (ghost clipping) of the decoder's
    prefix equal plain autograd on one example at a time."""
    model = _model(backbone, attn="eager")
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loader = torch.utils.data.DataLoader(_dataset(), batch_size=8)
    dp = make_private(model, opt, loader, PrivacyConfig(epsilon=3.0, max_grad_norm=1.0, grad_sample_mode=mode),
                      total_steps=10, n_private=N)
    batch = next(iter(torch.utils.data.DataLoader(_dataset(1), batch_size=6)))
    params = [p for p in model.parameters() if p.requires_grad]
    dp.model.disable_hooks()  # the reference: plain autograd, Opacus' hooks off
    ref = []
    for i in range(6):
        logits = model(input_ids=batch["input_ids"][i:i + 1], attention_mask=batch["attention_mask"][i:i + 1])
        loss = F.cross_entropy(logits, batch["labels"][i:i + 1])
        ref.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    ref = torch.stack(ref)
    dp.model.enable_hooks()
    if mode == "hooks":
        logits = dp.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        F.cross_entropy(logits, batch["labels"]).backward()
        gs = torch.cat([p.grad_sample.flatten(1) for p in params], dim=1)
        torch.testing.assert_close(gs, ref, rtol=1e-4, atol=1e-6)
    else:
        from dpflat.engine import backward_private

        dp.optimizer.noise_multiplier = 0.0
        logits = dp.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        backward_private(dp, F.cross_entropy(logits, batch["labels"], reduction="none"))
        dp.optimizer.pre_step()
        clipped = torch.cat([p.summed_grad.flatten() for p in dp.optimizer.params])
        want = sum(r * min(1.0, 1.0 / (r.norm().item() + 1e-6)) for r in ref)
        torch.testing.assert_close(clipped, want, rtol=1e-4, atol=1e-6)


def test_decoder_prompt_encoding_ends_before_the_next_token(shared_data):
    from dpflat import data as data_mod
    from dpflat import tokens as tokens_mod

    card = data_mod.get_task("sst2")
    tpl, words = decoders.prompt_for(card)
    assert tpl.endswith("\nSentiment:") and words == ["negative", "positive"]
    tok = load_tokenizer(ModelConfig(backbone="tiny-llama"))
    ids = tokens_mod.encode_template(tok, tpl, ["a fine film"], 32)
    assert ids[-1] == tok.convert_tokens_to_ids(":") and tok.mask_token_id not in ids
    with pytest.raises(ConfigError, match="must end with"):
        decoders.prompt_for(card, "*sent_0**mask* indeed.", "bad,good")


def test_decoder_head_choices():
    assert _model("tiny-gpt2").cfg.head == "prompt"  # auto: the label words' next-token logits
    lin = build_model(ModelConfig(backbone="tiny-llama", prefix_len=2, head="linear"), 3)
    assert lin.head.out_features == 3 and lin.causal
    with pytest.raises(ConfigError, match="causal LM"):
        build_model(ModelConfig(backbone="tiny-llama", head="readout"), 2, task="sst2")


def test_prefix_init_from_tokens_is_the_decoders_own_keys():
    """prefix_init tokens: layer l's prefix is what layer l computes for real tokens (after rotary)."""
    model = build_model(ModelConfig(backbone="tiny-llama", prefix_len=4, prefix_init="tokens", label_words="bad,good"), 2)
    rand = _model("tiny-llama", m=4, prefix_init="random")
    assert not torch.allclose(model.prefix.embedding.weight, rand.prefix.embedding.weight)
    k, v = model.prefix.split(model.prefix(1))[0]
    assert k.shape == (1, 2, 4, 8) and v.abs().sum() > 0


@pytest.mark.parametrize("backbone", ["tiny-llama", "tiny-gpt2"])
def test_dp_run_on_a_tiny_decoder(make_cfg, tmp_path, backbone):
    """dpflat.train.train end to end on a tiny decoder: DP-accounted, the prompt's zero-shot
    accuracy on val reported beside the run (the floor), the prefix trained."""
    from dpflat.train import train

    cfg = make_cfg(tmp_path / "runs", model={"backbone": backbone, "prefix_len": 4})
    row = train(cfg, noise_seed=0)
    assert row["finished"] and row["guarantee"].startswith("(")
    res = json.loads((tmp_path / "runs" / row["run_id"] / "result.json").read_text())
    assert 0.0 <= res["info"]["zero_shot_val_accuracy"] <= 1.0
    assert "info_zero_shot_val_accuracy" in row
    if backbone == "tiny-llama":  # the landscape tools on a decoder's prefix (Hessian top-k, surface)
        from dpflat import analysis

        s = analysis.analyze_run(row["run_dir"], top_k=2, grid=3, n_examples=32, density=False, progress=False)
        trainable = [p for p in analysis.load_run(row["run_dir"]).model.parameters() if p.requires_grad]
        assert len(s["eigenvalues"]) == 2 and s["n_params"] == sum(p.numel() for p in trainable)


def test_dpflat_levels_on_a_tiny_decoder(make_cfg, tmp_path):
    """The three flattening levels (safe mode) act on a decoder's prefix as on an encoder's."""
    from dpflat.config import apply_variant
    from dpflat.train import train

    cfg = apply_variant(make_cfg(tmp_path / "runs", model={"backbone": "tiny-llama", "prefix_len": 4}), "dpflat",
                        mode="safe").replace(flat={"n_drop": 1, "teacher_epochs": 1})
    row = train(cfg, noise_seed=0)
    assert row["finished"] and len(row["keep_layers"].split(",")) == 2
