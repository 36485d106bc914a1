"""RunDir is the only reader and writer of run files, and each run-file name is written down once.

Read from the source (nothing is run): outside ``dpflat/runs/`` no module may

- write a run file's name as a path (``"mia.json"``, ``f"{d}/ledger.json"``): the names live in
  ``dpflat/runs/names.py`` alone, so inside the runs package too no module repeats one;
- use a ``RunDir`` path (``rd.mia_file``, ``rd.landscape_dir``) for anything but asking whether
  it exists (``.is_file()``, ``.exists()``) or naming it in a message: reading, writing,
  opening, removing or building a path below it are ``RunDir`` methods.

Prose (docstrings, comments, messages that mention ``ledger.json``) is not a path and is left alone.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from dpflat.runs import RunDir, names

REPO = Path(__file__).resolve().parents[1]
RUNS = Path("dpflat/runs")
#: modules that still touch run files themselves, each with the reason; keep it short
ALLOWED: dict[str, str] = {}
#: RunDir's path properties (config_file, ..., landscape_dir)
PATH_ATTRS = frozenset(k for k, v in vars(RunDir).items() if isinstance(v, property) and k.endswith(("_file", "_dir")))
SAFE_USES = frozenset({"is_file", "exists"})
#: a string that is a run file's name but names another file there
NOT_RUN_FILES = {("dpflat/backbone.py", "config.json"): "a Hugging Face model folder's config"}


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def _names_a_run_file(text: str) -> str | None:
    """The run-file name a string constant stands for as a path (all of it, or after a ``/``), if any."""
    return next((n for n in names.ALL if text == n or text.endswith("/" + n)), None)


def violations(source: str, *, names_allowed: bool = False, paths_allowed: bool = False,
               other_files: frozenset[str] = frozenset()) -> list[str]:
    """What ``source`` does with run files that only the runs package may do (one line each)."""
    tree = ast.parse(source)
    parent = {id(c): p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
    docs = _docstrings(tree)
    in_message = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FormattedValue) for n in ast.walk(f)}
    out = []
    for node in ast.walk(tree):
        if (not names_allowed and isinstance(node, ast.Constant) and isinstance(node.value, str)
                and id(node) not in docs and (name := _names_a_run_file(node.value)) and name not in other_files):
            out.append(f"line {node.lineno}: the run-file name {name!r} (use RunDir)")
        if not paths_allowed and isinstance(node, ast.Attribute) and node.attr in PATH_ATTRS and id(node) not in in_message:
            up = parent.get(id(node))
            call = parent.get(id(up)) if up is not None else None
            asks = (isinstance(up, ast.Attribute) and up.attr in SAFE_USES and isinstance(call, ast.Call)
                    and call.func is up)
            if not asks:
                out.append(f"line {node.lineno}: .{node.attr} used for more than asking whether it exists "
                           "(read or write it through a RunDir method)")
    return out


def _modules() -> list[Path]:
    return sorted(p.relative_to(REPO) for p in (REPO / "dpflat").rglob("*.py"))


def test_no_module_outside_the_runs_package_opens_a_run_file():
    found = {}
    for rel in _modules():
        inside = RUNS in rel.parents
        bad = violations((REPO / rel).read_text(), names_allowed=rel == RUNS / "names.py",
                         paths_allowed=inside or str(rel) in ALLOWED,
                         other_files=frozenset(n for m, n in NOT_RUN_FILES if m == str(rel)))
        if bad:
            found[str(rel)] = bad
    assert not found, "\n".join(f"{m}: {v}" for m, vs in found.items() for v in vs)


def test_the_allow_list_is_short_and_still_needed():
    """An entry whose module no longer touches run files is removed (so the list only shrinks)."""
    assert len(ALLOWED) <= 2
    for rel in ALLOWED:
        assert violations((REPO / rel).read_text(), names_allowed=False), f"{rel} is clean: drop it from ALLOWED"


def test_every_run_dir_path_is_built_from_the_names_module():
    rd = RunDir("/r")
    built = {getattr(rd, a).name for a in PATH_ATTRS}
    assert built <= set(names.ALL) | {names.LANDSCAPE_DIR}, built - set(names.ALL)
    assert len(set(names.ALL)) == len(names.ALL)  # each name once


@pytest.mark.parametrize("code", [
    'MIA_FILE = "mia.json"',
    'p = rd.path / "sharpness.jsonl"',
    'p = f"{root}/ledger.json"',
    'd = json.loads(rd.ledger_file.read_text())',
    'rd.mia_file.write_text("{}")',
    'open(rd.sharpness_file, "a")',
    'atomic_write_text(rd.landscape_file, text)',
    'cache = rd.landscape_dir / name',
    'best = rd.best_file\nbest.unlink()',
    'RunDir(d).canaries_file.unlink(missing_ok=True)',
])
def test_a_planted_run_file_access_is_caught(code):
    assert violations(code), code


@pytest.mark.parametrize("code", [
    '"""Writes mia.json and reads ledger.json."""',
    'if not rd.ledger_file.is_file():\n    raise FileNotFoundError(f"{rd.ledger_file} is missing")',
    'done = RunDir(p).mia_file.exists()',
    'raise ValueError(f"{run_dir} has no ledger.json (unfinished run?)")',
    'rd.write_mia(result.to_dict())',
])
def test_asking_and_prose_are_not_access(code):
    assert violations(code) == [], code
