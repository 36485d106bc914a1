"""Content-disjoint private / public / val / test splits of a task's raw tables.

The second stage of the one-way data pipeline: ``data.load_raw`` -> ``make_splits`` ->
``tokens.tokenize``. Disjointness is by normalised text, so a duplicated sentence can
never sit on both sides of the privacy boundary or leak from test into selection.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict

from .data import DEFAULT_VAL_SIZE, DataError, column


def _label_counts(ds: Dataset) -> dict[str, int]:
    feat = ds.features.get("label")
    names = feat.names if isinstance(feat, ClassLabel) else None
    counts = Counter(column(ds, "label"))
    return {(names[k] if names else str(k)): int(v) for k, v in sorted(counts.items())}


@dataclass
class Splits:
    """Content-disjoint private (DP-trained) / public (non-private helpers) / val / eval sets.

    ``eval`` is the task's eval file, used as the *test* split: read once, at the end
    of a run. ``val`` (carved from the train file) is what checkpoint selection and any
    tuning read. ``idx`` in private, public and val is the row index in the raw train
    split: it proves disjointness and tells membership inference which rows were members.
    ``overlap`` counts the rows removed to make the splits share no normalised text
    (see :func:`make_splits`); runs copy it into their result.
    """

    private: Dataset
    public: Dataset
    eval: Dataset
    val: Dataset | None = None
    overlap: dict[str, int] = field(default_factory=dict)

    @property
    def test(self) -> Dataset:
        """The test split (the task's eval file): another name for ``eval``."""
        return self.eval

    def summary(self) -> dict[str, dict[str, Any]]:
        """Sizes and per-class counts of each split (for logs and run folders)."""
        named = [("private", self.private), ("public", self.public), ("val", self.val), ("eval", self.eval)]
        return {name: {"rows": len(ds), "labels": _label_counts(ds)} for name, ds in named if ds is not None}


def normalize_text(text: str) -> str:
    """The text as duplicate detection sees it: NFKC, lower case, whitespace collapsed,
    punctuation stripped at both ends ("A  film ." == "a film")."""
    t = " ".join(unicodedata.normalize("NFKC", str(text)).lower().split())
    i, j = 0, len(t)
    while i < j and _is_punct_or_space(t[i]):
        i += 1
    while j > i and _is_punct_or_space(t[j - 1]):
        j -= 1
    return t[i:j]


def _is_punct_or_space(ch: str) -> bool:
    return ch.isspace() or unicodedata.category(ch).startswith("P")


def normalized_keys(ds: Dataset) -> list[str]:
    """One duplicate key per row: the normalised text, or the normalised pair (a ⟂ b)."""
    a = [normalize_text(t) for t in column(ds, "text_a")]
    if "text_b" not in ds.column_names:
        return a
    return [f"{x}\x1f{normalize_text(y)}" for x, y in zip(a, column(ds, "text_b"))]


def _with_idx(ds: Dataset) -> Dataset:
    """Add ``idx`` = row position, unless present (re-splitting keeps original ids)."""
    if "idx" in ds.column_names:
        return ds
    return ds.add_column("idx", np.arange(len(ds), dtype=np.int64))


def _count(name: str, value: int | float, available: int, context: str = "", minimum: int = 0) -> int:
    """Validate an absolute size against what is available (``context`` explains the number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not float(value).is_integer():
        raise DataError(f"{name} must be a whole number, got {value!r}")
    n = int(value)
    if n < minimum:
        raise DataError(f"{name} must be >= {minimum}, got {n}")
    if n > available:
        raise DataError(f"{name}={n} is larger than the {available} rows available{context}")
    return n


def _whole(value: Any) -> bool:
    return (not isinstance(value, bool) and isinstance(value, (int, float, np.number))
            and float(value).is_integer())


def _public_count(public_size: int | float, n_train: int) -> int:
    """``public_size`` < 1 is a fraction of train; >= 1 a row count (config convention)."""
    if isinstance(public_size, bool) or not isinstance(public_size, (int, float, np.number)):
        raise DataError(f"public_size must be a number, got {public_size!r}")
    if public_size < 0:
        raise DataError(f"public_size must be >= 0, got {public_size}")
    if public_size < 1:
        return int(round(public_size * n_train))
    return _count("public_size", public_size, n_train, " in the train split")


def _rng(seed: int, stream: int) -> np.random.Generator:
    """Independent generators per purpose, so e.g. eval_size never shifts the train rows."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed must be an integer >= 0, got {seed!r}")
    return np.random.default_rng([int(seed), stream])


