"""FrozenLake: the env, its map generator and solvers (success-probability DP, shortest path)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from spa_rl.envs.base import TextGameEnv, check_int, level_rng
from spa_rl.envs.levels import DEFAULT_SOURCE, check_rectangular, level_error, level_lines
from spa_rl.errors import ConfigError

# Order and ids as in gymnasium's FrozenLake: 0 Left, 1 Down, 2 Right, 3 Up.
ACTION_NAMES = ("Left", "Down", "Right", "Up")
_ACTION_INDEX = {name.lower(): k for k, name in enumerate(ACTION_NAMES)}
_STEPS = ((0, -1), (1, 0), (0, 1), (-1, 0))

PLAYER, FROZEN, HOLE, GOAL, PLAYER_IN_HOLE, PLAYER_ON_GOAL = "P", "_", "O", "G", "X", "√"
SYMBOLS = {
    PLAYER: "player",
    FROZEN: "frozen ice",
    HOLE: "hole",
    GOAL: "goal",
    PLAYER_IN_HOLE: "player in a hole",
    PLAYER_ON_GOAL: "player on the goal",
}
# Level text may also use gymnasium's letters: S start, F frozen, H hole.
_LEVEL_SYMBOLS = {PLAYER: "start", "S": "start", FROZEN: "frozen", "F": "frozen", HOLE: "hole", "H": "hole", GOAL: "goal"}

GOAL_REWARD = 1.0

Cell = tuple[int, int]


@dataclass(frozen=True)
class FrozenLakeLevel:
    """A FrozenLake map: grid size, holes, goal and the player's start, all as (row, col)."""

    rows: int
    cols: int
    holes: frozenset[Cell]
    goal: Cell
    start: Cell

    def to_text(self) -> str:
        """The `grid` render of the map with the player on its start (the level text format)."""
        lines = []
        for r in range(self.rows):
            row = []
            for c in range(self.cols):
                cell = (r, c)
                row.append(PLAYER if cell == self.start else HOLE if cell in self.holes else GOAL if cell == self.goal else FROZEN)
            lines.append("".join(row))
        return "\n".join(lines)


def _move(level: FrozenLakeLevel, cell: Cell, direction: int) -> Cell:
    """The cell reached by moving in `direction` (0 Left, 1 Down, 2 Right, 3 Up); the border stops."""
    r, c = cell[0] + _STEPS[direction][0], cell[1] + _STEPS[direction][1]
    return (r, c) if 0 <= r < level.rows and 0 <= c < level.cols else cell


def slip_outcomes(action: int, is_slippery: bool = True, success_rate: float = 1 / 3) -> list[tuple[int, float]]:
    """`(executed direction, probability)` of intended `action`: the intended one with
    `success_rate` and each perpendicular one with `(1 - success_rate) / 2` (in the order
    `(action - 1) % 4, action, (action + 1) % 4`); just `[(action, 1.0)]` when not slippery.
    """
    if not is_slippery:
        return [(action, 1.0)]
    side = (1.0 - success_rate) / 2.0
    return [((action - 1) % 4, side), (action, success_rate), ((action + 1) % 4, side)]


# ---- solvers ----------------------------------------------------------------------------------


def shortest_path_length(level: FrozenLakeLevel, start: Cell | None = None) -> int | None:
    """Fewest moves from `start` (default: the level's) to the goal avoiding holes, ignoring
    slips (None: no path, or `start` is a hole)."""
    start = level.start if start is None else start
    if start in level.holes:
        return None
    dist = {start: 0}
    queue = deque([start])
    while queue:
        cell = queue.popleft()
        if cell == level.goal:
            return dist[cell]
        for d in range(4):
            nxt = _move(level, cell, d)
            if nxt not in dist and nxt not in level.holes:
                dist[nxt] = dist[cell] + 1
                queue.append(nxt)
    return None


