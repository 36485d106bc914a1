"""LM-BFF prompts and tokenisation (cached) of the splits: the last stage of the data pipeline.

``data.load_raw`` -> ``splits.make_splits`` -> ``tokenize`` (padded torch tensors; the prompt
head's template and label words come from :data:`PROMPTS`).
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Sequence

from datasets import Dataset, Features, Value

try:  # datasets >= 4; pyproject allows 3.x, where the fixed-length list feature is Sequence
    from datasets import List as _ListFeature
except ImportError:  # pragma: no cover
    from datasets import Sequence as _ListFeature

from .data import DataError, TaskCard, _as_card


# --------------------------------------------------------------------------- prompts (LM-BFF)
#
# The authors' protocol (tiejin98/Privacy_Flatness, run_wrapper_pretuning_final.py and
# run_classification_pretuning_final.py, after LM-BFF, Gao et al. 2021) classifies with a
# template and label words read off the masked-LM head. Label words are in our class order
# (TaskCard.labels). MPQA's entry is LM-BFF's; disaster's is ours (no published one).
PROMPTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sst2": ("*cls**sent_0*_It_was*mask*.*sep+*", ("terrible", "great")),
    "qnli": ("*cls**sent-_0*?*mask*,*+sentl_1**sep+*", ("yes", "no")),
    "qqp": ("*cls**sent-_0**mask*,*+sentl_1**sep+*", ("no", "yes")),
    "mnli": ("*cls**sent-_0*?*mask*,*+sentl_1**sep+*", ("yes", "maybe", "no")),
    "trec": ("*cls**mask*:*+sent_0**sep+*", ("Description", "Entity", "Expression", "Human", "Location", "Number")),
    "mpqa": ("*cls**sent_0*_It_was*mask*.*sep+*", ("terrible", "great")),
    "disaster": ("*cls**sent_0*_Is_it_about_a_disaster?*mask*.*sep+*", ("no", "yes")),
}


#: Label descriptions of the readout head and the black-box readout: a template ("{}" = the card's
#: label name with "_" as a space), or one text per class: a sentence embedder scores a sentence by its cosine to each.
#: its cosine to each. TREC's label names are not phrases, so its descriptions are written out.
READOUTS: dict[str, str | tuple[str, ...]] = {
    "sst2": "a {} review", "mpqa": "a {} opinion", "disaster": "a {} tweet",
    "trec": ("a question asking for a description", "a question about a thing", "a question about an abbreviation",
             "a question about a person", "a question about a place", "a question about a number"),
}


def has_readout(task: str | TaskCard) -> bool:
    """Whether the task has default label descriptions (the readout head's ``auto`` choice)."""
    return _as_card(task).name in READOUTS


def readout_texts(task: str | TaskCard, template: str | None = None, fallback: str | None = None) -> list[str]:
    """One description per class, in class order: the given template, else the task's, else
    ``fallback`` (a template); none of them is an error naming the way out."""
    card = _as_card(task)
    tpl = template or READOUTS.get(card.name) or fallback
    if tpl is None:
        raise DataError(f"task {card.name} has no readout description: pass --label-description (e.g. 'a {{}} text') "
                        "or use --head linear")
    if isinstance(tpl, tuple):
        return list(tpl)
    return [tpl.format(n.replace("_", " ")) for n in card.label_names]


def prompt_for(task: str | TaskCard, template: str | None = None,
               label_words: str | Sequence[str] | None = None) -> tuple[str, list[str]]:
    """(template, label words in class order): the given ones, else the task's default."""
    card = _as_card(task)
    default = PROMPTS.get(card.name)
    if (template is None or label_words is None) and default is None:
        raise DataError(f"task {card.name} has no default prompt: pass --template and --label-words")
    tpl = template if template is not None else default[0]
    if label_words is None:
        words = list(default[1])
    elif isinstance(label_words, str):
        words = [w.strip() for w in label_words.split(",")]
    else:
        words = [str(w) for w in label_words]
    if len(words) != card.num_labels:
        raise DataError(f"task {card.name} has {card.num_labels} classes ({', '.join(card.label_names)}) but "
                        f"{len(words)} label words were given: {', '.join(words)}")
    if "*mask*" not in tpl or "*sent_0*" not in tpl.replace("sent-_0", "sent_0").replace("+sent_0", "sent_0"):
        raise DataError(f"template {tpl!r} needs *mask* and the first sentence (*sent_0*)")
    return tpl, words


def label_word_ids(tokenizer, words: Sequence[str]) -> list[int]:
    """One vocabulary id per label word, as LM-BFF picks it: the word with a leading space
    (RoBERTa's 'Ġgreat'), unless it starts with <, [, . or ,. A word that is not a single
    token is an error: the MLM head scores one token at the mask."""
    ids = []
    for w in words:
        pieces = tokenizer.tokenize(w if w[:1] in ("<", "[", ".", ",") else " " + w)
        if len(pieces) != 1:
            raise DataError(f"label word {w!r} is {len(pieces)} tokens for this tokenizer ({pieces}); "
                            "choose single-token words")
        ids.append(int(tokenizer.convert_tokens_to_ids(pieces[0])))
    if len(set(ids)) != len(ids):
        raise DataError(f"label words {list(words)} map to repeated tokens {ids}")
    return ids


def _template_pieces(tokenizer, template: str, texts: Sequence[str]) -> list[tuple[str, list[int]]]:
    """LM-BFF's template language: ``*cls*``, ``*mask*``, ``*sep*``/``*sep+*``, ``*sent_i*``
    (``+`` = leading space, ``-`` = last character dropped, ``l``/``u`` = first letter lower/upper
    case), anything else literal text with ``_`` for a space. Returns (kind, ids) pieces."""
    enc = lambda t: tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
    out: list[tuple[str, list[int]]] = []
    for part in template.split("*"):
        if not part:
            continue
        if part == "cls":
            out.append(("special", [tokenizer.cls_token_id]))
        elif part == "mask":
            out.append(("special", [tokenizer.mask_token_id]))
        elif part in ("sep", "sep+"):
            out.append(("special", [tokenizer.sep_token_id]))
        elif "sent" in part and part.split("_")[-1].isdigit():
            head, i = part.rsplit("_", 1)
            i = int(i)
            if i >= len(texts):
                raise DataError(f"template {template!r} uses sentence {i} but the task has {len(texts)}")
            t = str(texts[i])
            flags = head.replace("sent", "")
            if "-" in flags:
                t = t[:-1]
            if "l" in flags:
                t = t[:1].lower() + t[1:]
            if "u" in flags:
                t = t[:1].upper() + t[1:]
            if "+" in flags:
                t = " " + t
            out.append(("sent", enc(t)))
        else:
            text = part.replace("_", " ")
            out.append(("text", [tokenizer.convert_tokens_to_ids(text)] if len(text) == 1 else enc(text)))
    return out


def encode_template(tokenizer, template: str, texts: Sequence[str], max_length: int) -> list[int]:
    """Token ids of one example under the template, at most ``max_length`` long: the longest
    sentence is cut from its end first, so the mask and the template words always survive."""
    pieces = _template_pieces(tokenizer, template, texts)
    over = sum(len(ids) for _, ids in pieces) - max_length
    while over > 0:
        sents = [i for i, (kind, ids) in enumerate(pieces) if kind == "sent" and ids]
        if not sents:
            raise DataError(f"template {template!r} alone is longer than max_length={max_length}")
        j = max(sents, key=lambda i: len(pieces[i][1]))
        cut = min(over, len(pieces[j][1]))
        pieces[j] = ("sent", pieces[j][1][: len(pieces[j][1]) - cut])
        over -= cut
    return [t for _, ids in pieces for t in ids]


# --------------------------------------------------------------------------- tokenisation
#
# Cache design: an in-process LRU of finished Datasets (always on; a notebook or a
# sweep re-tokenises the same split many times) plus, when ``cache_dir`` is given,
# ``datasets``' own Arrow cache file so other processes reuse the work. Both are keyed
# by the split's fingerprint (deterministic: it chains from file contents through
# select), the tokenizer's identity (name_or_path, class, vocabulary digest, init
# options, special tokens, padding/truncation side) and max_length. Name alone is not
# enough: tests build tokenizers in memory and a local folder may change. Token ids are
# stored as int32/int8 (4x smaller in RAM and on disk); torch format returns int64.

_TOKENIZE_CACHE: OrderedDict[str, Dataset] = OrderedDict()
_TOKENIZE_CACHE_SIZE = 8
_TOKENIZE_VERSION = 1  # bump when the output layout changes to invalidate disk caches


def clear_tokenize_cache() -> None:
    """Drop the in-process cache (disk cache files are left alone)."""
    _TOKENIZE_CACHE.clear()


_VOCAB_DIGESTS: "weakref.WeakKeyDictionary[Any, tuple[int, str]]" = weakref.WeakKeyDictionary()


def _vocab_digest(tokenizer) -> str:
    """sha256 of the vocabulary, memoised per tokenizer object (hashing 30k entries ~0.1 s);
    recomputed if the vocabulary size changed (``add_tokens``)."""
    size = len(tokenizer)
    try:
        memo = _VOCAB_DIGESTS.get(tokenizer)
    except TypeError:  # not weak-referenceable: just recompute
        memo = None
    if memo is not None and memo[0] == size:
        return memo[1]
    digest = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
    try:
        _VOCAB_DIGESTS[tokenizer] = (size, digest)
    except TypeError:
        pass
    return digest


def _tokenizer_identity(tokenizer) -> list:
    """What decides the token ids: name, class, vocabulary, init options (lower-casing,
    accents, ...), special tokens and padding/truncation sides."""
    init_kwargs = json.dumps(getattr(tokenizer, "init_kwargs", {}), sort_keys=True, default=str)
    return [
        getattr(tokenizer, "name_or_path", ""), type(tokenizer).__name__, _vocab_digest(tokenizer), init_kwargs,
        sorted(map(str, tokenizer.all_special_tokens)), getattr(tokenizer, "padding_side", ""),
        getattr(tokenizer, "truncation_side", ""), list(getattr(tokenizer, "model_input_names", [])),
    ]


def _tokenize_key(ds: Dataset, tokenizer, max_length: int, template: str | None = None) -> str:
    parts = [_TOKENIZE_VERSION, ds._fingerprint, ds.column_names, max_length, _tokenizer_identity(tokenizer)]
    if template is not None:  # plain tokenisation keeps its old keys (and disk caches)
        parts.append(template)
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]


