"""The trainable part on a frozen backbone: per-layer key/value prefixes + a head, and ``build_model``.

The backbone (loading, tokenizer, the prefix-aware attention kernels, layer-count checks) is
``backbone.py``; the heads (label words, readout) ``heads.py``. Every name they define is also
importable from here, as before the split.

Why the prefix is an ``nn.Embedding`` looked up with per-example indices (as in
P-tuning v2): Opacus computes per-example gradients of an Embedding natively and
cheaply, so the prefix needs no custom grad sampler.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import decoders, lora
from .backbone import (MINILM, TINY, ModelError, _attn_name, _self_attention_modules, check_layers, load_backbone,
                       load_mlm_backbone, load_tokenizer, minilm_path, register_attention, resolve_backbone,
                       tiny_config)
from .config import ConfigError, ModelConfig
from .heads import LabelWordHead, ReadoutHead, label_prototypes, resolve_head


# --------------------------------------------------------------------------- prefix + head
class PrefixEncoder(nn.Module):
    """Per-layer key/value prefixes P in R^{m x (L*2*H)} with a per-layer keep-mask."""

    def __init__(self, n_layers: int, n_heads: int, head_dim: int, prefix_len: int):
        super().__init__()
        self.n_layers, self.n_heads, self.head_dim, self.prefix_len = n_layers, n_heads, head_dim, prefix_len
        self.embedding = nn.Embedding(prefix_len, n_layers * 2 * n_heads * head_dim)
        nn.init.normal_(self.embedding.weight, std=0.02)
        self.register_buffer("prefix_tokens", torch.arange(prefix_len), persistent=False)
        self.register_buffer("keep_mask", torch.ones(n_layers, dtype=torch.bool))

    @property
    def hidden(self) -> int:
        return self.n_heads * self.head_dim

    def forward(self, batch_size: int) -> torch.Tensor:
        """(B, m, L*2*H): one copy per example so Opacus sees per-example activations."""
        # contiguous: Opacus' ghost-clipping norm sampler for embeddings views the indices flat
        idx = self.prefix_tokens.unsqueeze(0).expand(batch_size, -1).contiguous()
        return self.embedding(idx)

    def split(self, flat: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per-layer (key, value) of shape (B, heads, m, head_dim); None for dropped layers."""
        B, m = flat.shape[:2]
        x = flat.view(B, m, self.n_layers, 2, self.n_heads, self.head_dim).permute(2, 3, 0, 4, 1, 5)
        keep = self.keep_mask.tolist()
        # unbind, not x[l, 0]: each indexing's backward allocates and zero-fills a gradient of the
        # whole prefix (2L of them per batch: 15% of a DP step on the CPU); unbind's backward is one stack
        kv = [layer.unbind(0) for layer in x.unbind(0)]
        return [(kv[l][0], kv[l][1]) if keep[l] else None for l in range(self.n_layers)]

    def layer_view(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The prefix weight as (L, m, 2*H): one slice per layer (AWP and sharpness use it)."""
        w = self.embedding.weight if weight is None else weight
        return w.view(self.prefix_len, self.n_layers, 2 * self.hidden).transpose(0, 1)

    def set_keep(self, keep: list[bool] | torch.Tensor) -> None:
        k = torch.as_tensor(keep, dtype=torch.bool, device=self.keep_mask.device)
        if k.shape != self.keep_mask.shape:
            raise ConfigError(f"keep-mask needs {self.n_layers} entries, got {tuple(k.shape)}")
        self.keep_mask.copy_(k)


class PrefixModel(nn.Module):
    """Frozen encoder + trainable prefix + classification head; forward returns logits."""

    def __init__(self, backbone: nn.Module, num_labels: int, cfg: ModelConfig,
                 prompt_head: LabelWordHead | None = None, mask_token_id: int | None = None,
                 readout: ReadoutHead | None = None):
        super().__init__()
        conf = backbone.config
        self.cfg = cfg
        self.backbone = backbone
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        #: a decoder (causal LM): prefixes per key/value head, the head reads the last real token
        self.causal = decoders.is_causal_lm(backbone)
        if self.causal:
            self._attn, heads, head_dim = decoders.attention_layers(backbone)
        else:
            self._attn = _self_attention_modules(backbone)
            heads = conf.num_attention_heads
            head_dim = conf.hidden_size // heads
        n_layers = len(self._attn)
        self.prefix = PrefixEncoder(n_layers, heads, head_dim, cfg.prefix_len)
        self.dropout = nn.Dropout(cfg.head_dropout)
        if cfg.head == "prompt":
            if prompt_head is None or (mask_token_id is None and not self.causal):
                raise ConfigError("head prompt needs the MLM label-word head and the mask token id (use build_model)")
            if len(prompt_head.word_ids) != num_labels:
                raise ConfigError(f"{len(prompt_head.word_ids)} label words for {num_labels} classes")
            self.head = prompt_head  # frozen: only the prefix trains
            self.mask_token_id = None if mask_token_id is None else int(mask_token_id)
        elif cfg.head == "readout":
            if readout is None or readout.prototypes.shape[0] != num_labels:
                raise ConfigError(f"head readout needs one label description per class ({num_labels}; use build_model)")
            self.head = readout
        else:
            self.head = nn.Linear(conf.hidden_size, num_labels)
        self.num_labels = num_labels
        keep = cfg.keep_layer_ids()
        if keep is not None:
            bad = [i for i in keep if i >= n_layers]
            if bad:
                raise ConfigError(f"keep_layers {bad} out of range: the backbone has {n_layers} layers")
            self.prefix.set_keep([i in keep for i in range(n_layers)])
        #: --peft lora: each layer's adapters (dpflat/lora.py); the prefix is then frozen and unused, and
        #: its keep-mask switches the adapters instead
        self.adapters = None
        if cfg.peft == "lora":
            for p in self.prefix.parameters():
                p.requires_grad_(False)
            self.adapters = lora.inject(backbone, self._attn, cfg, self.prefix.keep_mask.tolist())

    @property
    def n_layers(self) -> int:
        return self.prefix.n_layers

    def train(self, mode: bool = True) -> "PrefixModel":
        """Training mode; without ``backbone_dropout`` the frozen backbone stays in evaluation mode
        (its dropout off: SDPA then takes its fused kernel, and no example's draw depends on the others')."""
        super().train(mode)
        if mode and not self.cfg.backbone_dropout:
            self.backbone.eval()
            if getattr(self, "adapters", None) is not None:
                lora.train_mode(self.adapters)  # Opacus records activations of modules in training mode only
        return self

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Prefix + head + keep-mask: everything a checkpoint needs (the backbone is frozen)."""
        sd = {n: p.detach().clone() for n, p in self.trainable_named_parameters()}
        sd["prefix.keep_mask"] = self.prefix.keep_mask.clone()
        return sd

    def load_trainable_state(self, sd: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        with torch.no_grad():
            for n, t in sd.items():
                if n == "prefix.keep_mask":
                    self.prefix.keep_mask.copy_(t.to(torch.bool))
                else:
                    params[n].copy_(t)
        lora.train_kept(self)  # --peft lora: the adapters of layers the mask drops are frozen

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        return_prefix: bool = False,
        **_: Any,
    ):
        B, L = input_ids.shape
        if self.adapters is None:
            flat = self.prefix(B)
            for mod, kv in zip(self._attn, self.prefix.split(flat)):
                mod._dpflat_kv = kv
        else:  # LoRA: no prefix; the keep-mask switches each layer's adapters
            flat = None
            lora.switch(self.adapters, self.prefix.keep_mask)
        try:
            kw: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None and not self.causal:
                kw["token_type_ids"] = token_type_ids
            hidden = self.backbone(**kw).last_hidden_state
        finally:
            for mod in self._attn:
                mod._dpflat_kv = None
        if self.cfg.head == "prompt":
            # the hidden state at the (first) mask token, scored by the MLM head on the label words;
            # a decoder's at the last real token, scored by the LM head (the next token's logits)
            at = (decoders.last_positions(input_ids, attention_mask) if self.causal
                  else (input_ids == self.mask_token_id).int().argmax(1))
            logits = self.head(hidden[torch.arange(B, device=hidden.device), at])
            return (logits, flat) if return_prefix else logits
        if self.cfg.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            am = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            w = am.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * w).sum(1) / w.sum(1).clamp_min(1.0)
        logits = self.head(pooled if self.cfg.head == "readout" else self.dropout(pooled))
        return (logits, flat) if return_prefix else logits