def frozenlake_dp(
    level: FrozenLakeLevel, budget: int, *, is_slippery: bool = True, success_rate: float = 1 / 3
) -> tuple[np.ndarray, np.ndarray]:
    """Best success probabilities and optimal actions for every cell and action budget.

    Returns `(values, policy)`, both of shape `(budget + 1, rows, cols)`:
    - `values[k, r, c]`: the highest probability of reaching the goal from (r, c) with at
      most k actions left (1.0 on the goal, 0.0 in holes and for k = 0 elsewhere);
    - `policy[k, r, c]`: an action id (0 Left, 1 Down, 2 Right, 3 Up) reaching it; -1 on
      the goal, in holes and for k = 0. Ties go to the action that is also best with fewer
      actions left (k - 1, then k - 2, ..., 1: the one that gets there sooner), then to the
      lowest id; differences below 1e-12 count as ties.
    Recursion: `values[k, s] = max_a Q_k(s, a)`, `Q_k(s, a) = sum_d P(d | a) * W(move(s, d))`
    with `W` = 1 on the goal, 0 in a hole and `values[k - 1]` elsewhere (`P` from
    `slip_outcomes`).
    """
    budget = check_int("budget", budget, 0)
    rows, cols = level.rows, level.cols
    cells = [(r, c) for r in range(rows) for c in range(cols)]
    index = {cell: i for i, cell in enumerate(cells)}
    nxt = np.array([[index[_move(level, cell, d)] for d in range(4)] for cell in cells])  # (n, 4)
    terminal = np.zeros(len(cells), dtype=bool)
    for h in level.holes:
        terminal[index[h]] = True
    goal = index[level.goal]
    terminal[goal] = True
    values = np.zeros((budget + 1, len(cells)))
    policy = np.full((budget + 1, len(cells)), -1, dtype=np.int64)
    qs = np.zeros((budget + 1, len(cells), 4))  # qs[k] = Q_k
    values[:, goal] = 1.0
    for k in range(1, budget + 1):
        worth = values[k - 1]  # holes stay 0, the goal stays 1
        for a in range(4):
            for d, p in slip_outcomes(a, is_slippery, success_rate):
                qs[k, :, a] += p * worth[nxt[:, d]]
        values[k] = np.where(terminal, values[k], qs[k].max(axis=1))
        candidates = np.ones((len(cells), 4), dtype=bool)
        for j in range(k, 0, -1):
            q = np.where(candidates, qs[j], -1.0)
            candidates &= q >= q.max(axis=1, keepdims=True) - 1e-12
        policy[k] = np.where(terminal, -1, np.argmax(candidates, axis=1))
    return values.reshape(budget + 1, rows, cols), policy.reshape(budget + 1, rows, cols)


def success_probability(level: FrozenLakeLevel, budget: int, *, is_slippery: bool = True, success_rate: float = 1 / 3) -> float:
    """The best achievable probability of reaching the goal from the start within `budget` actions."""
    values, _ = frozenlake_dp(level, budget, is_slippery=is_slippery, success_rate=success_rate)
    return float(values[budget][level.start])


# ---- generator ------------------------------------------------------------------------------


LAYOUTS = ("random", "corners")


def generate_frozenlake_map(seed: int, size: int = 4, frozen_prob: float = 0.8, *, layout: str = "random",
                            max_attempts: int = 100_000) -> FrozenLakeLevel:
    """The map of `seed`. Each attempt (randomness from `level_rng(seed)`, in this order):
    every cell is frozen with probability `frozen_prob` (else a hole), then, with `layout`
    "random", the start and the goal are two uniform cells (row then column each); start ==
    goal: next attempt. With "corners" the start is the top-left cell and the goal the
    bottom-right one (gymnasium's `generate_random_map`) and nothing more is drawn. Start and
    goal are made frozen; the map is accepted if a path of 4-neighbour moves avoiding holes
    leads from start to goal. "random" (the default) places them anywhere, as the reference.
    """
    size = check_int("size", size, 2, 64)
    frozen_prob = _check_probability("frozen_prob", frozen_prob, allow_zero=False)
    layout = _check_layout(layout)
    rng = level_rng(seed)
    for _ in range(max_attempts):
        frozen = rng.random((size, size)) < frozen_prob
        if layout == "corners":
            start, goal = (0, 0), (size - 1, size - 1)
        else:
            start = tuple(int(x) for x in rng.integers(0, size, size=2))
            goal = tuple(int(x) for x in rng.integers(0, size, size=2))
        if start == goal:
            continue
        holes = frozenset((r, c) for r in range(size) for c in range(size) if not frozen[r, c]) - {start, goal}
        level = FrozenLakeLevel(size, size, holes, goal, start)  # type: ignore[arg-type]
        if shortest_path_length(level) is not None:
            return level
    raise ConfigError(f"size={size}, frozen_prob={frozen_prob}: no map with a path in {max_attempts} attempts; raise frozen_prob")


