"""``python -m dpflat``: Ctrl-C during the imports (seconds of torch/transformers) exits 130, quietly."""

import sys

try:
    from .cli import main
except KeyboardInterrupt:  # pragma: no cover - timing dependent; tests/test_bad_inputs.py sends SIGINT
    print("dpflat: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
