"""`TextGameEnv`: the common part of the three games (a `gymnasium.Env` with text in and out).

What every game shares, so that each game module only holds its rules:

- `reset(seed=...)` seeds gymnasium's `np_random` (used for in-episode randomness such as
  FrozenLake slips) and builds the level from the same seed through an independent child
  stream (`level_rng(seed)`), so level and slips never share random numbers. With
  `seed=None` the level seed is drawn from `np_random`, which keeps `reset(seed=s); reset()`
  deterministic too. An env made by `from_level_text` always resets to its fixed level.
- `step(action_text)` returns `(state_text, reward, terminated, truncated, info)`; `info` always
  holds `success`, `action_is_valid` and `action_is_effective`. Action text the game cannot
  read is *invalid*: no exception, no state change, reward 0.0, not counted as a step.
  Stepping after the episode ended changes nothing and returns reward 0.0 and the same
  `terminated`/`truncated` flags again (gymnasium leaves this undefined).
- `terminated` means the game ended (solved, fell into a hole); `truncated` means the env's own
  step cap `max_steps` was hit (reference values: Sokoban 100, Sudoku 30, FrozenLake none).
- Text renders are pure functions of the state: `render_text("grid")` (symbols only) and
  `render_text("grid+coords")` (grid, a newline, one line of coordinates). Observations are
  `render_text(self.render_mode)`.

No global random state is read or written anywhere in `spa_rl.envs`.
"""

from __future__ import annotations

import string
from typing import Any, ClassVar

import gymnasium
import numpy as np
from gymnasium import spaces

from spa_rl.envs.levels import DEFAULT_SOURCE
from spa_rl.errors import ConfigError

RENDER_MODES = ("grid", "grid+coords")

# Everything a state text or an action text may contain. '√' is the Sokoban box-on-target and
# the FrozenLake player-on-goal symbol.
TEXT_CHARSET = frozenset(string.ascii_letters + string.digits + string.punctuation + " \n√")

# Child-stream number of the level generator in the seed's SeedSequence (see `level_rng`).
_LEVEL_STREAM = 0


def check_render_mode(mode: Any) -> str:
    """`mode` if it is a known render mode, else `ConfigError`."""
    if mode not in RENDER_MODES:
        raise ConfigError(f"render_mode: unknown render mode {mode!r}; use one of {', '.join(RENDER_MODES)}")
    return mode


def check_int(name: str, value: Any, low: int, high: int | None = None, allow_none: bool = False) -> Any:
    """`value` if it is an int in `[low, high]` (or None when allowed), else `ConfigError`."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name}: expected an int, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{name}: {value} must be {bound}")
    return int(value)


def level_rng(seed: int) -> np.random.Generator:
    """The generator that builds the level of `seed`: child stream 0 of `SeedSequence(seed)`.

    gymnasium's `np_random` for the same seed is the root stream of `SeedSequence(seed)`; the
    child stream is statistically independent of it, and both are the same on every machine
    (PCG64, no dependence on `PYTHONHASHSEED`).
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed: a level seed must be a non-negative int, got {seed!r}")
    sequence = np.random.SeedSequence(int(seed), spawn_key=(_LEVEL_STREAM,))
    return np.random.Generator(np.random.PCG64(sequence))


