"""The whole run config (``RunConfig``): its sections, its JSON form (``to_dict``/``from_dict``,
``load``/``save``, ``replace``) and its identity (``identity_dict``: what run ids hash)."""

from __future__ import annotations

import difflib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ._fields import NOT_RECORDED, WHEN_SET, ConfigError, LevelGated, UnknownName, _check, _frozen
from .sections import BlackBoxConfig, DataConfig, FlatConfig, ModelConfig, PrivacyConfig, TrainConfig


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs; serialised as the run folder's config.json."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    flat: FlatConfig = field(default_factory=FlatConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    variant: str = "custom"
    blackbox: BlackBoxConfig = field(default_factory=BlackBoxConfig)

    def __post_init__(self) -> None:
        for sect, klass in SECTIONS.items():
            _check(isinstance(getattr(self, sect), klass), f"RunConfig.{sect} must be a {klass.__name__}, got "
                   f"{type(getattr(self, sect)).__name__} (RunConfig.from_dict reads a dict)")
        _check(isinstance(self.variant, str) and bool(self.variant), f"variant must be a name, got {self.variant!r}")
        _check(not (self.paper_awp and self.train.group_by_length == "on"),
               "paper-mode AWP takes its ascent step on a logical batch's first physical batch, which grouping by "
               "length would make its shortest sentences: use --group-by-length auto or off")
        bb = self.blackbox
        if not bb.active:
            return
        _check(self.train.sharpness_every == 0,
               "the sharpness trajectory (--sharpness-every) needs white-box access to the Hessian of the prefix; "
               "the black-box path has none: leave it out")
        _check(not (self.flat.awp or self.flat.layers),
               "black-box runs support only cross-model flattening (--distill): --awp and --layers need "
               "white-box access to the prefix layers")
        _check(not (self.privacy.enabled and not self.privacy.poisson),
               "black-box DP needs Poisson sampling (--poisson): the accountant assumes it")
        _check(not (bb.zo_optimizer == "cma" and self.privacy.enabled),
               "zo_optimizer cma is non-private only (CMA-ES has no per-example clipping); use sgd or adam with DP")
        _check(not (bb.zo_optimizer == "cma" and self.flat.distill),
               "zo_optimizer cma does not take the distillation term; use sgd or adam with --distill")

    @property
    def paper_awp(self) -> bool:
        return self.flat.awp and self.flat.awp_mode == "paper"

    @property
    def grouped(self) -> bool:
        """Whether training cuts its logical batches by length (``train.group_by_length`` resolved)."""
        return self.train.group_by_length == "on" or (self.train.group_by_length == "auto" and not self.paper_awp)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.blackbox == BlackBoxConfig():  # white-box configs (and their run ids) stay as before
            d.pop("blackbox")
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "RunConfig":
        """A config from its JSON form; misspelt sections or fields and wrong types are refused by name."""
        _check(isinstance(d, dict), f"a run config must be a JSON object with the sections "
                                    f"{', '.join(SECTIONS)}, got a {type(d).__name__}")
        unknown = [k for k in d if k not in SECTIONS and k != "variant"]
        if unknown:
            raise UnknownName(f"unknown config section {_unknown(unknown, [*SECTIONS, 'variant'])}",
                              f"section {unknown[0]!r}")
        kwargs: dict[str, Any] = {}
        for sect, klass in SECTIONS.items():
            sub = d.get(sect, {})
            _check(isinstance(sub, dict), f"config section {sect} must be an object of fields, got {sub!r}")
            known = [f.name for f in fields(klass)]
            unknown = [k for k in sub if k not in known]
            if unknown:
                raise UnknownName(f"unknown {sect} field {_unknown(unknown, known)}", f"{sect}.{unknown[0]}")
            kwargs[sect] = klass(**sub)
        if "variant" in d:
            _check(isinstance(d["variant"], str) and bool(d["variant"]), f"variant must be a name, got {d['variant']!r}")
            kwargs["variant"] = d["variant"]
        return cls(**kwargs)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        """Read a JSON config file; every way it can be unreadable is one line naming the file."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except IsADirectoryError:
            raise ConfigError(f"{p} is a folder, not a JSON config file") from None
        except FileNotFoundError:
            raise ConfigError(f"{p} does not exist") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{p} is not UTF-8 text: is it a JSON config file?") from None
        except OSError as e:
            raise ConfigError(f"cannot read {p}: {e.strerror}") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        try:
            return cls.from_dict(d)
        except UnknownName as e:  # kept apart: a run folder's reader says "written by a newer dpflat"
            raise UnknownName(f"{p}: {e}", e.name) from None
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
        except TypeError as e:  # pragma: no cover - a bug of ours, never of the file
            raise ConfigError(f"{p}: {e}") from None

    def replace(self, **sections: dict[str, Any]) -> "RunConfig":
        """Copy with some fields of some sections changed: ``cfg.replace(privacy={"epsilon": 3})``."""
        d = self.to_dict()
        for sect, changes in sections.items():
            if sect == "variant":
                d["variant"] = changes
            else:
                d.setdefault(sect, {}).update(changes)  # "blackbox" is absent from white-box dicts
        return RunConfig.from_dict(d)


RunConfig.__setattr__ = RunConfig.__delattr__ = _frozen("run")


def as_run_config(cfg: Any) -> RunConfig:
    """The run config an entry point was given: a ``RunConfig``, or its dict form (validated by name).

    Why: ``train({"privacy": {...}})`` died with an AttributeError deep inside; anything else is
    one line that says what is expected.
    """
    if isinstance(cfg, RunConfig):
        return cfg
    if isinstance(cfg, dict):
        return RunConfig.from_dict(cfg)
    raise ConfigError(f"a run needs a RunConfig (or its dict form), got a {type(cfg).__name__}")


def _unknown(names: list[str], known: list[str]) -> str:
    """``'privac' (did you mean 'privacy'?; known: ...)``: the first unknown name and the way out."""
    name = str(names[0])
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"
    more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
    return f"{name!r}{more}: {hint}"


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "privacy": PrivacyConfig,
    "flat": FlatConfig,
    "train": TrainConfig,
    "blackbox": BlackBoxConfig,
}


def non_identity_fields() -> dict[str, tuple[str, ...]]:
    """Per section, the fields marked ``identity=False`` (the one list of them)."""
    return {name: tuple(f.name for f in fields(klass) if not f.metadata.get("identity", True))
            for name, klass in SECTIONS.items()}


def identity_dict(d: dict[str, Any]) -> dict[str, Any]:
    """A config's JSON form (``RunConfig.to_dict``) without its non-identity fields: what run
    ids hash and what two configs of one run folder must agree on."""
    d = json.loads(json.dumps(d))
    for sect, names in non_identity_fields().items():
        for k in names:
            if isinstance(d.get(sect), dict):
                d[sect].pop(k, None)
    for sect, klass in SECTIONS.items():  # fields added later: only a value other than the default counts
        for f in fields(klass):
            if f.metadata.get("identity") == WHEN_SET and isinstance(d.get(sect), dict) \
                    and f.name in d[sect] and d[sect][f.name] == f.default:
                d[sect].pop(f.name)
    flat = d.get("flat") if isinstance(d.get("flat"), dict) else {}
    for sect, klass in SECTIONS.items():  # a level's settings where the level is off: at their recorded value
        for f in fields(klass):
            gate = f.metadata.get("identity")
            if isinstance(gate, LevelGated) and isinstance(d.get(sect), dict) and not flat.get(gate.level, False):
                if gate.legacy == NOT_RECORDED:
                    d[sect].pop(f.name, None)
                else:
                    d[sect][f.name] = gate.legacy
    return d
