"""Task registry and loading: the first stage of the one-way data pipeline.

``get_task`` -> ``load_raw`` (files or hub -> a uniform ``DatasetDict`` with
``text_a[, text_b], label``) -> ``splits.make_splits`` (content-disjoint private /
public / val / eval(= test) with an ``idx`` column) -> ``tokens.tokenize`` (padded torch
tensors, cached; LM-BFF templates for the prompt head). Each stage imports only the
ones before it.

Every problem with the user's data surfaces as a ``DataError`` whose message is a
single line, so the CLI can print it without a traceback.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import datasets
import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

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



def column(ds: Dataset, name: str) -> list:
    """A whole column as a list, fast.

    In datasets >= 4 ``ds[name]`` is a lazy Column whose iteration reads row by row
    (~10 s for 67k selected rows); slicing it materialises in one Arrow call.
    """
    return ds[name][:]
