"""Typed configs: defaults < YAML < flags; every error names its field or file."""

from dataclasses import dataclass

import pytest
import yaml

from spa_rl.config import build_parser, load_config, option, save_config
from spa_rl.errors import ConfigError


@dataclass
class Demo:
    env: str = option("sokoban", "game", choices=("sokoban", "frozenlake"))
    steps: int = option(10, "steps")
    lr: float = option(1e-4, "learning rate")
    lora: bool = option(False, "use LoRA")
    budget: int | None = option(None, "optional budget")

    def check(self):
        return [f"steps must be >= 1, got {self.steps}"] if self.steps < 1 else []


def parse(argv):
    return load_config(Demo, build_parser(Demo).parse_args(argv))


def test_defaults_and_flags():
    assert parse([]) == Demo()
    cfg = parse(["--steps", "3", "--lr", "0.5", "--lora", "--budget", "7"])
    assert (cfg.steps, cfg.lr, cfg.lora, cfg.budget) == (3, 0.5, True, 7)


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 4\nenv: frozenlake\n")
    cfg = parse(["--config", str(path), "--steps", "9"])
    assert (cfg.env, cfg.steps) == ("frozenlake", 9)


def test_unknown_yaml_key_fails_by_name(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stepz: 4\n")
    with pytest.raises(ConfigError, match="stepz"):
        parse(["--config", str(path)])


def test_bad_values_are_all_reported(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: many\nlr: fast\n")
    with pytest.raises(ConfigError) as err:
        parse(["--config", str(path)])
    assert "steps" in str(err.value) and "lr" in str(err.value)


def test_choices_and_check():
    with pytest.raises(ConfigError, match="env"):
        load_config(Demo, {"env": "chess"})
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        load_config(Demo, {"steps": 0})


def test_resolved_config_round_trips(tmp_path):
    cfg = parse(["--steps", "5"])
    path = save_config(cfg, tmp_path)
    assert load_config(Demo, yaml_path=path) == cfg
    assert yaml.safe_load(path.read_text())["steps"] == 5


def test_invalid_yaml_names_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 4\n  bad: [\n")
    with pytest.raises(ConfigError, match="line"):
        parse(["--config", str(path)])


def test_unknown_mapping_key_fails_by_name():
    with pytest.raises(ConfigError, match="stepz"):
        load_config(Demo, {"stepz": 3})


# ---- sections: declared once, embedded in each stage -----------------------------------------

from typing import ClassVar  # noqa: E402

from spa_rl.config import config_to_dict, section  # noqa: E402


@dataclass
class Sampling:
    temperature: float = option(1.0, "temperature")
    stop_strings: tuple[str, ...] = option(("</answer>",), "stops")

    def check(self):
        return [f"temperature must be >= 0, got {self.temperature}"] if self.temperature < 0 else []


@dataclass
class Model:
    PRIMARY: ClassVar[str] = "name"
    name: str = option("default", "model")
    dtype: str = option("auto", "dtype", choices=("auto", "fp32"))


@dataclass
class Stage:
    model: Model = section(Model, "the model")
    sampling: Sampling = section(Sampling, "sampling", temperature=0.7)  # a stage-specific default
    steps: int = option(3, "steps")


def parse_stage(argv):
    return load_config(Stage, build_parser(Stage).parse_args(argv))


def test_section_defaults_dotted_flags_and_short_form():
    assert parse_stage([]).sampling.temperature == 0.7
    cfg = parse_stage(["--sampling.temperature", "0.3", "--model", "tiny", "--model.dtype", "fp32",
                       "--sampling.stop-strings", "['</a>', 'STOP']"])
    assert (cfg.sampling.temperature, cfg.model.name, cfg.model.dtype) == (0.3, "tiny", "fp32")
    assert cfg.sampling.stop_strings == ("</a>", "STOP")


def test_yaml_sections_then_flags_and_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: tiny\nsampling:\n  temperature: 0.2\nsteps: 5\n")
    cfg = parse_stage(["--config", str(path), "--sampling.temperature", "0.9"])
    assert (cfg.model.name, cfg.sampling.temperature, cfg.steps) == ("tiny", 0.9, 5)
    saved = save_config(cfg, tmp_path / "run")
    assert yaml.safe_load(saved.read_text())["sampling"] == {"temperature": 0.9, "stop_strings": ["</answer>"]}
    assert load_config(Stage, yaml_path=saved) == cfg
    assert config_to_dict(load_config(Stage, config_to_dict(cfg))) == config_to_dict(cfg)


def test_section_errors_name_the_dotted_field_and_the_closest_name():
    with pytest.raises(ConfigError, match="sampling.temperature must be >= 0"):
        load_config(Stage, {"sampling": {"temperature": -1}})
    with pytest.raises(ConfigError, match="model.dtype: 'bf8' is not one of"):
        load_config(Stage, {"model": {"dtype": "bf8"}})
    with pytest.raises(ConfigError, match="did you mean sampling.temperature"):
        load_config(Stage, {"sampling": {"temprature": 1}})
    with pytest.raises(ConfigError, match="did you mean sampling.temperature"):
        load_config(Stage, {"temperature": 1})  # the right name in a section
    with pytest.raises(ConfigError, match="sampling: expected a mapping"):
        load_config(Stage, {"sampling": 3})


def test_every_stage_field_is_a_flag_and_a_yaml_key():
    """Every field of every stage is reachable from the command line and from YAML."""
    import importlib

    from spa_rl.config import field_names

    for module in ("eval", "generate", "sft", "train"):
        cls = importlib.import_module(f"spa_rl.recipes.{module}").Config
        parser = build_parser(cls)
        flags = {a.dest for a in parser._actions}
        for name in field_names(cls):
            assert name in flags, (module, name)
        values = config_to_dict(cls())
        if module == "sft":
            values["data"] = "some/folder"  # required
        assert config_to_dict(load_config(cls, values)) == values


def test_former_names_point_to_their_new_place():
    from spa_rl.recipes import train

    with pytest.raises(ConfigError, match="actor_lr; did you mean optim.lr"):
        load_config(train.Config, {"actor_lr": 1e-5})
    with pytest.raises(ConfigError, match="did you mean eval.levels"):
        load_config(train.Config, {"val_levels": 4})