def _check_layout(value: Any) -> str:
    if value not in LAYOUTS:
        raise ConfigError(f"layout: {value!r} is not one of {', '.join(LAYOUTS)}")
    return value


def _check_probability(name: str, value: Any, allow_zero: bool) -> float:
    low = "[0" if allow_zero else "(0"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= value <= 1.0) or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}: {value!r} must be a probability in {low}, 1]")
    return float(value)


# ---- level text ---------------------------------------------------------------------------


def parse_frozenlake_level(text: str, source: str = DEFAULT_SOURCE) -> FrozenLakeLevel:
    """Read a map in the `grid` render format: `P` (start), `_` frozen, `O` hole, `G` goal;
    gymnasium's `S`, `F`, `H` are accepted as start, frozen and hole."""
    lines = level_lines(text, source)
    cols = check_rectangular(lines, source)
    holes, goals, starts = set(), [], []
    where: dict[Cell, tuple[int, int]] = {}
    for r, (number, line) in enumerate(lines):
        for c, ch in enumerate(line):
            cell = (r, c)
            where[cell] = (number, c + 1)
            kind = _LEVEL_SYMBOLS.get(ch)
            if kind is None:
                if ch in (PLAYER_IN_HOLE, PLAYER_ON_GOAL):
                    problem = f"{ch!r} (player {'in a hole' if ch == PLAYER_IN_HOLE else 'on the goal'}) is a finished game; a level starts with P on ice"
                else:
                    problem = f"unknown symbol {ch!r}; FrozenLake levels use P _ O G (or S F H)"
                raise level_error(source, number, c + 1, problem)
            if kind == "hole":
                holes.add(cell)
            elif kind in ("goal", "start"):
                found = goals if kind == "goal" else starts
                if found:
                    first = where[found[0]]
                    raise level_error(source, number, c + 1, f"a second {kind} (the first is at line {first[0]}, column {first[1]})")
                found.append(cell)
    first_line = lines[0][0]
    if not starts:
        raise level_error(source, first_line, 1, "no player: mark the start with P (or S)")
    if not goals:
        raise level_error(source, first_line, 1, "no goal: mark the goal with G")
    return FrozenLakeLevel(len(lines), cols, frozenset(holes), goals[0], starts[0])


# ---- env ------------------------------------------------------------------------------------