def make_splits(
    raw: DatasetDict,
    *,
    seed: int,
    public_size: int | float = 0.1,
    train_size: int | None = None,
    eval_size: int | None = None,
    eval_seed: int | None = None,
    val_size: int = DEFAULT_VAL_SIZE,
) -> Splits:
    """Carve public, val and private from raw train; deterministic given ``seed``.

    Content-disjoint by normalised text (:func:`normalize_text`; pairs by their
    normalised pair), removing rows in a fixed order so each split keeps its size:

    1. the eval file is the test split and is never changed: train rows whose text
       occurs anywhere in it are dropped (``overlap["train_test"]``; the other side,
       test rows whose text occurs in train, is ``overlap["test_in_train"]``);
    2. public = the first ``public_size`` rows of a seeded permutation of what is left;
    3. val = the next ``val_size`` rows whose text is not in public;
    4. private = the remaining rows whose text is in neither public nor val
       (``overlap["public_private"]`` and ``overlap["val_private"]`` count the rows
       dropped here), then subsampled to ``train_size``.

    Duplicates *within* one split are kept: they do not break disjointness. public is
    drawn first, so the same seed and public_size give the same public rows whatever
    train_size is. ``eval_seed`` (default: ``seed``) lets runs with different seeds
    share one fixed eval subset. ``public_size`` < 1 is a fraction of the train file.
    """
    missing = [s for s in ("train", "eval") if s not in raw]
    if missing:
        raise DataError(f"raw data has splits {list(raw)}, expected 'train' and 'eval'")
    train, eval_ = _with_idx(raw["train"]), _with_idx(raw["eval"])
    val_size = _count("val_size", val_size, len(train), " in the train split", minimum=1)
    n = len(train)
    n_public = _public_count(public_size, n)
    keys = normalized_keys(train)
    test_keys = normalized_keys(eval_)
    test_set, train_set = set(test_keys), set(keys)
    in_test = np.fromiter((k in test_set for k in keys), dtype=bool, count=n)
    overlap = {"train_test": int(in_test.sum()), "test_in_train": sum(k in train_set for k in test_keys)}
    order = _rng(seed, 0).permutation(n)
    order = order[~in_test[order]]
    without = f" after removing {overlap['train_test']} rows whose text is in the test file" if overlap["train_test"] else ""
    if n_public > len(order):
        raise DataError(f"public_size={n_public} is larger than the {len(order)} train rows available{without}")
    public_rows, rest = order[:n_public], order[n_public:]
    public_keys = {keys[i] for i in public_rows}
    cand = [int(i) for i in rest if keys[i] not in public_keys]
    overlap["public_private"] = len(rest) - len(cand)
    if val_size > len(cand):
        raise DataError(f"val_size={val_size} is larger than the {len(cand)} train rows left after "
                        f"{n_public} public rows and their duplicates{without}")
    val_rows = np.asarray(cand[:val_size], dtype=np.int64)
    val_keys = {keys[i] for i in val_rows}
    pool = np.asarray([i for i in cand[val_size:] if keys[i] not in val_keys], dtype=np.int64)
    overlap["val_private"] = len(cand) - val_size - len(pool)
    if len(pool) == 0:
        raise DataError(f"private split is empty: {n} train rows, {n_public} taken as public, {val_size} as val"
                        f"{without}")
    if train_size is not None:
        dropped = overlap["train_test"] + overlap["public_private"] + overlap["val_private"]
        # train_size is a cap: the study default (8,000) is more than some tasks have (MPQA), and a
        # run there should train on all of them, not stop; it says so in one line
        context = f" ({n} train rows minus {n_public} public, {val_size} val and {dropped} duplicates)"
        k = _count("train_size", train_size, max(len(pool), int(train_size) if _whole(train_size) else 0),
                   context, minimum=1)
        if k > len(pool):
            from .config import warn

            warn(f"train_size={k} is more than the {len(pool)} private rows available{context}: all of them are used")
            k = len(pool)
        pool = pool[:k]
    if eval_size is not None:
        k = _count("eval_size", eval_size, len(eval_), " in the eval split", minimum=1)
        eval_rng = _rng(seed if eval_seed is None else eval_seed, 1)
        eval_ = eval_.select(np.sort(eval_rng.permutation(len(eval_))[:k]))
    splits = Splits(private=train.select(np.sort(pool)), public=train.select(np.sort(public_rows)), eval=eval_,
                    val=train.select(np.sort(val_rows)), overlap=overlap)
    _check_disjoint(splits)
    return splits


def splits_for_config(raw: DatasetDict, data_cfg: Any, seed: int) -> Splits:
    """``make_splits`` with a ``DataConfig``'s sizes: every reader of a run's splits (training,
    MIA, audit) must call it the same way, or they see different private rows."""
    return make_splits(raw, seed=seed, public_size=data_cfg.public_size, train_size=data_cfg.train_size,
                       eval_size=data_cfg.eval_size, val_size=getattr(data_cfg, "val_size", DEFAULT_VAL_SIZE))


def _check_disjoint(splits: Splits) -> None:
    """Guard the privacy story: no row, and no normalised text, in two of private / public / val,
    and none of their texts in the test split."""
    named = [("private", splits.private), ("public", splits.public)]
    if splits.val is not None:
        named.append(("val", splits.val))
    for i, (na, a) in enumerate(named):
        for nb, b in named[i + 1:]:
            shared = set(column(a, "idx")) & set(column(b, "idx"))
            if shared:
                raise DataError(f"{na} and {nb} splits share {len(shared)} rows (idx column not unique?)")
            texts = set(normalized_keys(a)) & set(normalized_keys(b))
            if texts:
                raise DataError(f"{na} and {nb} splits share {len(texts)} normalised texts")
    test = set(normalized_keys(splits.eval))
    for na, a in named:
        texts = set(normalized_keys(a)) & test
        if texts:
            raise DataError(f"{na} and test splits share {len(texts)} normalised texts")