def _encode_batch(tokenizer, text_a: list[str], text_b: list[str] | None, max_length: int,
                  token_type_ids: bool) -> Mapping[str, list]:
    """The only place the tokenizer runs (tests patch it to prove cache hits)."""
    return tokenizer(
        text_a, text_b, padding="max_length", truncation=True, max_length=max_length,
        return_token_type_ids=token_type_ids, return_attention_mask=True,
    )


def _output_features(ds: Dataset, max_length: int, token_type_ids: bool) -> Features:
    feats: dict[str, Any] = {
        "input_ids": _ListFeature(Value("int32"), length=max_length),
        "attention_mask": _ListFeature(Value("int8"), length=max_length),
    }
    if token_type_ids:
        feats["token_type_ids"] = _ListFeature(Value("int8"), length=max_length)
    feats["labels"] = ds.features["label"]
    feats["idx"] = Value("int64")
    return Features(feats)


def _check_tokenize_args(ds: Dataset, tokenizer, max_length: int) -> None:
    if "text_a" not in ds.column_names or "label" not in ds.column_names:
        raise DataError(f"tokenize needs columns text_a[, text_b] and label, got {ds.column_names}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise DataError(f"max_length must be an integer >= 2, got {max_length!r}")
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and limit < 1_000_000 and max_length > limit:
        raise DataError(f"max_length={max_length} exceeds the tokenizer's model_max_length={limit}")


def _encode_template_batch(tokenizer, template: str, text_a: list[str], text_b: list[str] | None,
                           max_length: int, token_type_ids: bool) -> dict[str, list]:
    """The prompt head's encoding: one sequence per example (LM-BFF), padded to max_length."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: dict[str, list] = {"input_ids": [], "attention_mask": []}
    for i, a in enumerate(text_a):
        ids = encode_template(tokenizer, template, [a] if text_b is None else [a, text_b[i]], max_length)
        n = len(ids)
        out["input_ids"].append(ids + [pad] * (max_length - n))
        out["attention_mask"].append([1] * n + [0] * (max_length - n))
    if token_type_ids:
        out["token_type_ids"] = [[0] * max_length for _ in text_a]
    return out


def _tokenize_uncached(ds: Dataset, tokenizer, max_length: int, key: str,
                       cache_dir: str | Path | None, template: str | None = None) -> Dataset:
    has_tt = "token_type_ids" in getattr(tokenizer, "model_input_names", ())
    pair = "text_b" in ds.column_names

    def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        if template is not None:
            enc = _encode_template_batch(tokenizer, template, batch["text_a"], batch["text_b"] if pair else None,
                                         max_length, has_tt)
        else:
            enc = _encode_batch(tokenizer, batch["text_a"], batch["text_b"] if pair else None, max_length, has_tt)
        out = {k: enc[k] for k in ("input_ids", "attention_mask")}
        if has_tt:
            out["token_type_ids"] = enc["token_type_ids"]
        out["labels"] = batch["label"]
        out["idx"] = batch["idx"] if "idx" in batch else indices
        return out

    features = _output_features(ds, max_length, has_tt)
    if len(ds) == 0:  # datasets.map skips empty inputs and would drop the schema
        return Dataset.from_dict({name: [] for name in features}, features=features)
    cache_file = None
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        cache_file = str(Path(cache_dir) / f"tokenized-{key}.arrow")
    return ds.map(
        encode, batched=True, with_indices=True, remove_columns=ds.column_names,
        features=features, new_fingerprint=key,
        cache_file_name=cache_file, load_from_cache_file=cache_file is not None,
        keep_in_memory=cache_file is None, desc=f"tokenize (max_length={max_length})",
    )


def tokenize(ds: Dataset, tokenizer, max_length: int, cache_dir: str | Path | None = None,
             template: str | None = None) -> Dataset:
    """Pad/truncate to ``max_length``; torch-formatted ``input_ids, attention_mask,
    [token_type_ids,] labels, idx`` (token_type_ids only if the tokenizer uses them).

    Re-tokenising the same split with the same tokenizer and length is free (see the
    cache design note above). ``idx`` is kept so losses can be traced back to rows.
    With a ``template`` (the prompt head), each example is encoded LM-BFF style as one
    sequence holding the tokenizer's mask token (:func:`encode_template`).
    """
    _check_tokenize_args(ds, tokenizer, max_length)
    if template is not None and "*mask*" in template and getattr(tokenizer, "mask_token_id", None) is None:
        raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')} has no mask token: the prompt head needs one")
    key = _tokenize_key(ds, tokenizer, max_length, template)
    out = _TOKENIZE_CACHE.get(key)
    if out is None:
        out = _tokenize_uncached(ds, tokenizer, max_length, key, cache_dir, template)
        _TOKENIZE_CACHE[key] = out
        while len(_TOKENIZE_CACHE) > _TOKENIZE_CACHE_SIZE:
            _TOKENIZE_CACHE.popitem(last=False)
    else:
        _TOKENIZE_CACHE.move_to_end(key)
    # A fresh formatted view (shares the Arrow table): callers' set_format can't touch the cache.
    return out.with_format("torch", columns=out.column_names)
