"""``python -m dpflat`` and the ``dpflat`` command: Ctrl-C at any moment exits 130 with one line.

``cli.main`` turns Ctrl-C into 130 inside its own ``try``; ``entry`` covers the rest of the
process's life: the seconds of imports before ``main`` exists, and the first lines of ``main``
before its ``try`` is entered (a SIGINT there was a traceback, found by
``tests/test_bad_inputs.py::test_ctrl_c_during_imports_exits_130_without_traceback``).
"""

import sys


def entry() -> None:
    """The process entry point (``[project.scripts]`` points here, not at ``cli.main``)."""
    try:
        from .cli import main

        rc = main()
    except KeyboardInterrupt:  # pragma: no cover - timing dependent; the test above sends SIGINT
        print("dpflat: interrupted", file=sys.stderr)
        rc = 130
    sys.exit(rc)


if __name__ == "__main__":
    entry()
