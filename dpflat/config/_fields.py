"""The machinery every config section shares: errors, ``_opt`` fields (default, help, identity),
the type check against each field's annotation, frozen sections with a validating ``replace``,
and the checks of a run name and a device."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import FrozenInstanceError, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A bad configuration value; its message is one line the CLI prints as-is."""


def warn(msg: str) -> None:
    """One line on stderr: something was repaired or worked around, or looks wrong, and the run goes on."""
    import sys

    print(f"dpflat: warning: {msg}", file=sys.stderr, flush=True)


class UnknownName(ConfigError):
    """A section or field this version does not know: a typo, or a config.json a newer dpflat wrote."""

    def __init__(self, msg: str, name: str):
        super().__init__(msg)
        self.name = name


class FrozenConfigError(ConfigError, FrozenInstanceError):
    """An assignment to a validated config: configs are immutable, a changed copy comes from ``replace``."""


#: ``_opt(identity=WHEN_SET)``: in the run's identity only at a value other than its default
WHEN_SET = "when-set"

#: a gated field's marker for "absent from the identity of a run whose level is off"
NOT_RECORDED = "not-recorded"


@dataclasses.dataclass(frozen=True)
class LevelGated:
    """``_opt(identity=LevelGated("layers", legacy=3))``: a setting of one flattening level.

    Where the level (``flat.<level>``) is on, the field is part of the run's identity like any
    other; where it is off, the setting cannot change what the run computes, so it enters the
    identity at ``legacy`` -- the value run ids were first recorded with -- or not at all
    (``NOT_RECORDED``, a field added later). So changing such a default re-identifies exactly the
    runs it changes: the level's, not the plain DP and non-private runs recorded before."""

    level: str
    legacy: Any = NOT_RECORDED

#: the largest number of points per axis of a 2D loss surface (``landscape --grid``): grid² evaluations
MAX_GRID = 201


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _opt(default: Any, help: str, identity: bool | str | LevelGated = True) -> Any:  # noqa: A002 - argparse's word
    """A config field: its default, its help text (the CLI flag's ``--help``) and whether it is
    part of the run's identity, in one place. ``identity=False``: where or how a run is shown or
    executed, never what it computes (left out of run ids and of config comparisons).
    ``identity=WHEN_SET``: part of the identity only when it differs from its default -- a field
    added after runs were recorded, so that their run ids stay what they were.
    ``identity=LevelGated(level)``: counts only where that flattening level is on."""
    return field(default=default, metadata={"help": help, "identity": identity})


# --------------------------------------------------------------------------- type checks
_HINTS: dict[type, dict[str, Any]] = {}


def field_types(klass: type) -> dict[str, Any]:
    """The resolved annotations of a config dataclass (``typing.get_type_hints``, cached)."""
    if klass not in _HINTS:
        _HINTS[klass] = typing.get_type_hints(klass)
    return _HINTS[klass]


def _is_union(t: Any) -> bool:
    return typing.get_origin(t) in (typing.Union, types.UnionType)


def split_optional(t: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (t, False)."""
    if _is_union(t):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(t)) == 2:
            return args[0], True
    return t, False


def _describe(t: Any) -> str:
    if typing.get_origin(t) is Literal:
        return "one of " + "|".join(str(a) for a in typing.get_args(t))
    return {bool: "true or false", int: "a whole number", float: "a finite number", str: "a string"}.get(
        t, getattr(t, "__name__", str(t)))


def _fits(value: Any, t: Any) -> bool:
    if typing.get_origin(t) is Literal:
        return any(type(value) is type(a) and value == a for a in typing.get_args(t))
    if t is bool:
        return isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if t is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if t is str:
        return isinstance(value, str)
    return True  # an annotation we do not check (none today)


def check_types(obj: Any, section: str) -> None:
    """Every field of a config section against its annotation; the message names ``section.field``."""
    for name, t in field_types(type(obj)).items():
        value = getattr(obj, name)
        base, optional = split_optional(t)
        if value is None and optional:
            continue
        if not _fits(value, base):
            want = _describe(base) + (" or null" if optional else "")
            raise ConfigError(f"{section}.{name} must be {want}, got {value!r}")


def _frozen(where: str):
    """``__setattr__``/``__delattr__`` of a frozen config: one line that says how to get a changed copy.

    Why frozen: a config is validated once, at construction; a later assignment (``cfg.privacy.epsilon
    = nan``) would reach the run, its config.json and its id unchecked.
    """

    def refuse(self, attr: str, *value: Any) -> None:
        how = (f"cfg.replace({attr}=...)" if where == "run" else
               f"cfg.replace({where}={{{attr!r}: ...}}) or cfg.{where}.replace({attr}=...)")
        raise FrozenConfigError(f"a validated config cannot be changed ({where + '.' if where != 'run' else ''}"
                                f"{attr}): make a changed copy with {how}")

    return refuse


def section(name: str):
    """Class decorator (over ``@dataclass(frozen=True)``): the section's ``__post_init__`` runs after
    the type check of every field; assignments are refused, ``replace`` makes a validated copy."""

    def wrap(klass: type) -> type:
        own = klass.__dict__.get("__post_init__")

        def __post_init__(self) -> None:
            check_types(self, name)
            if own is not None:
                own(self)

        def replace(self, **changes: Any):
            """A copy with some fields changed, validated like a new one."""
            return dataclasses.replace(self, **changes)

        klass.__post_init__ = __post_init__
        klass.replace = replace
        klass.__setattr__ = klass.__delattr__ = _frozen(name)
        klass.section_name = name
        return klass

    return wrap


# Run names become folder names next to the results table and its lock.
_RESERVED_NAME = re.compile(r"^(results\.parquet.*|.*\.tmp|.*\.lock)$")


def check_run_name(name: str) -> None:
    """A run name is one folder name inside the output folder, never a path out of it."""
    _check(bool(name) and name.strip() == name, f"run_name must be a non-empty name without surrounding spaces, got {name!r}")
    _check("/" not in name and "\\" not in name and (os.sep not in name) and "\0" not in name,
           f"run_name must be a folder name, not a path (no / or \\), got {name!r}")
    _check(name not in (".", "..") and not name.startswith("."),
           f"run_name must not be . or .. or start with a dot, got {name!r}")
    _check(not _RESERVED_NAME.match(name), f"run_name {name!r} is reserved for the results table's own files")
    _check(len(name.encode("utf-8")) <= 200,
           f"run_name is {len(name.encode('utf-8'))} bytes long; the limit is 200 (filesystems allow 255 per name)")


def check_device(device: str) -> None:
    """The device exists on this machine (not a config check: a GPU run's config.json loads on a laptop)."""
    dev = str(device)
    _check(re.fullmatch(r"cpu|mps|cuda(:\d+)?", dev) is not None, f"device must be cpu, cuda[:N] or mps, got {device!r}")
    if dev == "cpu":
        return
    import torch

    if dev == "mps":
        mps = getattr(torch.backends, "mps", None)
        _check(mps is not None and mps.is_available(), "device mps requested but MPS is not available on this machine; use --device cpu")
        return
    _check(torch.cuda.is_available(), f"device {dev} requested but CUDA is not available on this machine; use --device cpu")
    if ":" in dev:
        idx, n = int(dev.split(":")[1]), torch.cuda.device_count()
        _check(idx < n, f"device {dev} requested but this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
