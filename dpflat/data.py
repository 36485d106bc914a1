"""Task registry, loading, private/public/eval splits and tokenisation.

Data flows one way: ``get_task`` -> ``load_raw`` (files or hub -> a uniform
``DatasetDict`` with ``text_a[, text_b], label``) -> ``make_splits`` (content-disjoint
private / public / val / eval(= test) with an ``idx`` column) -> ``tokenize`` (padded
torch tensors, cached; LM-BFF templates for the prompt head).

Every problem with the user's data surfaces as a ``DataError`` whose message is a
single line, so the CLI can print it without a traceback.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import unicodedata
import weakref
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import datasets
import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

try:  # datasets >= 4; pyproject allows 3.x, where the fixed-length list feature is Sequence
    from datasets import List as _ListFeature
except ImportError:  # pragma: no cover
    from datasets import Sequence as _ListFeature

logger = logging.getLogger(__name__)

#: Where ``data/prepare.py`` copies the task folders; searched after $DPFLAT_DATA_DIR.
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1] / "data"
ENV_VAR = "DPFLAT_DATA_DIR"
#: rows of the train file carved out as the validation split (checkpoint selection)
DEFAULT_VAL_SIZE = 500
FORMATS = ("tsv", "json_dict", "jsonl", "json_list")


class DataError(ValueError):
    """Bad data input; its message is one clear line the CLI prints as-is."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def _brief(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` of a library exception, flattened and capped for one-line errors."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class TaskCard:
    """Everything needed to read one task, locally or from the hub.

    The ``hub_*`` fields exist because the hub copies name columns and order labels
    differently from our local files (e.g. GLUE QNLI has ``question``/``sentence`` and
    TREC's hub class order is ABBR, ENTY, DESC, ...); they map the hub onto the card.
    """

    name: str
    folder: str
    train_file: str
    eval_file: str
    fmt: str
    text_columns: tuple[str, ...]
    label_column: str
    labels: tuple[str, ...]
    label_names: tuple[str, ...]
    metric: str
    hub: tuple[str, str | None] | None
    hub_splits: tuple[str, str] = ("train", "validation")
    description: str = ""
    #: >0 when the task ships one labelled file: that many rows (a fixed
    #: RandomState(holdout_seed) permutation, first rows) become the eval split.
    eval_holdout: int = 0
    holdout_seed: int = 42
    #: hub column names for text_a[, text_b]; empty = same as ``text_columns``.
    hub_text_columns: tuple[str, ...] = ()
    hub_label_column: str = "label"
    #: hub class id i -> our class id ``hub_label_map[i]``; None = identical order.
    hub_label_map: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"task {self.name}: fmt must be one of {FORMATS}, got {self.fmt!r}")
        if len(self.text_columns) not in (1, 2):
            raise ValueError(f"task {self.name}: 1 or 2 text columns, got {self.text_columns}")
        if len(self.labels) != len(self.label_names) or len(self.labels) < 2:
            raise ValueError(f"task {self.name}: labels and label_names must match (>= 2 classes)")

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def is_pair(self) -> bool:
        """True for sentence-pair tasks (the loader then emits ``text_b``)."""
        return len(self.text_columns) == 2

    @property
    def files(self) -> tuple[str, ...]:
        """Distinct files the task needs inside its folder."""
        return tuple(dict.fromkeys((self.train_file, self.eval_file)))


_GLUE = "nyu-mll/glue"  # the canonical repo that the legacy name "glue" redirects to