class FrozenLakeEnv(TextGameEnv):
    """FrozenLake: walk over the ice to the goal without falling into a hole; the ice is slippery.

    ## Description
    A rectangular map of frozen cells, holes and one goal. The player starts on a frozen
    cell. With the default slip model a move goes the intended way only a third of the time.
    Generated maps (`generate_frozenlake_map`) always have a hole-free path from start to
    goal; start and goal can be anywhere.

    ## Action Space
    Text: `Left`, `Down`, `Right` or `Up` (ids 0-3, gymnasium's order), matched
    case-insensitively after stripping whitespace. Other text is invalid: no state change,
    reward 0.0, `info["action_is_valid"] = False`, not counted as a step, no random number
    drawn.

    A valid action `a` is executed exactly like this:
    1. Executed direction `d`: if slippery, draw `u = self.np_random.random()` (gymnasium's
       generator, seeded by `reset(seed)`) and let `side = (1 - success_rate) / 2`:
       `u < side` -> `d = (a - 1) % 4`; else `u < side + success_rate` -> `d = a`; else
       `d = (a + 1) % 4` (the two perpendicular directions; gymnasium's sampling rule). Not
       slippery: `d = a`, no random number drawn.
    2. The player moves one cell in direction `d`; a move off the grid leaves it in place.
    `info["executed_action"]` names `d`; `action_is_effective` = the player moved.

    ## Observation
    `render_text(render_mode)`. `grid`: rows joined by `\\n`: `P` player, `_` frozen (the
    start cell included), `O` hole, `G` goal, `X` player in a hole, `√` player on the goal.
    `grid+coords` adds a newline and
    `Player (P) is at (r,c); hole (O) is at (r,c); ...; goal (G) is at (r,c).` with
    zero-indexed (row,col), holes in row-major order (none listed if there are none; a hole or
    goal under the player is still listed).

    ## Rewards
    1.0 for the step that reaches the goal, else 0.0 (no step penalty). An episode's return is
    1.0 on success and 0.0 otherwise. `info["distance_to_goal"]` (after `reset` and every
    `step`) is the number of moves from the player to the goal along the shortest path around
    the holes, ignoring slips: 0 on the goal, None in a hole. The agent's optional progress
    reward reads it (`Episode.progress`); the env's own reward does not.

    ## Episode End
    - Termination: the player enters a hole (failure) or the goal (`info["success"] = True`).
    - Truncation: only if `max_steps` is set (default None, as in the reference).
    The agent's action budget (10 in SPA) is enforced by the agent loop.

    ## Arguments
    - `render_mode`: `"grid"` (default) or `"grid+coords"`.
    - `size`: side of generated square maps, default 4 (>= 2).
    - `frozen_prob`: probability that a generated cell is frozen (else a hole), default 0.8.
    - `is_slippery`: default True; False makes every move go the intended way.
    - `success_rate`: probability of the intended direction when slippery, default 1/3; the
      rest is split evenly between the two perpendicular directions.
    - `max_steps`: env step cap (truncation), default None.
    - `layout`: where generated maps put start and goal: `"random"` (default, the reference:
      anywhere) or `"corners"` (gymnasium's: start top-left, goal bottom-right).

    ## Deviations from the reference (RAGEN FrozenLake, gymnasium 1.x dynamics)
    - The map and the slips come from independent streams of the same seed (the reference
      seeds both with the same number). Maps for a given seed differ from the reference's.
    - Invalid action text is a no-op not counted as a step (the reference never passes it).
    - Render modes are `grid` / `grid+coords` (reference: `text` / `text_with_coordinates`
      chosen by the `RENDER_MODE` environment variable); stepping after the end is a no-op.

    ## Version History
    - v0: initial version.
    """

    name = "frozenlake"
    action_names = ACTION_NAMES
    default_action_budget = 10
    reports_distance = True

    def __init__(
        self,
        render_mode: str | None = "grid",
        size: int = 4,
        frozen_prob: float = 0.8,
        is_slippery: bool = True,
        success_rate: float = 1 / 3,
        max_steps: int | None = None,
        layout: str = "random",
    ) -> None:
        super().__init__(render_mode=render_mode, max_steps=max_steps)
        self.size = check_int("size", size, 2, 64)
        if not isinstance(is_slippery, bool):
            raise ConfigError(f"is_slippery: expected True or False, got {is_slippery!r}")
        self.frozen_prob = _check_probability("frozen_prob", frozen_prob, allow_zero=False)
        self.layout = _check_layout(layout)
        self.is_slippery = is_slippery
        self.success_rate = _check_probability("success_rate", success_rate, allow_zero=True)
        self._set_observation_space(self.size, self.size)
        self._dp_cache: tuple[int, tuple[np.ndarray, np.ndarray]] | None = None

    # ---- levels ----

    @classmethod
    def parse_level(cls, text: str, source: str = DEFAULT_SOURCE) -> FrozenLakeLevel:
        return parse_frozenlake_level(text, source)

    def generate_level(self, seed: int) -> FrozenLakeLevel:
        return generate_frozenlake_map(seed, self.size, self.frozen_prob, layout=self.layout)

    @staticmethod
    def _level_shape(level: FrozenLakeLevel) -> tuple[int, int]:
        return level.rows, level.cols

    def _load_level(self, level: FrozenLakeLevel) -> None:
        self._map = level
        self._player = level.start
        self._dp_cache = None

    @property
    def level(self) -> FrozenLakeLevel:
        """The current map (its `start` is where the episode started)."""
        return self._map

    @property
    def player(self) -> tuple[int, int]:
        """The player's (row, col)."""
        return self._player

    # ---- rules ----

    def _parse_action(self, text: str) -> int | None:
        return _ACTION_INDEX.get(text.strip().lower())

    def _apply(self, action: int) -> tuple[float, bool, dict[str, Any]]:
        direction = action
        if self.is_slippery:
            u = float(self.np_random.random())
            side = (1.0 - self.success_rate) / 2.0
            direction = (action - 1) % 4 if u < side else action if u < side + self.success_rate else (action + 1) % 4
        before = self._player
        self._player = _move(self._map, before, direction)
        reward = GOAL_REWARD if self._player == self._map.goal else 0.0
        return reward, self._player != before, {"executed_action": ACTION_NAMES[direction]}

    def _info(self, valid: bool, effective: bool) -> dict[str, Any]:
        info = super()._info(valid, effective)
        info["executed_action"] = None
        info["distance_to_goal"] = shortest_path_length(self._map, self._player) if self._ready else None
        return info

    def _is_over(self) -> bool:
        return self._player == self._map.goal or self._player in self._map.holes

    def _is_success(self) -> bool:
        return self._player == self._map.goal

    # ---- renders ----

    def _render_grid(self) -> str:
        level, player = self._map, self._player
        lines = []
        for r in range(level.rows):
            row = []
            for c in range(level.cols):
                cell = (r, c)
                if cell == player:
                    row.append(PLAYER_IN_HOLE if cell in level.holes else PLAYER_ON_GOAL if cell == level.goal else PLAYER)
                else:
                    row.append(HOLE if cell in level.holes else GOAL if cell == level.goal else FROZEN)
            lines.append("".join(row))
        return "\n".join(lines)

    def _render_coords(self) -> str:
        parts = ["Player (P) is at ({},{})".format(*self._player)]
        parts += ["hole (O) is at ({},{})".format(*h) for h in sorted(self._map.holes)]
        parts.append("goal (G) is at ({},{})".format(*self._map.goal))
        return "; ".join(parts) + "."

    # ---- solver ----

    def optimal_policy(self, budget: int) -> tuple[np.ndarray, np.ndarray]:
        """`frozenlake_dp` of the current map with this env's slip model (cached per map)."""
        budget = check_int("budget", budget, 0)
        if self._dp_cache is None or self._dp_cache[0] < budget:
            values, policy = frozenlake_dp(self._map, budget, is_slippery=self.is_slippery, success_rate=self.success_rate)
            self._dp_cache = (budget, (values, policy))
        values, policy = self._dp_cache[1]
        return values[: budget + 1], policy[: budget + 1]

    def prompt_variables(self) -> dict:
        """The prompt's {ice} sentence follows the slip setting (agent/prompts/frozenlake.yaml)."""
        return {"ice": "slippery" if self.is_slippery and self.success_rate < 1.0 else "firm"}

    def expert_actions(self, max_actions: int) -> list[str]:
        """The DP-optimal action for the current cell with `max_actions` actions left.

        Slippery: a one-element list (the next action depends on where the slip lands, so
        only the next one is given). Not slippery (or `success_rate` 1): the whole optimal
        plan, up to `max_actions` actions. Empty if the episode is over or `max_actions` is 0.
        """
        max_actions = check_int("max_actions", max_actions, 0)
        if self.episode_over or max_actions == 0:
            return []
        _, policy = self.optimal_policy(max_actions)
        deterministic = not self.is_slippery or self.success_rate == 1.0
        cell, plan = self._player, []
        for k in range(max_actions, 0, -1):
            action = int(policy[k][cell])
            plan.append(ACTION_NAMES[action])
            if not deterministic:
                break
            cell = _move(self._map, cell, action)
            if cell == self._map.goal or cell in self._map.holes:
                break
        return plan
