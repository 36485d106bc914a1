"""The import graph of dpflat and landscape: a DAG, landscape at the bottom, the training path in layers.

Every import a reader sees is an arrow: ``import a.b``, ``from a import b``, relative
``from . import x`` / ``from ..x import y``, imports inside functions and under
``TYPE_CHECKING``, and ``importlib.import_module("a.b")`` / ``__import__("a.b")`` with a
literal name (an f-string with a literal prefix counts as an arrow to that package).
The graph is read from the source files, nothing is imported, so a synthetic package
in a temporary folder is read the same way (the planted-cycle tests below).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("dpflat", "landscape")

# The training path's layers, lowest first: a module may import only from layers below its own
# (function-level imports included; TYPE_CHECKING-only imports excluded). Issue 16.
_LAYERS = [
    {"dpflat.decoders", "dpflat.lora"},  # decoder LLMs and LoRA adapters, which the model modules dispatch to
    {"dpflat.backbone", "dpflat.heads"},  # the frozen encoder and the heads, side by side
    {"dpflat.models"},  # prefix + head on the backbone
    {"dpflat.privacy"},
    {"dpflat.distributed"},
    {"dpflat.engine"},
    {"dpflat.session"},
    {"dpflat.blackbox.box"},
    {"dpflat.blackbox.zo"},
    {"dpflat.train", "dpflat.blackbox.loop", "dpflat.blackbox.finished"},
    {"dpflat.blackbox"},
    {"dpflat.sweep"},  # sweep.trainer: the one dispatcher between the two loops
    {"dpflat.audit"},
]


# --------------------------------------------------------------------------- reading the graph
def modules_under(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> source file, for every .py file of the packages below ``root``."""
    mods = {}
    for pkg in packages:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = f.relative_to(root).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


def _known(dotted: str, mods: dict[str, Path]) -> str | None:
    """The longest prefix of ``dotted`` that is one of ``mods`` (``a.b.C`` -> ``a.b``)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in mods:
            return ".".join(parts[:i])
    return None


def _absolute(name: str | None, level: int, package: str) -> str:
    """``from {'.' * level}{name} import ...`` inside ``package``, as an absolute dotted name."""
    if not level:
        return name or ""
    base = package.split(".")[: len(package.split(".")) - level + 1]
    return ".".join(base + ([name] if name else []))


def _dynamic_target(node: ast.Call) -> str | None:
    """The module an ``importlib.import_module`` / ``import_module`` / ``__import__`` call names, if written down."""
    f = node.func
    called = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    if called not in ("import_module", "__import__") or not node.args:
        return None
    arg = node.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        return str(arg.values[0].value).rstrip(".")  # f"pkg.sub.{name}": at least pkg.sub
    return None


def imports_of(module: str, path: Path, mods: dict[str, Path], type_only: bool = True) -> set[str]:
    """The modules of ``mods`` that ``module`` imports, in any of the forms of the module doc.

    ``type_only=False`` leaves out imports under ``if TYPE_CHECKING:`` (they never run).
    """
    tree = ast.parse(path.read_text())
    skip = set() if type_only else {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                                    and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str | None] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(_known(a.name, mods) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module, node.level, package)
            for a in node.names:
                full = f"{base}.{a.name}" if base else a.name
                out.add(full if full in mods else _known(base, mods))
        elif isinstance(node, ast.Call) and (target := _dynamic_target(node)) is not None:
            if target.startswith("."):
                target = _absolute(target.lstrip(".") or None, len(target) - len(target.lstrip(".")), package)
            out.add(_known(target, mods))
    return {m for m in out if m is not None and m != module}


def import_graph(root: Path, packages: tuple[str, ...], type_only: bool = True) -> dict[str, set[str]]:
    mods = modules_under(root, packages)
    graph = {m: imports_of(m, f, mods, type_only) for m, f in mods.items()}
    # a package's __init__ re-exporting its own modules is not a circle with them
    return {m: {d for d in ds if not m.startswith(d + ".")} for m, ds in graph.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (``[a, b, ..., a]``), or None when the graph is a DAG."""
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (found := visit(d, path + [d])):
                return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m, [m])):
            return found
    return None