TASKS: dict[str, TaskCard] = {
    c.name: c
    for c in (
        TaskCard(
            name="sst2", folder="sst2", train_file="train.tsv", eval_file="dev.tsv", fmt="tsv",
            text_columns=("sentence",), label_column="label",
            labels=("0", "1"), label_names=("negative", "positive"), metric="accuracy",
            hub=(_GLUE, "sst2"),
            description="GLUE SST-2 movie-review sentiment: 67,349 train phrases (many are short "
            "sub-sentence phrases), 872 dev sentences. TSV with quote characters: read with QUOTE_NONE.",
        ),
        TaskCard(
            name="qnli", folder="qnli", train_file="train.json", eval_file="dev.json", fmt="json_dict",
            text_columns=("text_a", "text_b"), label_column="label",
            labels=("entailment", "not_entailment"), label_names=("entailment", "not_entailment"),
            metric="accuracy", hub=(_GLUE, "qnli"), hub_text_columns=("question", "sentence"),
            description="GLUE QNLI (question, sentence) pairs: 8,999 train + 1,000 eval, both sampled "
            "from GLUE train (PowerfulPromptFT); full GLUE dev is in qnli/glue_dev.tsv, unused here.",
        ),
        TaskCard(
            name="qqp", folder="qqp", train_file="train.json", eval_file="dev.json", fmt="json_dict",
            text_columns=("text_a", "text_b"), label_column="label",
            labels=("0", "1"), label_names=("not_duplicate", "duplicate"), metric="f1",
            hub=(_GLUE, "qqp"), hub_text_columns=("question1", "question2"),
            description="GLUE QQP duplicate questions, 8,999 train + 1,000 eval sampled from GLUE "
            "train. MiniLM's pre-training included QQP: say so next to results.",
        ),
        TaskCard(
            name="mnli", folder="mnli", train_file="train.json", eval_file="dev.json", fmt="json_dict",
            text_columns=("text_a", "text_b"), label_column="label",
            labels=("entailment", "neutral", "contradiction"),
            label_names=("entailment", "neutral", "contradiction"), metric="accuracy",
            hub=(_GLUE, "mnli"), hub_splits=("train", "validation_matched"),
            hub_text_columns=("premise", "hypothesis"),
            description="GLUE MNLI (premise, hypothesis), 3 classes, 8,999 train + 1,000 eval sampled "
            "from GLUE train. MiniLM's pre-training included MNLI/SNLI: say so next to results.",
        ),
        TaskCard(
            name="trec", folder="trec", train_file="train.jsonl", eval_file="test.jsonl", fmt="jsonl",
            text_columns=("sentence",), label_column="label",
            labels=("0", "1", "2", "3", "4", "5"),
            label_names=("description", "entity", "abbreviation", "human", "location", "number"),
            metric="accuracy", hub=("CogComp/trec", None), hub_splits=("train", "test"),
            hub_text_columns=("text",), hub_label_column="coarse_label", hub_label_map=(2, 1, 0, 3, 4, 5),
            description="TREC-6 question type (Li & Roth 2002): 5,452 train, 500 standard test; "
            "file ids follow Ordered-Prompt (2 = ABBR, called 'expression' there).",
        ),
        TaskCard(
            name="mpqa", folder="mpqa", train_file="train.jsonl", eval_file="test.jsonl", fmt="jsonl",
            text_columns=("sentence",), label_column="label",
            labels=("0", "1"), label_names=("negative", "positive"), metric="accuracy", hub=None,
            description="MPQA opinion polarity of short phrases (Ordered-Prompt split): 8,603 train "
            "(73% negative), 2,000 balanced test. No hub copy wired: local files only.",
        ),
        TaskCard(
            name="disaster", folder="disaster", train_file="disaster_eval.json",
            eval_file="disaster_eval.json", fmt="json_list",
            text_columns=("sentence1",), label_column="label",
            labels=("Not Relevant", "Relevant"), label_names=("not_relevant", "relevant"),
            metric="accuracy", hub=None, eval_holdout=1000, holdout_seed=42,
            description="Disasters on Social Media tweets (Leopard copy), one file of 5,430 rows split "
            "as in DP-OPT/DLN: RandomState(42) permutation, first 1,000 = eval. Licence unverified.",
        ),
    )
}


def get_task(name: str) -> TaskCard:
    """Look a task up by name (case-insensitive); unknown names list the choices."""
    card = TASKS.get(str(name).strip().lower())
    if card is None:
        raise DataError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")
    return card


def _as_card(task: str | TaskCard) -> TaskCard:
    return task if isinstance(task, TaskCard) else get_task(task)


# --------------------------------------------------------------------------- locating files


def _task_dir(root: Path, card: TaskCard) -> Path | None:
    """The folder under ``root`` holding the task's files, or None.

    ``root`` may be the data root (``root/<folder>/<file>``) or the task folder itself;
    the latter only when its name is the card's folder, so that e.g. a TREC folder
    (same file names as MPQA) can never be read as MPQA.
    """
    for cand in (root / card.folder, root if root.name == card.folder else None):
        if cand is not None and all((cand / f).is_file() for f in card.files):
            return cand
    return None


def _search_roots(data_dir: str | Path | None) -> list[tuple[str, Path]]:
    """(origin, root) pairs in search order: explicit, $DPFLAT_DATA_DIR, repo data/."""
    roots: list[tuple[str, Path]] = []
    if data_dir is not None:
        roots.append(("data_dir", Path(data_dir).expanduser()))
    env = os.environ.get(ENV_VAR)
    if env:
        roots.append((f"${ENV_VAR}", Path(env).expanduser()))
    roots.append(("default", DEFAULT_DATA_DIR))
    return roots


