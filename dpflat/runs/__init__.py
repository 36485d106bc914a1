"""Run folders and the results table, one module per job.

- ``names``: every file name of a run folder, once;
- ``folder``: ``RunDir``, the only reader and writer of a run folder's files (run ids, the lock);
- ``checkpoints``: the crash-safe checkpoint format ``RunDir`` saves and resumes from;
- ``table``: ``results.parquet`` beside the run folders, and its one locked writer;
- ``finish``: a finished run's ``result.json`` and row, and reading them back;
- ``_io``: atomic writes and their one-line errors.

The names below are what callers import (``from dpflat.runs import RunDir, load_results``).
"""

from __future__ import annotations

from ._io import RunFolderError, atomic_write_text, prepare_output_dir, retrain_hint
from .finish import finish_run, finished_result
from .folder import RunDir, RunLocked, run_id
from .names import TEST_PREDICTIONS
from .table import (LANDSCAPE_COLUMNS, LOCK_TIMEOUT, RESULTS, append_result, ensure_result, load_results,
                    modify_results, rebuild_results, update_result)

__all__ = [
    "LANDSCAPE_COLUMNS", "LOCK_TIMEOUT", "RESULTS", "TEST_PREDICTIONS", "RunDir", "RunFolderError", "RunLocked",
    "append_result", "atomic_write_text", "ensure_result", "finish_run", "finished_result", "load_results",
    "modify_results", "prepare_output_dir", "rebuild_results", "retrain_hint", "run_id", "update_result"]
