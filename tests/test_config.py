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