def resolve_data_dir(card: str | TaskCard, data_dir: str | Path | None = None) -> Path | None:
    """Return the folder that holds the task's files, or None (meaning: use the hub).

    Search order: explicit ``data_dir`` (which must hold the task: a typo should not
    silently fall through to other data), then ``$DPFLAT_DATA_DIR``, then the repo's
    ``data/``. An env dir lacking the task only logs a warning, as it may hold a subset.
    """
    card = _as_card(card)
    for origin, root in _search_roots(data_dir):
        found = _task_dir(root, card)
        if found is not None:
            return found
        if origin == "data_dir":
            missing = next(f for f in card.files if not (root / card.folder / f).is_file())
            raise DataError(
                f"task {card.name}: data_dir {root} has no {card.folder}/{missing} "
                f"(expected {root / card.folder / missing})"
            )
        if origin.startswith("$"):
            logger.warning("%s=%s has no files for task %s; searching on", ENV_VAR, root, card.name)
    return None


# --------------------------------------------------------------------------- reading files

RawTable = dict[str, list]  # column name -> values, as read from one file


def _read_tsv(path: Path) -> RawTable:
    """TSV with a header row; every column read as a string.

    QUOTE_NONE because SST-2 phrases contain quote characters; na_filter off so that
    a sentence such as "null" or "NA" stays text instead of becoming a missing value.
    """
    with path.open(encoding="utf-8", newline="") as fh:
        header = fh.readline().rstrip("\r\n")
    if not header:
        return {}
    columns = header.split("\t")
    with path.open(encoding="utf-8", newline="") as fh:
        if not any(line.strip() for line in list(fh)[1:]):
            return {c: [] for c in columns}  # header only: an empty split, reported by the caller
    ds = datasets.load_dataset(
        "csv", data_files=str(path), split="train", delimiter="\t", quoting=csv.QUOTE_NONE,
        na_filter=False, keep_default_na=False,
        features=Features({c: Value("string") for c in columns}),
    )
    return ds.to_dict()


def _read_jsonl(path: Path) -> RawTable:
    """JSON lines via ``datasets`` (Arrow infers the column types)."""
    if path.stat().st_size == 0:
        return {}
    return datasets.load_dataset("json", data_files=str(path), split="train").to_dict()


def _rows_to_table(rows: Sequence[Any], path: Path) -> RawTable:
    """Column-wise view of JSON records; keys missing from a record become None."""
    if not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{path}: expected JSON objects as records")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return {k: [r.get(k) for r in rows] for k in keys}


def _read_json(path: Path, fmt: str) -> RawTable:
    """``json_dict`` ({"0": {...}, "1": {...}}, kept in key order) or ``json_list``."""
    with path.open(encoding="utf-8") as fh:
        obj = json.load(fh)
    if fmt == "json_dict" and isinstance(obj, dict):
        rows = list(obj.values())
    elif fmt == "json_list" and isinstance(obj, list):
        rows = obj
    else:
        want = "an object of records" if fmt == "json_dict" else "a list of records"
        raise DataError(f"{path}: expected {want} ({fmt}), got a JSON {type(obj).__name__}")
    return _rows_to_table(rows, path)


def _read_table(card: TaskCard, path: Path) -> RawTable:
    """Read one file in the card's format; any parser failure becomes a DataError."""
    try:
        if card.fmt == "tsv":
            return _read_tsv(path)
        if card.fmt == "jsonl":
            return _read_jsonl(path)
        return _read_json(path, card.fmt)
    except DataError:
        raise
    except Exception as exc:  # parser errors come in many types (pandas, arrow, json)
        raise DataError(f"task {card.name}: cannot read {path}: {_brief(exc)}") from exc


# --------------------------------------------------------------------------- uniform schema


def _features(card: TaskCard) -> Features:
    cols: dict[str, Any] = {"text_a": Value("string")}
    if card.is_pair:
        cols["text_b"] = Value("string")
    cols["label"] = ClassLabel(names=list(card.label_names))
    return Features(cols)


def _text_values(card: TaskCard, values: list, source: str, column: str) -> list[str]:
    for i, v in enumerate(values):
        if v is None:
            raise DataError(f"task {card.name}: {source} row {i} has no value in column {column!r}")
    return [v if isinstance(v, str) else str(v) for v in values]


def _label_ids(card: TaskCard, values: list, source: str, lookup: Mapping[str, int]) -> list[int]:
    """Raw labels (int or str in files) -> class ids via their string form."""
    ids = []
    for i, v in enumerate(values):
        cid = lookup.get(str(v))
        if cid is None:
            raise DataError(
                f"task {card.name}: {source} row {i} has label {v!r}; expected one of {list(lookup)}"
            )
        ids.append(cid)
    return ids


