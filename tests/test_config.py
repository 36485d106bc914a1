"""Config loading: every field is type-checked against its annotation, by name, at construction."""

from __future__ import annotations

import json
import typing
from dataclasses import fields

import pytest

from dpflat.config import (SECTIONS, VARIANTS, ConfigError, FlatConfig, RunConfig, apply_variant, check_run_name, field_types,
                           split_optional)


def _wrong_value(t):
    """A value of the wrong type for annotation ``t`` (what a careless JSON file holds)."""
    base, _ = split_optional(t)
    if typing.get_origin(base) is typing.Literal:
        return "not-a-choice"
    return {bool: "no", int: "64", float: "0.5", str: 3}[base]


@pytest.mark.parametrize("sect,name", [(s, f.name) for s, k in SECTIONS.items() for f in fields(k)])
def test_every_field_refuses_a_wrong_type_by_name(sect, name):
    t = field_types(SECTIONS[sect])[name]
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict({sect: {name: _wrong_value(t)}})
    assert f"{sect}.{name} must be" in str(e.value) and "\n" not in str(e.value)


def test_json_round_trip_of_every_variant_is_exact():
    for v in VARIANTS:
        for mode in ("safe", "paper"):
            cfg = apply_variant(RunConfig(), v, mode)
            again = RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
            assert again == cfg


def test_ints_stay_ints_and_floats_accept_ints():
    """A float field given 500 keeps 500 (run ids hash the JSON: 500 and 500.0 would differ)."""
    cfg = RunConfig.from_dict({"data": {"public_size": 500}, "privacy": {"epsilon": 3}})
    assert cfg.data.public_size == 500 and isinstance(cfg.data.public_size, int)
    assert cfg.privacy.epsilon == 3


@pytest.mark.parametrize("d,msg", [
    ({"privac": {}}, "unknown config section 'privac': did you mean 'privacy'?"),
    ({"flat": {"awp_gama": 0.1}}, "unknown flat field 'awp_gama': did you mean 'awp_gamma'?"),
    ({"flat": {"zzz": 1, "yyy": 2}}, "(and 1 more)"),
    ({"train": []}, "config section train must be an object"),
    ({"privacy": {"delta": True}}, "privacy.delta must be a finite number or null, got True"),
    ({"train": {"num_threads": 1.5}}, "train.num_threads must be a whole number or null"),
    ({"train": {"batch_size": True}}, "train.batch_size must be a whole number, got True"),
    ({"model": {"keep_layers": 3}}, "model.keep_layers must be a string or null"),
    ({"privacy": {"epsilon": float("inf")}}, "privacy.epsilon must be a finite number"),
])
def test_bad_dicts_are_refused_by_name(d, msg):
    with pytest.raises(ConfigError, match=None) as e:
        RunConfig.from_dict(d)
    assert msg in str(e.value)


def test_optional_fields_take_null():
    cfg = RunConfig.from_dict({"privacy": {"delta": None}, "train": {"run_name": None, "num_threads": None}})
    assert cfg.privacy.delta is None and cfg.train.run_name is None


@pytest.mark.parametrize("name", ["ok", "dp_sst2_eps8_s0_abcdef12", "a.b", "x" * 200])
def test_good_run_names(name):
    check_run_name(name)


@pytest.mark.parametrize("name", ["", " x", "a/b", "..", ".", ".hidden", "a\\b", "x" * 201, "results.parquet",
                                  "results.parquet.lock", "a.tmp", "é" * 101])
def test_bad_run_names(name):
    with pytest.raises(ConfigError):
        check_run_name(name)


def test_load_names_the_file(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"privacy": {"enabled": "no"}}))
    with pytest.raises(ConfigError, match=f"^{p}: privacy.enabled must be true or false"):
        RunConfig.load(p)


