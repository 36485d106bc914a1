"""Every file name of a run folder, written down once.

Why a module of its own: ``RunDir`` (``folder.py``) and the checkpoint format
(``checkpoints.py``) build their paths from these names, and the test that keeps every
other module from opening run files (``tests/test_run_files.py``) reads the list from here.
"""

from __future__ import annotations

CONFIG = "config.json"
METRICS = "metrics.jsonl"
LEDGER = "ledger.json"
#: private statistics of a finished run (batch sizes, read counts, split overlaps): not covered
PRIVATE_DIAGNOSTICS = "private_diagnostics.json"
RESULT = "result.json"
MODEL = "model.safetensors"
BEST = "best.safetensors"
LAST = "last.safetensors"
TEST_PREDICTIONS = "test_predictions.npz"
SHARPNESS = "sharpness.jsonl"
MIA = "mia.json"
CANARIES = "canaries.json"
AUDIT = "audit.json"
LANDSCAPE_DIR = "landscape"
LANDSCAPE = "landscape.json"
SURFACE = "surface"  # landscape/surface.npz + .json: the analysis' own surface
#: landscape/<this>.npz + .json: a surface along other axes (``analysis.axis_surface``: "eigen", "interp"),
#: one per axes and settings
AXIS_SURFACE = "surface_{axes}_g{grid}_n{n_examples}_s{seed}"
LOCK = ".lock"
# the checkpoint format (checkpoints.py)
LATEST = "LATEST"
CHECKPOINT_PREFIX = "ckpt-"
CHECKPOINT_TRAINABLE = "trainable.safetensors"
CHECKPOINT_STATE = "state.pt"

#: the names a module outside dpflat.runs must not open (tests/test_run_files.py); not LOCK, a
#: suffix the results table's lock file shares
ALL = (CONFIG, METRICS, LEDGER, PRIVATE_DIAGNOSTICS, RESULT, MODEL, BEST, LAST, TEST_PREDICTIONS, SHARPNESS, MIA,
       CANARIES, AUDIT, LANDSCAPE, LATEST, CHECKPOINT_TRAINABLE, CHECKPOINT_STATE)