def _standardise(
    card: TaskCard,
    table: RawTable,
    source: str,
    text_columns: Sequence[str],
    label_column: str,
    lookup: Mapping[str, int],
) -> Dataset:
    """Raw columns -> ``text_a[, text_b], label`` with a ClassLabel of the card's names."""
    expected = [*text_columns, label_column]
    if not table:
        raise DataError(f"task {card.name}: {source} is empty")
    missing = [c for c in expected if c not in table]
    if missing:
        raise DataError(f"task {card.name}: {source} has columns {list(table)}, expected {expected}")
    if not table[label_column]:
        raise DataError(f"task {card.name}: {source} has no rows")
    out: dict[str, list] = {
        new: _text_values(card, table[col], source, col)
        for new, col in zip(("text_a", "text_b"), text_columns)
    }
    out["label"] = _label_ids(card, table[label_column], source, lookup)
    feats = _features(card)
    info = datasets.DatasetInfo(description=card.description, dataset_name=card.name, features=feats)
    return Dataset.from_dict(out, features=feats, info=info)


def _holdout(ds: Dataset, card: TaskCard) -> tuple[Dataset, Dataset]:
    """Split a single-file task: fixed permutation, first ``eval_holdout`` rows = eval.

    Uses the legacy RandomState on purpose: it reproduces the DP-OPT/DLN split exactly.
    """
    n, k = len(ds), card.eval_holdout
    if k >= n:
        raise DataError(f"task {card.name}: eval_holdout {k} needs more than the {n} rows in the file")
    perm = np.random.RandomState(card.holdout_seed).permutation(n)
    return ds.select(perm[k:]), ds.select(perm[:k])


def _load_local(card: TaskCard, task_dir: Path) -> DatasetDict:
    lookup = {raw: i for i, raw in enumerate(card.labels)}

    def read(fname: str) -> Dataset:
        path = task_dir / fname
        return _standardise(card, _read_table(card, path), f"file {path}", card.text_columns,
                            card.label_column, lookup)

    if card.eval_holdout:
        train, eval_ = _holdout(read(card.train_file), card)
    else:
        train, eval_ = read(card.train_file), read(card.eval_file)
    return DatasetDict(train=train, eval=eval_)


def _load_hub(card: TaskCard, looked_in: str) -> DatasetDict:
    """Fallback for online users with no local copy; failures become one DataError."""
    where = f"no local files for task {card.name} (looked in: {looked_in})"
    if card.hub is None:
        raise DataError(f"{where} and it has no hub source; run data/prepare.py or pass data_dir")
    path, config = card.hub
    try:
        hub = datasets.load_dataset(path, config) if config else datasets.load_dataset(path)
    except Exception as exc:  # network, auth, missing repo, script-based repo, ...
        raise DataError(f"{where} and the hub is unreachable: {_brief(exc)}") from exc
    text_columns = card.hub_text_columns or card.text_columns
    mapping = card.hub_label_map or tuple(range(card.num_labels))
    lookup = {str(h): ours for h, ours in enumerate(mapping)}
    out = {}
    for ours, split in zip(("train", "eval"), card.hub_splits):
        if split not in hub:
            raise DataError(f"task {card.name}: hub {path} has splits {list(hub)}, expected {split!r}")
        out[ours] = _standardise(card, hub[split].to_dict(), f"hub {path} split {split}",
                                 text_columns, card.hub_label_column, lookup)
    return DatasetDict(out)


def load_raw(task: str | TaskCard, data_dir: str | Path | None = None) -> DatasetDict:
    """Load a task as splits ``train`` and ``eval`` with columns ``text_a[, text_b], label``.

    ``text_b`` exists only for sentence-pair tasks; ``label`` is a ClassLabel carrying the
    card's ``label_names``. Local files win over the hub (see ``resolve_data_dir``).
    """
    card = _as_card(task)
    task_dir = resolve_data_dir(card, data_dir)
    if task_dir is not None:
        return _load_local(card, task_dir)
    looked_in = ", ".join(str(root / card.folder) for _, root in _search_roots(data_dir))
    return _load_hub(card, looked_in)


# --------------------------------------------------------------------------- splits


def column(ds: Dataset, name: str) -> list:
    """A whole column as a list, fast.

    In datasets >= 4 ``ds[name]`` is a lazy Column whose iteration reads row by row
    (~10 s for 67k selected rows); slicing it materialises in one Arrow call.
    """
    return ds[name][:]


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
        k = _count("train_size", train_size, len(pool),
                   f" ({n} train rows minus {n_public} public, {val_size} val and {dropped} duplicates)", minimum=1)
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
    if template is not None and getattr(tokenizer, "mask_token_id", None) is None:
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