class TextGameEnv(gymnasium.Env):
    """Base class of the text games; see the module docstring for the shared contract.

    Subclasses set the class attributes and implement the hooks marked "subclass" below.
    """

    name: ClassVar[str] = ""
    action_names: ClassVar[tuple[str, ...] | None] = None
    default_action_budget: ClassVar[int] = 10
    reports_distance: ClassVar[bool] = False
    """True where `info` carries `distance_to_goal` (a game-specific measure, 0 when solved)."""
    metadata: ClassVar[dict[str, Any]] = {"render_modes": list(RENDER_MODES), "render_fps": 4}

    def __init__(self, render_mode: str | None = "grid", max_steps: int | None = None) -> None:
        super().__init__()
        # gymnasium passes render_mode=None when none is asked for; the observation is text anyway.
        self.render_mode = check_render_mode("grid" if render_mode is None else render_mode)
        self.max_steps = check_int("max_steps", max_steps, 1, allow_none=True)
        self.action_space = spaces.Text(max_length=256, min_length=0, charset=TEXT_CHARSET)
        self.observation_space = spaces.Text(max_length=4096, min_length=1, charset=TEXT_CHARSET)
        self._fixed_level: Any = None
        self._level_seed: int | None = None
        self._ready = False
        self._steps = 0
        self._terminated = False
        self._truncated = False

    # ---- construction from user levels -------------------------------------------------------

    @classmethod
    def from_level_text(cls, text: str, *, source: str = DEFAULT_SOURCE, **options: Any) -> TextGameEnv:
        """An env that always resets to the level in `text` (the game's `grid` render format).

        `source` names the text in error messages (pass the file name). Generator options
        (grid size, box count, ...) are ignored: the level fixes them. Malformed text raises
        `LevelFormatError` naming line and column. The env is ready to use without `reset()`;
        call `reset(seed=...)` for reproducible FrozenLake slips.
        """
        level = cls.parse_level(text, source=source)
        env = cls(**options)
        env._fixed_level = level
        env._set_observation_space(*cls._level_shape(level))
        env._start(level, None)
        return env

    @classmethod
    def from_level_file(cls, path: str, **options: Any) -> TextGameEnv:
        """`from_level_text` on the UTF-8 contents of the file at `path`."""
        with open(path, encoding="utf-8") as handle:
            return cls.from_level_text(handle.read(), source=str(path), **options)

    # ---- gymnasium API -----------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        """Start an episode; same `seed` -> same level (and same slips) on every machine."""
        super().reset(seed=seed)
        if self._fixed_level is not None:
            level, level_seed = self._fixed_level, None
        else:
            level_seed = int(seed) if seed is not None else int(self.np_random.integers(1 << 62))
            level = self.generate_level(level_seed)
        self._start(level, level_seed)
        info = self._info(valid=True, effective=False)
        info["level_seed"] = level_seed
        return self.render_text(self.render_mode), info

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        """Apply one action text; see the class docstring of each game for the exact rules."""
        if not self._ready:
            raise gymnasium.error.ResetNeeded("call reset() before step()")
        if not isinstance(action, str):
            raise TypeError(f"{self.name} actions are text (str), got {type(action).__name__}")
        move = self._parse_action(action)
        if self._terminated or self._truncated or move is None:
            info = self._info(valid=move is not None, effective=False)
            return self.render_text(self.render_mode), 0.0, self._terminated, self._truncated, info
        reward, effective, extra = self._apply(move)
        self._steps += 1
        self._terminated = self._is_over()
        self._truncated = not self._terminated and self.max_steps is not None and self._steps >= self.max_steps
        info = self._info(valid=True, effective=effective)
        info.update(extra)
        return self.render_text(self.render_mode), float(reward), self._terminated, self._truncated, info

    def render(self) -> str:
        """The state text in `self.render_mode`."""
        return self.render_text(self.render_mode)

    def render_text(self, mode: str = "grid") -> str:
        """The state as text: `"grid"` (symbols only) or `"grid+coords"` (grid + coordinate line)."""
        check_render_mode(mode)
        if not self._ready:
            raise gymnasium.error.ResetNeeded("call reset() before rendering")
        grid = self._render_grid()
        return grid if mode == "grid" else grid + "\n" + self._render_coords()

    # ---- shared state ------------------------------------------------------------------------

    @property
    def steps(self) -> int:
        """Env steps executed in this episode (invalid actions do not count)."""
        return self._steps

    @property
    def episode_over(self) -> bool:
        """True once the episode terminated or was truncated."""
        return self._terminated or self._truncated

    @property
    def level_seed(self) -> int | None:
        """The seed of the current level (None for a level given as text)."""
        return self._level_seed

    def _start(self, level: Any, level_seed: int | None) -> None:
        self._load_level(level)
        self._level_seed = level_seed
        self._steps = 0
        self._terminated = False
        self._truncated = False
        self._ready = True

    def _info(self, valid: bool, effective: bool) -> dict[str, Any]:
        return {"success": bool(self._ready and self._is_success()), "action_is_valid": bool(valid), "action_is_effective": bool(effective)}

    def _set_observation_space(self, rows: int, cols: int) -> None:
        # grid + newlines + a coordinate line of at most ~40 characters per cell.
        bound = rows * (cols + 1) + 40 * rows * cols + 80
        self.observation_space = spaces.Text(max_length=bound, min_length=1, charset=TEXT_CHARSET)

    # ---- subclass hooks ----------------------------------------------------------------------

    @classmethod
    def parse_level(cls, text: str, source: str = DEFAULT_SOURCE) -> Any:  # subclass
        """Parse level text into the game's level object; `LevelFormatError` on bad text."""
        raise NotImplementedError

    def generate_level(self, seed: int) -> Any:  # subclass
        """The generated level of `seed` (deterministic, uses `level_rng(seed)` only)."""
        raise NotImplementedError

    def expert_actions(self, max_actions: int) -> list[str]:  # subclass
        """Up to `max_actions` action texts suggested by the game's solver from the current state."""
        raise NotImplementedError

    @staticmethod
    def _level_shape(level: Any) -> tuple[int, int]:  # subclass: (rows, cols) of a level
        raise NotImplementedError

    def _load_level(self, level: Any) -> None:  # subclass
        raise NotImplementedError

    def _parse_action(self, text: str) -> Any:  # subclass: a move, or None if invalid
        raise NotImplementedError

    def _apply(self, move: Any) -> tuple[float, bool, dict[str, Any]]:  # subclass
        raise NotImplementedError

    def _is_over(self) -> bool:  # subclass: the game ended (terminated)
        raise NotImplementedError

    def _is_success(self) -> bool:  # subclass
        raise NotImplementedError

    def _render_grid(self) -> str:  # subclass
        raise NotImplementedError

    def _render_coords(self) -> str:  # subclass
        raise NotImplementedError