def test_identity_fields_are_one_list_and_leave_run_ids_alone():
    """Only the fields marked identity=False may differ without changing the run id."""
    from dpflat.config import identity_dict, non_identity_fields
    from dpflat.runs import run_id

    neutral = non_identity_fields()
    assert neutral["train"] == ("device", "output_dir", "run_name", "num_threads", "progress")
    assert all(not v for k, v in neutral.items() if k != "train")
    base = RunConfig()
    moved = base.replace(train={"output_dir": "elsewhere", "run_name": "x", "num_threads": 1, "progress": False})
    assert run_id(moved) == run_id(base)
    assert identity_dict(moved.to_dict()) == identity_dict(base.to_dict())
    assert run_id(base.replace(train={"seed": 1})) != run_id(base)
    assert run_id(base.replace(train={"sharpness_every": 5})) != run_id(base)


def test_a_level_gated_setting_counts_only_where_its_level_is_on():
    """A setting of the cross-layer level cannot change a run without that level: changing its
    default must leave the ids of plain DP (and the committed records keyed by them) alone and
    re-identify the runs that select layers. Fails if the gate is dropped (or applied everywhere)."""
    from dpflat.config import LevelGated
    from dpflat.runs import run_id

    gated = {f.name: f.metadata["identity"] for f in fields(FlatConfig)
             if isinstance(f.metadata.get("identity"), LevelGated)}
    assert set(gated) == {"layers_directions", "layers_scorer"}
    other = {"layers_directions": 5, "layers_scorer": "warmup"}
    for variant in ("dp", "nonprivate", "dp+distill", "dp+awp"):
        cfg = apply_variant(RunConfig(), variant, "safe")
        for name in gated:
            assert run_id(cfg.replace(flat={name: other[name]})) == run_id(cfg), (variant, name)
    for variant in ("dp+layers", "dpflat"):
        cfg = apply_variant(RunConfig(), variant, "safe")
        for name in gated:
            assert run_id(cfg.replace(flat={name: other[name]})) != run_id(cfg), (variant, name)


# --------------------------------------------------------------------------- issue 26: immutable, checked labels
@pytest.mark.parametrize("sect", list(SECTIONS))
def test_every_section_is_frozen_and_replace_revalidates(sect):
    """A validated config cannot be changed in place (``cfg.privacy.epsilon = nan`` reached the run and
    its config.json); ``replace`` makes a copy that is checked like a new one."""
    from dpflat.config import FrozenConfigError

    cfg = RunConfig()
    part = getattr(cfg, sect)
    name = fields(part)[0].name
    with pytest.raises(FrozenConfigError, match=rf"cannot be changed \({sect}\.{name}\).*replace") as e:
        setattr(part, name, getattr(part, name))
    assert isinstance(e.value, ConfigError) and "\n" not in str(e.value)
    with pytest.raises(FrozenConfigError, match=r"\(variant\)"):
        cfg.variant = "dp"
    with pytest.raises(ConfigError, match="epsilon must be > 0"):
        cfg.privacy.replace(epsilon=-1.0)
    assert cfg.privacy.replace(epsilon=3.0).epsilon == 3.0 and cfg.privacy.epsilon == 8.0
    assert RunConfig().data.replace(train_size=0).train_size is None  # the "all of it" spelling still works


def test_a_run_takes_a_config_or_its_dict_and_nothing_else():
    from dpflat.config import as_run_config

    assert as_run_config({"privacy": {"epsilon": 3}}).privacy.epsilon == 3
    with pytest.raises(ConfigError, match="got a str"):
        as_run_config("config.json")
    with pytest.raises(ConfigError, match="RunConfig.privacy must be a PrivacyConfig, got dict"):
        RunConfig(privacy={"epsilon": 3})


def test_a_variant_name_must_describe_the_config():
    """The variant goes into the run id and the table: ``{"variant": "dpflat"}`` over plain DP is refused."""
    from dpflat.config import MODES, apply_preset, check_variant, levels_names

    for v in VARIANTS:
        for mode in MODES:
            cfg = apply_variant(RunConfig(), v, mode)
            check_variant(cfg)
            check_variant(apply_preset(cfg, "paper"))  # hand-picked layers stand in for the selector
    check_variant(RunConfig.from_dict({"flat": {"awp": True}}))  # custom labels anything
    assert levels_names(RunConfig.from_dict({"flat": {"awp": True, "layers": True, "layers_mode": "paper"}})) == {
        "dp+awp.safe+layers.paper"}  # the ablation panel's name for a mix of modes
    check_variant(RunConfig.from_dict({"variant": "dp+awp-safe_g0.1", "flat": {"awp": True, "awp_gamma": 0.1}}))
    with pytest.raises(ConfigError, match=r"variant 'dpflat' does not describe this config \(its levels make it dp\)"):
        check_variant(RunConfig.from_dict({"variant": "dpflat"}))
    with pytest.raises(ConfigError, match="unknown variant 'nope'"):
        check_variant(RunConfig.from_dict({"variant": "nope"}))
    with pytest.raises(ConfigError, match="does not describe"):
        check_variant(apply_variant(RunConfig(), "dp").replace(flat={"awp": True}))


