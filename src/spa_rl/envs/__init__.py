"""The text games: Sokoban, FrozenLake and Sudoku, as gymnasium envs with text in and out.

    env = spa_rl.envs.make("sokoban", render_mode="grid+coords")   # or gymnasium.make("spa_rl/Sokoban-v0")
    state, info = env.reset(seed=spa_rl.envs.seeds.level_seed("train", 0))
    state, reward, terminated, truncated, info = env.step("Up")

Importing this package registers the gymnasium ids `spa_rl/Sokoban-v0`, `spa_rl/FrozenLake-v0`
and `spa_rl/Sudoku-v0`. This layer imports numpy and gymnasium only (never torch); rules,
level formats and deviations from the reference are documented in each env's class docstring
and in docs/envs.md.
"""

from __future__ import annotations

import inspect
from typing import Any

import gymnasium

from spa_rl.envs.base import RENDER_MODES, TextGameEnv
from spa_rl.envs.frozenlake import FrozenLakeEnv
from spa_rl.envs.seeds import level_seed
from spa_rl.envs.sokoban import SokobanEnv
from spa_rl.envs.sudoku import SudokuEnv
from spa_rl.errors import ConfigError, UnknownEnvError

ENV_NAMES = ("sokoban", "frozenlake", "sudoku")
_CLASSES: dict[str, type[TextGameEnv]] = {"sokoban": SokobanEnv, "frozenlake": FrozenLakeEnv, "sudoku": SudokuEnv}
GAMES_WITH_DISTANCE = tuple(name for name in ENV_NAMES if _CLASSES[name].reports_distance)
GYMNASIUM_IDS = {"sokoban": "spa_rl/Sokoban-v0", "frozenlake": "spa_rl/FrozenLake-v0", "sudoku": "spa_rl/Sudoku-v0"}

__all__ = [
    "ENV_NAMES",
    "GAMES_WITH_DISTANCE",
    "GYMNASIUM_IDS",
    "RENDER_MODES",
    "FrozenLakeEnv",
    "SokobanEnv",
    "SudokuEnv",
    "TextGameEnv",
    "env_class",
    "env_options",
    "level_seed",
    "make",
    "register_gymnasium_envs",
]


def env_class(name: str) -> type[TextGameEnv]:
    """The env class called `name` (case-insensitive); `UnknownEnvError` if there is none."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in _CLASSES:
        raise UnknownEnvError(f"unknown environment {name!r}; known environments: {', '.join(ENV_NAMES)}")
    return _CLASSES[key]


def env_options(name: str) -> tuple[str, ...]:
    """The option names `make(name, ...)` accepts."""
    params = inspect.signature(env_class(name).__init__).parameters
    return tuple(p for p in params if p != "self")


def make(name: str, **options: Any) -> TextGameEnv:
    """A new env of game `name` ("sokoban", "frozenlake", "sudoku"; case-insensitive).

    Unknown option names raise `ConfigError` listing the accepted ones; bad values raise
    `ConfigError` naming the option.
    """
    cls = env_class(name)
    known = env_options(name)
    for key in options:
        if key not in known:
            raise ConfigError(f"{key}: not an option of {cls.name}; options are {', '.join(known)}")
    return cls(**options)


def register_gymnasium_envs() -> None:
    """Register the three gymnasium ids (idempotent; also the `gymnasium.envs` entry point)."""
    for name, env_id in GYMNASIUM_IDS.items():
        if env_id not in gymnasium.registry:
            cls = _CLASSES[name]
            gymnasium.register(id=env_id, entry_point=f"{cls.__module__}:{cls.__name__}", nondeterministic=False)


register_gymnasium_envs()