# --------------------------------------------------------------------------- the real tree
def test_the_import_graph_of_dpflat_and_landscape_is_a_dag():
    """Every import counts here, type-only and function-level ones too: a reader of the code
    sees them as arrows. landscape never imports dpflat."""
    graph = import_graph(REPO, PACKAGES)
    assert len(graph) > 50 and sum(map(len, graph.values())) > 100  # the tree was read, not skipped
    for m, deps in graph.items():
        if m.startswith("landscape"):
            assert not any(d.startswith("dpflat") for d in deps), f"{m} imports {deps}"
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_training_path_imports_only_downwards():
    """No import circle between the loops (train <-> blackbox) or between ledger and engine."""
    mods = modules_under(REPO, PACKAGES)
    level = {m: i for i, layer in enumerate(_LAYERS) for m in layer}
    assert set(level) <= set(mods), set(level) - set(mods)
    for m, i in level.items():
        for dep in imports_of(m, mods[m], mods, type_only=False):
            if dep in level:
                assert level[dep] < i, f"{m} imports {dep} (a layer not below it)"
    assert not any(d.startswith("dpflat.blackbox") for d in imports_of("dpflat.train", mods["dpflat.train"], mods))


# --------------------------------------------------------------------------- planted cycles
_BACK_EDGES = {
    "import a.b": "import pkg.a\n",
    "import a.b as c": "import pkg.a as other\n",
    "from a import b": "from pkg import a\n",
    "from a.b import name": "from pkg.a import THING\n",
    "from . import x": "from . import a\n",
    "from .x import name": "from .a import THING\n",
    "from .. import x (in a subpackage)": "from .. import a\n",  # b lives in pkg/sub/ for this one
    "function-level": "def f():\n    from pkg.a import THING\n    return THING\n",
    "TYPE_CHECKING": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import THING\n",
    "importlib.import_module": "import importlib\n\ndef f():\n    return importlib.import_module('pkg.a')\n",
    "import_module": "from importlib import import_module\nA = import_module('pkg.a')\n",
    "import_module relative": "import importlib\nA = importlib.import_module('.a', __package__)\n",
    "__import__": "A = __import__('pkg.a')\n",
    # the f-string names at least pkg.plugins, whose __init__ imports pkg.a
    "f-string prefix": "import importlib\n\ndef f(n):\n    return importlib.import_module(f'pkg.plugins.{n}')\n",
}


def _plant(tmp_path: Path, back_edge: str | None, form: str) -> dict[str, set[str]]:
    """pkg.a imports pkg.b (plainly); pkg.b imports pkg.a back in the form under test (None: not at all)."""
    pkg = tmp_path / "pkg"
    sub = form.startswith("from .. import")
    b_dir = pkg / "sub" if sub else pkg
    b_dir.mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""A synthetic package: import pkg.a is only text in a docstring."""\n')
    if sub:
        (b_dir / "__init__.py").write_text("")
    (pkg / "plugins").mkdir()
    (pkg / "plugins" / "__init__.py").write_text("from pkg import a\n")
    b_mod = "pkg.sub.b" if sub else "pkg.b"
    (pkg / "a.py").write_text(f"from {b_mod.rpartition('.')[0]} import b\nTHING = 1\n")
    (b_dir / "b.py").write_text("# import pkg.a  (a comment is no arrow)\nX = 'import pkg.a'\n" + (back_edge or ""))
    return import_graph(tmp_path, ("pkg",))


@pytest.mark.parametrize("form", list(_BACK_EDGES))
def test_a_planted_cycle_is_found_in_every_import_form(tmp_path, form):
    cycle = find_cycle(_plant(tmp_path, _BACK_EDGES[form], form))
    assert cycle is not None and "pkg.a" in cycle, form
    assert cycle[0] == cycle[-1] and len(cycle) >= 3


@pytest.mark.parametrize("form", ["from a import b", "from .. import x (in a subpackage)"])
def test_without_the_back_edge_there_is_no_cycle(tmp_path, form):
    """The control: strings, comments and docstrings that read like imports are no arrows."""
    graph = _plant(tmp_path, None, form)
    assert find_cycle(graph) is None
    b = "pkg.sub.b" if form.startswith("from ..") else "pkg.b"
    assert graph["pkg.a"] == {b} and graph[b] == set() and graph["pkg.plugins"] == {"pkg.a"}


# --------------------------------------------------------------------------- module size
MAX_MODULE_LINES = 500


def test_no_dpflat_module_is_over_500_lines():
    """A module says one job; past a screenful of screens it is two (issue 28: models.py and config.py
    were split by job). ``landscape/`` is left out: its spectrum routines share one recurrence."""
    long = {str(p.relative_to(REPO)): n for p in sorted((REPO / "dpflat").rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"