def test_a_black_box_run_refuses_the_sharpness_trajectory():
    with pytest.raises(ConfigError, match="sharpness trajectory.*black-box"):
        RunConfig.from_dict({"blackbox": {"active": True}, "train": {"sharpness_every": 5}})
    base = RunConfig().replace(train={"sharpness_every": 8})  # the notebooks' sizes record a trajectory
    assert apply_variant(base, "bb-dp").train.sharpness_every == 0  # a black-box cell of their sweep: off
    assert apply_variant(base, "dp").train.sharpness_every == 8


def test_unknown_names_say_which_for_a_newer_config():
    from dpflat.config import UnknownName

    with pytest.raises(UnknownName) as e:
        RunConfig.from_dict({"train": {"future_knob": 1}})
    assert e.value.name == "train.future_knob"


# Run ids of today's defaults, as the benchmarks' committed records know them: a refactor of the
# config (issue 28 made it a package) must leave every id as it was. Re-pinned once, when the default
# distillation weight became 1.0 (issue 27: a default is part of every run's identity).
PINNED_RUN_IDS = {
    ("custom", None, "sst2"): "custom_sst2_eps8_s0_8abe26df",
    ("dpflat", "safe", "sst2"): "dpflat-safe_sst2_eps8_s0_c15e6307",
    ("dpflat", "paper", "sst2"): "dpflat-paper_sst2_eps8_s0_db44c50e",
    ("bb-dpflat", "safe", "sst2"): "bb-dpflat-safe_sst2_eps8_s0_6a862368",
    ("nonprivate", "safe", "sst2"): "nonprivate_sst2_nonpriv_s0_74d8b8a2",
    ("dp+layers", "paper", "mpqa"): "dp+layers-paper_mpqa_eps8_s0_d5fd744a",
    ("preset paper", None, "sst2"): "dpflat-paper_sst2_eps8_s0_522ac8ba",
}


@pytest.mark.parametrize("key", list(PINNED_RUN_IDS), ids=lambda k: "-".join(str(x) for x in k))
def test_run_ids_of_the_defaults_are_pinned(key):
    from dpflat.config import apply_preset
    from dpflat.runs.folder import run_id

    variant, mode, task = key
    cfg = RunConfig().replace(data={"task": task})
    if variant == "preset paper":
        cfg = apply_preset(cfg, "paper")
    elif variant != "custom":
        cfg = apply_variant(cfg, variant, mode)
    assert run_id(cfg) == PINNED_RUN_IDS[key]


def test_the_config_package_exports_every_name_the_module_had():
    import dpflat.config as C

    names = ("ConfigError warn UnknownName FrozenConfigError MAX_GRID WHEN_SET field_types split_optional check_types "
             "section check_run_name check_device DataConfig ModelConfig PrivacyConfig Mode FlatConfig MAX_LR TrainConfig "
             "ZOOptimizer BlackBoxConfig RunConfig as_run_config SECTIONS non_identity_fields identity_dict VARIANTS "
             "NO_MODE_VARIANTS NONPRIVATE_VARIANTS MODES PAPER_AWP_GAMMA variant_name levels_names check_variant "
             "apply_variant PRESETS PAPER_DROPPED_LAYERS PAPER_DROPPED_OTHER PAPER_N_LAYERS PAPER_PRESET "
             "paper_keep_layers apply_preset LevelGated").split()
    assert [n for n in names if not hasattr(C, n)] == []
    assert set(C.__all__) <= set(names)
