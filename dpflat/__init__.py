"""dpflat: differentially private prefix-tuning through loss-landscape flatness.

The public API (what notebooks and users import)::

    import dpflat as dp
    from dpflat.train import train
    from dpflat.sweep import sweep
    cfg = dp.apply_variant(dp.RunConfig(), "dpflat", mode="safe").replace(privacy={"epsilon": 3})
    row = train(cfg)                          # run folder + results row
    table = sweep(cfg, ["dp", "dpflat"], [3, 8], [0, 1])
    dp.summarize(table)                       # mean ± std per variant x ε, with guarantees
    dp.analyze_run(row["run_dir"])            # Hessian spectrum + 2D surface of a run

Heavy modules load on first use, so ``import dpflat`` stays fast. ``train``, ``sweep``
and ``evaluate`` are submodules (``dpflat.train`` is the module), so their functions
are imported from them, never as package attributes that a submodule import would
shadow.
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import (  # noqa: F401  (light: dataclasses only)
    MODES,
    VARIANTS,
    ConfigError,
    DataConfig,
    FlatConfig,
    ModelConfig,
    PrivacyConfig,
    RunConfig,
    TrainConfig,
    apply_variant,
    variant_name,
)

__version__ = "0.1.0"

_LAZY = {
    "prepare_data": ("session", "prepare_data"),
    "cells": ("sweep", "cells"),
    "summarize": ("sweep", "summarize"),
    "load_results": ("runs", "load_results"),
    "RunDir": ("runs", "RunDir"),
    "build_model": ("models", "build_model"),
    "load_tokenizer": ("models", "load_tokenizer"),
    "evaluate_model": ("evaluate", "evaluate"),
    "per_example_losses": ("evaluate", "per_example_losses"),
    "PrivacyLedger": ("privacy", "PrivacyLedger"),
    "epsilon_for": ("engine", "epsilon_for"),
    "noise_for_target": ("engine", "noise_for_target"),
    "TASKS": ("data", "TASKS"),
    "get_task": ("data", "get_task"),
    "load_run": ("analysis", "load_run"),
    "analyze_run": ("analysis", "analyze_run"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{mod}", __name__), attr)
    raise AttributeError(f"module 'dpflat' has no attribute {name!r}")


__all__ = [
    "MODES", "VARIANTS", "ConfigError", "DataConfig", "FlatConfig", "ModelConfig", "PrivacyConfig",
    "RunConfig", "TrainConfig", "apply_variant", "variant_name", *_LAZY,
]