@torch.no_grad()
def init_prefix_from_tokens(model: PrefixModel, seed: int = 0) -> None:
    """Initialise each layer's prefix with the keys/values the backbone gives real tokens.

    Why: a random prefix starts far from anything the frozen attention has seen and
    drags every representation; real-token keys/values start near the backbone's own
    function (Li & Liang 2021 found such initialisation stabilises prefix-tuning).
    """
    if model.causal:
        return decoders.init_prefix_from_tokens(model, seed)
    g = torch.Generator().manual_seed(seed)
    vocab = model.backbone.config.vocab_size
    m = model.prefix.prefix_len
    ids = torch.randint(min(1000, vocab // 2), vocab, (1, m), generator=g)
    ids = ids.to(model.prefix.embedding.weight.device)
    caught: dict[int, dict[str, torch.Tensor]] = {}
    hooks = []
    for l, att in enumerate(model._attn):
        for part in ("key", "value"):
            lin = getattr(att, part, None)
            if not isinstance(lin, nn.Linear):
                return  # unknown layout: keep the random init
            hooks.append(lin.register_forward_hook(lambda mod, i, o, l=l, part=part: caught.setdefault(l, {}).__setitem__(part, o)))
    try:
        model.backbone(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for h in hooks:
            h.remove()
    rows = [torch.cat([caught[l]["key"][0], caught[l]["value"][0]], dim=-1) for l in range(model.n_layers)]
    model.prefix.embedding.weight.copy_(torch.stack(rows, dim=1).reshape(m, -1))


def build_model(cfg: ModelConfig, num_labels: int, seed: int = 0, task: str | None = None,
                tokenizer=None) -> PrefixModel:
    """Backbone (frozen) + prefix + head, deterministic given ``seed``.

    ``head="prompt"``: the backbone's MLM head scores the label words (``cfg.label_words``,
    else ``task``'s default, ``dpflat.tokens.PROMPTS``) at the template's mask token.
    """
    if num_labels < 2:
        raise ConfigError(f"num_labels must be >= 2, got {num_labels}")
    cfg = resolve_head(cfg, task)
    if decoders.is_decoder(cfg.backbone):
        model = _build_decoder(cfg, num_labels, seed, task, tokenizer)
    elif cfg.head == "prompt":
        from . import tokens as tokens_mod

        if cfg.label_words is None and task is None:
            raise ConfigError("head prompt: give label_words or the task (for its default label words)")
        tok = tokenizer or load_tokenizer(cfg)
        if getattr(tok, "mask_token_id", None) is None:
            raise ModelError(f"the tokenizer of {cfg.backbone!r} has no mask token: --head prompt needs one")
        words = (tokens_mod.prompt_for(task, cfg.template, cfg.label_words)[1] if task is not None
                 else [w.strip() for w in cfg.label_words.split(",")])
        backbone, mlm_head = load_mlm_backbone(cfg, seed=seed)
        for p in backbone.parameters():
            p.requires_grad_(False)
        head = LabelWordHead(mlm_head, tokens_mod.label_word_ids(tok, words))
        torch.manual_seed(seed)
        model = PrefixModel(backbone, num_labels, cfg, prompt_head=head, mask_token_id=tok.mask_token_id)
    elif cfg.head == "readout":
        from . import tokens as tokens_mod

        if task is None:
            raise ConfigError("head readout: give the task (its label descriptions)")
        texts = tokens_mod.readout_texts(task, cfg.label_description)
        if len(texts) != num_labels:
            raise ConfigError(f"{len(texts)} readout descriptions for {num_labels} classes: {texts}")
        backbone = load_backbone(cfg, seed=seed)
        for p in backbone.parameters():
            p.requires_grad_(False)
        readout = ReadoutHead(label_prototypes(backbone, tokenizer or load_tokenizer(cfg), texts, cfg.pooling),
                              cfg.cosine_scale)
        torch.manual_seed(seed)
        model = PrefixModel(backbone, num_labels, cfg, readout=readout)
    else:
        backbone = load_backbone(cfg, seed=seed)
        torch.manual_seed(seed)
        model = PrefixModel(backbone, num_labels, cfg)
    if cfg.prefix_init == "tokens":
        was = model.training
        model.eval()
        init_prefix_from_tokens(model, seed)
        model.train(was)
    return model


def _build_decoder(cfg: ModelConfig, num_labels: int, seed: int, task: str | None, tokenizer) -> PrefixModel:
    """A causal LM (frozen) + prefix + its label-word head (``head prompt``) or a linear head on
    the mean of its hidden states (``head linear``); the readout head is for sentence embedders."""
    backbone, lm_head = decoders.load_causal_lm(cfg.backbone, _attn_name(cfg), seed=seed)
    for p in backbone.parameters():
        p.requires_grad_(False)
    if cfg.head == "prompt":
        if cfg.label_words is None and task is None:
            raise ConfigError("head prompt: give label_words or the task (for its default label words)")
        from . import tokens as tokens_mod

        words = (decoders.prompt_for(task, cfg.template, cfg.label_words)[1] if task is not None
                 else [w.strip() for w in cfg.label_words.split(",")])
        head = LabelWordHead(lm_head, tokens_mod.label_word_ids(tokenizer or load_tokenizer(cfg), words))
        torch.manual_seed(seed)
        return PrefixModel(backbone, num_labels, cfg, prompt_head=head)
    if cfg.head == "readout":
        raise ConfigError(f"head readout needs a sentence embedder; {cfg.backbone!r} is a causal LM: use --head prompt "
                          "(its label words' next-token logits) or --head linear")
    torch.manual_seed(seed)
    return PrefixModel(backbone, num_labels, cfg)


__all__ = [
    "ModelError",
    "check_layers",
    "LabelWordHead",
    "PrefixEncoder",
    "ReadoutHead",
    "label_prototypes",
    "resolve_head",
    "load_mlm_backbone",
    "PrefixModel",
    "build_model",
    "load_backbone",
    "load_tokenizer",
    "minilm_path",
    "register_attention",
    "tiny_config",
]
