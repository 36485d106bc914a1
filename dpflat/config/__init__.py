"""Run configuration: one validated dataclass per concern (a package, one module per job).

Every field is also a CLI flag (see ``cli.py``), so a bad value must fail here, at
construction, with one clear line (``ConfigError``) rather than deep inside a run.
Each field carries its help text in its metadata (the flag's ``--help`` comes from
there and nowhere else), and every value is checked against the field's annotation
(``bool``, ``int``, ``float``, ``Literal[...]``, ``X | None``) before the section's own
range checks: a JSON ``"enabled": "no"`` or ``"batch_size": "64"`` is refused by name
instead of being taken as true or reaching the DataLoader.

The modules, lowest first: ``_fields`` (errors, ``_opt``, the type check, frozen sections),
``sections`` (data, model, privacy, flat, train, blackbox), ``run`` (``RunConfig``, its JSON
form and ``identity_dict``), ``variants`` (named variants and the paper preset). Every name
is importable from ``dpflat.config`` itself, as before the split.
"""

from __future__ import annotations

from ._fields import (MAX_GRID, WHEN_SET, ConfigError, LevelGated, FrozenConfigError, UnknownName, check_device,
                      check_run_name, check_types, field_types, section, split_optional, warn)
from .sections import (MAX_LR, BlackBoxConfig, DataConfig, FlatConfig, Mode, ModelConfig, PrivacyConfig,
                       TrainConfig, ZOOptimizer)
from .run import SECTIONS, RunConfig, as_run_config, identity_dict, non_identity_fields
from .variants import (MODES, NO_MODE_VARIANTS, NONPRIVATE_VARIANTS, PAPER_AWP_GAMMA, PAPER_DROPPED_LAYERS,
                       PAPER_DROPPED_OTHER, PAPER_N_LAYERS, PAPER_PRESET, PRESETS, VARIANTS, apply_preset,
                       apply_variant, check_variant, levels_names, paper_keep_layers, variant_name)

__all__ = [
    "PRESETS",
    "PAPER_PRESET",
    "apply_preset",
    "paper_keep_layers",
    "ConfigError",
    "check_device",
    "check_run_name",
    "field_types",
    "split_optional",
    "DataConfig",
    "ModelConfig",
    "PrivacyConfig",
    "FlatConfig",
    "TrainConfig",
    "BlackBoxConfig",
    "RunConfig",
    "SECTIONS",
    "VARIANTS",
    "MODES",
    "NO_MODE_VARIANTS",
    "NONPRIVATE_VARIANTS",
    "apply_variant",
    "as_run_config",
    "check_variant",
    "levels_names",
    "variant_name",
    "FrozenConfigError",
    "MAX_GRID",
    "WHEN_SET",
    "LevelGated",
    "UnknownName",
]
