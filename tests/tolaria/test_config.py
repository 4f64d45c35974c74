"""Config schema: precedence defaults < file < overrides, and errors that name key and type."""

from __future__ import annotations

from pathlib import Path

import pytest

from esper.tolaria.config import (
    Config,
    ConfigError,
    architecture_of,
    from_dict,
    load_config,
    parse_override,
    to_dict,
    to_yaml,
)

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_precedence_defaults_file_overrides(tmp_path):
    defaults = Config()
    path = write(tmp_path, "optim:\n  lr: 0.2\n  momentum: 0.5\nmodel:\n  width: 48\n")
    from_file = load_config(path)
    assert from_file.optim.lr == 0.2 and from_file.optim.momentum == 0.5 and from_file.model.width == 48
    assert from_file.optim.weight_decay == defaults.optim.weight_decay  # untouched key keeps its default
    both = load_config(path, ["optim.lr=0.01", "model.width=64"])
    assert both.optim.lr == 0.01 and both.model.width == 64
    assert both.optim.momentum == 0.5  # file still wins over the default where no override is given


def test_override_values_are_typed_by_yaml(tmp_path):
    cfg = load_config(None, ["train.epochs=3", "optim.nesterov=true", "seeds.sites=[hidden.0]",
                             "optim.lr=1", "lifecycle.min_contribution_per_site.hidden.1=0.5"])
    assert cfg.train.epochs == 3 and cfg.optim.nesterov is True and cfg.seeds.sites == ["hidden.0"]
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1.0  # an int is a valid float
    assert cfg.lifecycle.min_contribution_per_site == {"hidden.1": 0.5}
    assert load_config(None, ["optim.lr=1e-3"]).optim.lr == 1e-3  # YAML 1.1 reads this as a string


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lrr=0.1"], "unknown config key 'optim.lrr'"),
        (["nonsense=1"], "unknown config key 'nonsense'"),
        (["optim.lr=fast"], "optim.lr: expected float, got str 'fast'"),
        (["model.width=1.5"], "model.width: expected int, got float 1.5"),
        (["train.amp=3"], "train.amp: expected bool, got int 3"),
        (["seeds.sites=hidden.0"], "seeds.sites: expected list of string"),
        (["data.name=imagenet"], "data.name: unknown value 'imagenet'; expected one of: digits"),
        (["model.name=vit"], "model.name: unknown value 'vit'"),
        (["train.epochs=0"], "train.epochs: expected an int >= 1"),
        (["optim.lr"], "expected KEY=VALUE"),
        (["controller.policy=oracle"], "controller.policy: unknown value 'oracle'; expected one of: heuristic"),
        (["controller.cooldown_epochs=soon"], "controller.cooldown_epochs: expected int, got str 'soon'"),
        (["seeds.blueprints=[residual_mlp]", "controller.blueprints=[conv_3x3]"],
         "seeds.blueprints ['residual_mlp'] and controller.blueprints ['conv_3x3'] disagree"),
    ],
)
def test_bad_overrides_name_key_and_type(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_controller_section_is_tamiyo_policy_settings():
    from esper.tamiyo.settings import PolicySettings, policy_settings_from_mapping
    from esper.tolaria.config import policy_config

    cfg = load_config(None, ["controller.max_concurrent=3", "seeds.blueprints=[residual_mlp]"])
    assert type(cfg.controller) is PolicySettings  # the type itself, so its defaults are the only ones
    assert load_config(None).controller == PolicySettings()
    settings = policy_settings_from_mapping(policy_config(cfg))  # what Tamiyo reads from the run
    assert settings.max_concurrent == 3 and settings.blueprints == ["residual_mlp"]
    with pytest.raises(ValueError, match="policy expected one of"):
        policy_settings_from_mapping({"policy": "oracle"})


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(write(tmp_path, "optim:\n  lr: [0.1\n"))
    with pytest.raises(ConfigError, match="expected a mapping of sections at the top level"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="unknown config key 'optim.learning_rate'"):
        load_config(write(tmp_path, "optim:\n  learning_rate: 0.1\n"))
    with pytest.raises(ConfigError, match="optim: expected a mapping of keys"):
        load_config(write(tmp_path, "optim: 3\n"))


def test_round_trip_and_architecture():
    cfg = load_config(REPO / "configs" / "development.yaml")
    again = from_dict(to_dict(cfg))
    assert to_yaml(again) == to_yaml(cfg)
    arch = architecture_of(cfg)
    assert arch["model.width"] == cfg.model.width and "optim.lr" not in arch


@pytest.mark.parametrize("name", ["development", "mnist1d", "cifar10", "cifar100"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert cfg.run_name == name


def test_parse_override_keeps_equals_in_value():
    assert parse_override("run_name=a=b") == ("run_name", "a=b")


def test_yaml_1_1_words_stay_strings_for_string_keys(tmp_path):
    # `off`/`no`/`yes` are strings (YAML 1.2 booleans are only true/false).
    from esper.tolaria.config import parse_override

    assert parse_override("services.mode=off") == ("services.mode", "off")
    assert parse_override("train.deterministic=true") == ("train.deterministic", True)
    assert parse_override("x.y=False") == ("x.y", False)


def test_growth_section_is_the_controllers_growth_config():
    from esper.kasmina.growth.config import GrowthConfig
    from esper.tamiyo.settings import policy_settings_from_mapping
    from esper.tolaria.config import from_dict, policy_config, to_dict

    cfg = load_config(None, ["growth.modes=[width, branch]", "growth.width_units=3"])
    assert cfg.growth is cfg.controller.growth and type(cfg.growth) is GrowthConfig
    assert load_config(None).growth == GrowthConfig()  # one set of defaults: Kasmina's
    values = to_dict(cfg)
    assert list(values)[-1] == "growth" and "growth" not in values["controller"]  # written as users write it
    assert values["growth"]["modes"] == ["width", "branch"]
    assert from_dict(values).growth == cfg.growth
    settings = policy_settings_from_mapping(policy_config(cfg))  # what Tamiyo reads from the run
    assert settings.growth == cfg.growth and settings.heuristic().growth == cfg.growth


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["controller.growth.modes=[width]"], "controller.growth: this is the growth section; expected it written as growth"),
        (["growth.init=foo"], "growth.init: unknown value 'foo'; expected one of: gradmax, tiny, random"),
        (["growth.modes=[sideways]"], "growth.modes[0]: unknown value 'sideways'; expected one of: branch, width, depth"),
        (["growth.optimizer_fill=ones"], "growth.optimizer_fill: unknown value 'ones'; expected one of: zero, stats"),
        (["growth.width_units=-1"], "growth.width_units: must be >= 0, got -1"),
    ],
)
def test_growth_keys_are_checked_under_their_names(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_configs_written_with_flat_controller_growth_keys_still_load():
    from esper.tolaria.config import from_dict, to_dict

    # esper-train wrote controller.growth_modes/width_units/width_factor before the growth section
    # became the controller's; they never took effect (growth.* always won) and still do not.
    old = to_dict(load_config(None, ["growth.width_units=5"]))
    old["controller"].update(growth_modes=["branch"], width_units=0, width_factor=1.0)
    assert from_dict(old).growth.width_units == 5


def test_policy_config_mappings_read_the_growth_section_and_the_old_flat_keys():
    from esper.kasmina.growth.config import GrowthConfig
    from esper.tamiyo.settings import policy_settings_from_mapping

    nested = policy_settings_from_mapping({"growth": {"modes": ["width"], "width_factor": 2}})
    assert nested.growth == GrowthConfig(modes=["width"], width_factor=2.0)
    flat = policy_settings_from_mapping({"growth_modes": ["width"], "width_units": 4})
    assert flat.growth == GrowthConfig(modes=["width"], width_units=4)
    with pytest.raises(ValueError, match="policy config: growth.modes: unknown value 'x'"):
        policy_settings_from_mapping({"growth": {"modes": ["x"]}})
    with pytest.raises(ValueError, match="policy config: growth.depth: unknown key"):
        policy_settings_from_mapping({"growth": {"depth": 1}})
    with pytest.raises(ValueError, match="both set"):
        policy_settings_from_mapping({"growth_modes": ["width"], "growth": {"modes": ["branch"]}})


def test_policy_settings_take_the_policy_and_rails_defaults():
    from esper.tamiyo.policy import HeuristicConfig, RailsConfig
    from esper.tamiyo.settings import PolicySettings

    # Tolaria's controller section is PolicySettings; its flat knobs default to the heuristic's and
    # the rails' own defaults (defined there only), so an empty section builds exactly those.
    assert PolicySettings().heuristic() == HeuristicConfig()
    assert PolicySettings().rails() == RailsConfig()
