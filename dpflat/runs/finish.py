"""The finish of a run: its ``result.json`` and its row of the results table, written once, read back once.

Why apart from the folder and the table: it is the one place that joins them (a row's
columns come from the config, the ledger and the evaluations), and the white-box and
black-box loops both end here, so their runs land in the same table the same way.
"""

from __future__ import annotations

from typing import Any

from ..config import RunConfig
from ._io import RunFolderError, retrain_hint
from .folder import RunDir
from .table import append_result, ensure_result


def finished_result(rd: RunDir, cfg: RunConfig) -> dict[str, Any] | None:
    """The stored result of a finished run of ``cfg``, its row made sure of; None when not finished."""
    if not rd.done:
        return None
    rd.check_config(cfg)
    if not rd.model_file.is_file():
        raise RunFolderError(f"{rd.path} is finished but its model.safetensors is missing: "
                             f"{retrain_hint(rd.path)}")
    res = rd.result()
    ensure_result(cfg.train.output_dir, {k: v for k, v in res.items() if k != "info"})
    return res


def finish_run(cfg: RunConfig, rd: RunDir, metric: str, ledger, final: dict[str, Any], best_step: int,
               steps: int, keep_layers: str, info: dict[str, Any], *, val: dict[str, Any] | None = None,
               test_examples: dict[str, Any] | None = None, cost: dict[str, float] | None = None) -> dict[str, Any]:
    """Write a finished run's ``result.json`` and its row of the results table; return the row.

    One place for the row's columns, so white-box and black-box runs land in the same
    table the same way (the ledger decides the guarantee and whether an ε is claimed).
    ``final`` is the test split's evaluation (``accuracy`` = test accuracy); ``val`` the
    selected model on the validation split; ``test_examples`` the per-example test
    arrays, saved as ``test_predictions.npz`` for paired statistics (``dpflat.stats``).
    """
    val = val or {}
    cost = cost or {}
    if test_examples:
        rd.save_test_predictions(test_examples)
    row = {
        "run_id": rd.path.name,
        "run_dir": str(rd.path),
        "variant": cfg.variant,
        "task": cfg.data.task,
        "metric": metric,
        "seed": cfg.train.seed,
        "target_epsilon": cfg.privacy.epsilon if cfg.privacy.enabled else None,
        "epsilon": ledger.claimed_epsilon,  # None unless the run is (ε, δ)-DP
        "dpsgd_part_epsilon": ledger.dpsgd_part_epsilon,  # paper mode: the DP-SGD part alone, not the run's
        "noise_source": ledger.noise_source,
        "delta": ledger.delta,
        "sigma": ledger.noise_multiplier,
        "sample_rate": ledger.sample_rate,
        "steps": steps,
        "guarantee": ledger.guarantee,
        "accuracy": final["accuracy"],  # the test split's
        "eval_loss": final["loss"],  # alias of test_loss for readers of older tables
        "test_accuracy": final["accuracy"],
        "test_loss": final["loss"],
        "val_accuracy": val.get("accuracy", float("nan")),
        "val_loss": val.get("loss", float("nan")),
        "n_val": val.get("n", 0),
        "best_step": best_step,
        "n_private": ledger.n_private,
        "n_eval": final["n"],
        "keep_layers": keep_layers,
        "finished": True,
        **{k: float(cost[k]) for k in ("wall_s", "setup_s", "train_s", "examples_per_s", "peak_mem_mb") if k in cost},
        **({"processes": int(cost["processes"])} if "processes" in cost else {}),  # >1: resumed (times are totals)
        **{f"info_{k}": v for k, v in info.items() if isinstance(v, (int, float, str, bool))},
    }
    rd.write_result({**row, "info": info})
    append_result(cfg.train.output_dir, row)
    return row


__all__ = ["finish_run", "finished_result"]
