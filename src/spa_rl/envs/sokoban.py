"""Sokoban: the env, its level generator (reverse play) and a shortest-solution BFS solver."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from spa_rl.envs.base import TextGameEnv, check_int, level_rng
from spa_rl.envs.levels import DEFAULT_SOURCE, check_rectangular, level_error, level_lines
from spa_rl.errors import ConfigError

ACTION_NAMES = ("Up", "Down", "Left", "Right")
_ACTION_INDEX = {name.lower(): k for k, name in enumerate(ACTION_NAMES)}
_STEPS = ((-1, 0), (1, 0), (0, -1), (0, 1))  # (row, col) change of Up, Down, Left, Right

WALL, FLOOR, TARGET, BOX, BOX_ON_TARGET, PLAYER, PLAYER_ON_TARGET = "#", "_", "O", "X", "√", "P", "S"
SYMBOLS = {
    WALL: "wall",
    FLOOR: "empty floor",
    TARGET: "empty target",
    BOX: "box",
    BOX_ON_TARGET: "box on target",
    PLAYER: "player",
    PLAYER_ON_TARGET: "player on target",
}

STEP_REWARD = -0.1
BOX_ON_REWARD = 1.0
BOX_OFF_REWARD = -1.0
SOLVED_REWARD = 10.0

# The five floor stamps of the topology walk, as (row, col) offsets from the walker:
# horizontal bar, vertical bar, two L-shapes and a 2x2 block.
_STAMPS = (
    ((0, -1), (0, 0), (0, 1)),
    ((-1, 0), (0, 0), (1, 0)),
    ((0, -1), (0, 0), (1, 0)),
    ((0, 0), (0, 1), (1, 0)),
    ((0, -1), (0, 0), (1, -1), (1, 0)),
)


Cell = tuple[int, int]


@dataclass(frozen=True)
class SokobanLevel:
    """A Sokoban position: grid size, walls, targets, boxes and player, all as (row, col).

    `targets` and `boxes` are sorted row-major. Cells outside the grid count as walls.
    """

    rows: int
    cols: int
    walls: frozenset[Cell]
    targets: tuple[Cell, ...]
    boxes: tuple[Cell, ...]
    player: Cell

    def to_text(self) -> str:
        """The `grid` render of this position (the level text format)."""
        targets, boxes = set(self.targets), set(self.boxes)
        lines = []
        for r in range(self.rows):
            row = []
            for c in range(self.cols):
                cell = (r, c)
                on_target = cell in targets
                if cell in self.walls:
                    row.append(WALL)
                elif cell == self.player:
                    row.append(PLAYER_ON_TARGET if on_target else PLAYER)
                elif cell in boxes:
                    row.append(BOX_ON_TARGET if on_target else BOX)
                else:
                    row.append(TARGET if on_target else FLOOR)
            lines.append("".join(row))
        return "\n".join(lines)


class _Board:
    """Walls on a flat index with a one-cell wall margin, so moves never leave the array."""

    __slots__ = ("rows", "cols", "stride", "wall", "deltas")

    def __init__(self, rows: int, cols: int, walls: frozenset[Cell]) -> None:
        self.rows, self.cols, self.stride = rows, cols, cols + 2
        self.wall = bytearray([1]) * ((rows + 2) * self.stride)
        for r in range(rows):
            for c in range(cols):
                if (r, c) not in walls:
                    self.wall[self.index((r, c))] = 0
        self.deltas = tuple(dr * self.stride + dc for dr, dc in _STEPS)

    def index(self, cell: Cell) -> int:
        return (cell[0] + 1) * self.stride + cell[1] + 1

    def cell(self, index: int) -> Cell:
        q, m = divmod(index, self.stride)
        return (q - 1, m - 1)


# ---- solver -----------------------------------------------------------------------------------


def _live_squares(board: _Board, targets: frozenset[int]) -> bytearray:
    """1 where a lone box could still be pushed onto some target, else 0 (a dead square)."""
    live = bytearray(len(board.wall))
    stack = list(targets)
    for t in stack:
        live[t] = 1
    while stack:
        x = stack.pop()
        for d in board.deltas:
            y = x - d  # a box on y pushed along d lands on x; the pusher stands on y - d
            if not board.wall[y] and not board.wall[y - d] and not live[y]:
                live[y] = 1
                stack.append(y)
    return live


def solve_sokoban(level: SokobanLevel, max_states: int = 1_000_000) -> list[str] | None:
    """A shortest solution (fewest actions) as action names, by BFS over (player, boxes).

    Returns `[]` if the level is already solved and None if it has no solution or more than
    `max_states` states were visited first. Ties between equally short solutions are broken
    by the action order Up, Down, Left, Right. Pushes onto dead squares (cells from which no
    box can reach a target) are pruned; this never removes a solution.
    """
    board = _Board(level.rows, level.cols, level.walls)
    targets = frozenset(board.index(t) for t in level.targets)
    boxes = tuple(sorted(board.index(b) for b in level.boxes))
    plan = _bfs(board, targets, boxes, board.index(level.player), max_states)
    return None if plan is None else [ACTION_NAMES[k] for k in plan]


def _bfs(board: _Board, targets: frozenset[int], boxes: tuple[int, ...], player: int, max_states: int) -> list[int] | None:
    if all(b in targets for b in boxes):
        return []
    live = _live_squares(board, targets)
    if not all(live[b] for b in boxes):
        return None
    wall, deltas = board.wall, board.deltas
    start = (player, boxes)
    parent: dict[tuple[int, tuple[int, ...]], tuple[Any, int] | None] = {start: None}
    queue = deque([start])
    while queue:
        state = queue.popleft()
        p, bx = state
        for k, d in enumerate(deltas):
            q = p + d
            if wall[q]:
                continue
            if q in bx:
                beyond = q + d
                if wall[beyond] or beyond in bx or not live[beyond]:
                    continue
                new_boxes = tuple(sorted(beyond if b == q else b for b in bx))
                new = (q, new_boxes)
                if new in parent:
                    continue
                parent[new] = (state, k)
                if all(b in targets for b in new_boxes):
                    return _path(parent, new)
            else:
                new = (q, bx)
                if new in parent:
                    continue
                parent[new] = (state, k)
            if len(parent) > max_states:
                return None
            queue.append(new)
    return None


def _path(parent: dict, state: Any) -> list[int]:
    moves = []
    link = parent[state]
    while link is not None:
        state, k = link
        moves.append(k)
        link = parent[state]
    return moves[::-1]


# ---- generator --------------------------------------------------------------------------------


def generate_sokoban_level(
    seed: int,
    dim_room: tuple[int, int] = (6, 6),
    num_boxes: int = 1,
    *,
    num_gen_steps: int | None = None,
    p_change_directions: float = 0.35,
    search_states: int = 5000,
    max_attempts: int = 200,
) -> SokobanLevel:
    """The level of `seed`: a random-walk room, boxes placed on targets, then reverse play.

    Each attempt (all randomness from `level_rng(seed)`, drawn in this order):
    1. Room: a walker starts on a uniform interior cell with a uniform direction; for each of
       `num_gen_steps` (default `int(1.7 * (rows + cols))`) steps it turns to a uniform new
       direction with probability `p_change_directions`, moves one cell (clamped to the
       interior) and marks one of five stamps (bar, bar, L, L, 2x2) around itself as floor.
       The outer ring is always wall.
    2. Placement: the player and `num_boxes` targets on distinct uniform floor cells; the
       boxes start on the targets. Fewer than `num_boxes + 2` floor cells: next attempt.
    3. Reverse play: breadth-first search from that position with reverse moves (the player
       steps onto a free cell and, if a box stands right behind it, may pull that box along),
       visiting at most `search_states` positions. The position right after each pull is
       scored `box_swaps * box_displacement` (how often the pulled box changed along the path
       that first found the position, times the summed Manhattan distance of each box from
       its own target), and 0 while any box is on a target. One of the best-scoring such
       positions is chosen uniformly; best score 0 (no box can leave the targets): next
       attempt.
    4. Jiggle: with probability 0.8 if the best score is 1, else 0.5, the player walks 1-3
       steps, each to a uniform free neighbour not visited during the jiggle, continuing
       after each step with probability 0.5.
    Every level is solvable: reversing the pulls gives a solution.
    After `max_attempts` failed attempts (a room too small for the boxes) -> `ConfigError`.
    """
    rows, cols = _check_dim_room(dim_room)
    num_boxes = check_int("num_boxes", num_boxes, 1, 32)
    steps = int(1.7 * (rows + cols)) if num_gen_steps is None else check_int("num_gen_steps", num_gen_steps, 1)
    rng = level_rng(seed)
    for _ in range(max_attempts):
        floor = _room_topology(rng, rows, cols, steps, p_change_directions)
        if len(floor) < num_boxes + 2:
            continue
        picks = rng.choice(len(floor), size=num_boxes + 1, replace=False)
        player = floor[int(picks[0])]
        targets = tuple(sorted(floor[int(i)] for i in picks[1:]))
        walls = frozenset((r, c) for r in range(rows) for c in range(cols)) - frozenset(floor)
        board = _Board(rows, cols, walls)
        score, found = _reverse_play(board, [board.index(t) for t in targets], board.index(player), search_states)
        if not found:
            continue
        best_player, best_boxes = found[int(rng.integers(len(found)))]
        best_player = _jiggle(board, best_player, best_boxes, 0.8 if score == 1 else 0.5, rng)
        return SokobanLevel(
            rows,
            cols,
            walls,
            targets,
            tuple(sorted(board.cell(b) for b in best_boxes)),
            board.cell(best_player),
        )
    raise ConfigError(
        f"dim_room={tuple(dim_room)}, num_boxes={num_boxes}: no level found in {max_attempts} attempts "
        f"(seed {seed}); use a larger room or fewer boxes"
    )


def _check_dim_room(dim_room: Any) -> tuple[int, int]:
    if isinstance(dim_room, int) and not isinstance(dim_room, bool):
        dim_room = (dim_room, dim_room)
    if not isinstance(dim_room, (tuple, list)) or len(dim_room) != 2:
        raise ConfigError(f"dim_room: expected (rows, cols), got {dim_room!r}")
    return check_int("dim_room[0]", dim_room[0], 3, 64), check_int("dim_room[1]", dim_room[1], 3, 64)


def _room_topology(rng: Any, rows: int, cols: int, num_steps: int, p_change: float) -> list[Cell]:
    """Floor cells (row-major) of one random-walk room."""
    floor = [[False] * cols for _ in range(rows)]
    r = int(rng.integers(1, rows - 1))
    c = int(rng.integers(1, cols - 1))
    direction = _STEPS[int(rng.integers(4))]
    turns = rng.random(num_steps)
    new_directions = rng.integers(4, size=num_steps)
    stamps = rng.integers(len(_STAMPS), size=num_steps)
    for k in range(num_steps):
        if turns[k] < p_change:
            direction = _STEPS[int(new_directions[k])]
        r = min(max(r + direction[0], 1), rows - 2)
        c = min(max(c + direction[1], 1), cols - 2)
        for dr, dc in _STAMPS[int(stamps[k])]:
            rr, cc = r + dr, c + dc
            if 0 < rr < rows - 1 and 0 < cc < cols - 1:
                floor[rr][cc] = True
    return [(i, j) for i in range(rows) for j in range(cols) if floor[i][j]]


def _reverse_play(
    board: _Board, targets: list[int], player: int, max_states: int
) -> tuple[int, list[tuple[int, tuple[int, ...]]]]:
    """The best score and the positions right after a pull that reach it, in discovery order."""
    wall, deltas = board.wall, board.deltas
    target_set = frozenset(targets)
    origins = [board.cell(t) for t in targets]
    start = (player, tuple(targets), -1, 0)  # player, boxes (box i started on target i), last pulled, swaps
    seen = {(player, tuple(sorted(targets)))}
    queue = deque([start])
    best_score, best = 0, []
    while queue:
        p, boxes, last, swaps = queue.popleft()
        for d in deltas:
            q = p + d
            if wall[q] or q in boxes:
                continue
            successors = [(q, boxes, last, swaps)]
            behind = p - d
            if behind in boxes:
                i = boxes.index(behind)
                pulled = boxes[:i] + (p,) + boxes[i + 1 :]
                successors.append((q, pulled, i, swaps + (i != last)))
            for state in successors:
                key = (state[0], tuple(sorted(state[1])))
                if key in seen:
                    continue
                seen.add(key)
                queue.append(state)
                # Only positions right after a pull compete (the score only changes on pulls).
                if state[1] is not boxes:
                    score = _score(board, state[1], state[3], target_set, origins)
                    if score > best_score:
                        best_score, best = score, [(state[0], state[1])]
                    elif score == best_score and score > 0:
                        best.append((state[0], state[1]))
                if len(seen) >= max_states:
                    return best_score, best
    return best_score, best


def _jiggle(board: _Board, player: int, boxes: tuple[int, ...], p_move: float, rng: Any) -> int:
    """With probability `p_move`, walk the player 1-3 random steps onto unvisited free cells."""
    if rng.random() >= p_move:
        return player
    visited = {player}
    for _ in range(3):
        free = [player + d for d in board.deltas if not board.wall[player + d] and player + d not in boxes]
        free = [q for q in free if q not in visited]
        if not free:
            break
        player = free[int(rng.integers(len(free)))]
        visited.add(player)
        if rng.random() >= 0.5:
            break
    return player


def _score(board: _Board, boxes: tuple[int, ...], swaps: int, targets: frozenset[int], origins: list[Cell]) -> int:
    displacement = 0
    for b, (tr, tc) in zip(boxes, origins):
        if b in targets:
            return 0
        r, c = board.cell(b)
        displacement += abs(r - tr) + abs(c - tc)
    return swaps * displacement


# ---- level text ---------------------------------------------------------------------------------


def parse_sokoban_level(text: str, source: str = DEFAULT_SOURCE) -> SokobanLevel:
    """Read a Sokoban level in the `grid` render format (symbols `# _ O X √ P S`)."""
    lines = level_lines(text, source)
    cols = check_rectangular(lines, source)
    walls, targets, boxes, players = set(), [], [], []
    where: dict[Cell, tuple[int, int]] = {}
    for r, (number, line) in enumerate(lines):
        for c, ch in enumerate(line):
            cell = (r, c)
            where[cell] = (number, c + 1)
            if ch not in SYMBOLS:
                raise level_error(source, number, c + 1, f"unknown symbol {ch!r}; Sokoban levels use {' '.join(SYMBOLS)}")
            if ch == WALL:
                walls.add(cell)
            if ch in (TARGET, BOX_ON_TARGET, PLAYER_ON_TARGET):
                targets.append(cell)
            if ch in (BOX, BOX_ON_TARGET):
                boxes.append(cell)
            if ch in (PLAYER, PLAYER_ON_TARGET):
                if players:
                    first = where[players[0]]
                    raise level_error(source, number, c + 1, f"a second player (the first is at line {first[0]}, column {first[1]})")
                players.append(cell)
    first_line = lines[0][0]
    if not players:
        raise level_error(source, first_line, 1, f"no player: mark the player with {PLAYER} (or {PLAYER_ON_TARGET} on a target)")
    if not boxes:
        raise level_error(source, first_line, 1, f"no box: a level needs at least one box ({BOX} or {BOX_ON_TARGET})")
    if len(boxes) != len(targets):
        surplus = boxes[len(targets)] if len(boxes) > len(targets) else targets[len(boxes)]
        line, column = where[surplus]
        raise level_error(source, line, column, f"{len(boxes)} boxes but {len(targets)} targets; every box needs exactly one target")
    if all(b in set(targets) for b in boxes):
        line, column = where[boxes[0]]
        raise level_error(source, line, column, "the level is already solved (every box is on a target)")
    return SokobanLevel(len(lines), cols, frozenset(walls), tuple(sorted(targets)), tuple(sorted(boxes)), players[0])


# ---- env --------------------------------------------------------------------------------------------


class SokobanEnv(TextGameEnv):
    """Sokoban on a small grid: push every box onto a target.

    ## Description
    The player walks on a walled grid and pushes boxes; a box can only be pushed (never
    pulled), one at a time. The episode is won when every box stands on a target. Levels are
    generated by reverse play (`generate_sokoban_level`) and are always solvable; any level
    can also be given as text (`SokobanEnv.from_level_text`).

    ## Action Space
    Text: `Up`, `Down`, `Left` or `Right`, matched case-insensitively after stripping
    surrounding whitespace. Any other text (e.g. `"Up."`, `"move up"`) is invalid: no state
    change, reward 0.0, `info["action_is_valid"] = False`, and it does not count as a step.
    Up is row - 1, Down row + 1, Left column - 1, Right column + 1.

    A valid action is executed exactly like this (cells outside the grid are walls):
    1. Let `q` be the cell next to the player in the action's direction.
    2. If `q` is a wall: nothing moves.
    3. Else if `q` holds a box: let `b` be the cell beyond it; if `b` is a wall or holds a
       box, nothing moves; otherwise the box moves to `b` and the player to `q`.
    4. Else the player moves to `q`.
    A blocked action is still a step (it costs -0.1). `action_is_effective` = the player moved.

    ## Observation
    `render_text(render_mode)`. `grid`: rows joined by `\\n`, one symbol per cell, no
    separators: `#` wall, `_` empty floor, `O` empty target, `X` box off target, `√` box on
    target, `P` player, `S` player standing on a target. `grid+coords` adds a newline and
    `Player (P) is at (r,c); box (X) is at (r,c); target (O) is at (r,c).` with zero-indexed
    (row,col): the player, then one `box (X)` entry per box, then one `target (O)` entry per
    target, each group in row-major order. A box on a target (or the player on a target) is
    listed both as a box (player) and as a target. Example (the paper's):
    `######\\n#___O#\\n#____#\\n###X_#\\n###P_#\\n######\\nPlayer (P) is at (4,3); box (X) is at (3,3); target (O) is at (1,4).`

    ## Rewards
    Each executed action: -0.1; +1.0 more if it pushed a box onto a target, -1.0 more if it
    pushed a box off a target (target to target: no change); +10.0 more when afterwards every
    box is on a target. A solution of n actions whose last push solves the level returns
    -0.1 for each of the first n-1 actions and +10.9 at the end: a 3-action solution returns
    -0.1, -0.1, +10.9 (sum 10.7); in general the sum is `10.0 - 0.1 * n + (on - off)` where
    on/off count the pushes onto and off targets. `info["distance_to_goal"]` (after `reset` and
    every `step`) is the sum over boxes of the Manhattan distance to the nearest target, a lower
    bound on the pushes left (0 when solved); the agent's optional progress reward reads it.

    ## Episode End
    - Termination: every box is on a target (`info["success"] = True`). There is no failure
      termination (deadlocks are not detected).
    - Truncation: `max_steps` executed actions (default 100, the reference's internal cap).
    The agent's action budget (10 in SPA) is enforced by the agent loop, not by the env.

    ## Arguments
    - `render_mode`: `"grid"` (default) or `"grid+coords"`.
    - `dim_room`: `(rows, cols)` of generated levels, default `(6, 6)`, each >= 3 (an int n
      means `(n, n)`).
    - `num_boxes`: boxes (and targets) in generated levels, default 1.
    - `max_steps`: env step cap (truncation), default 100; None for no cap.
    - `num_gen_steps`: random-walk length of the room generator (default 1.7 * (rows + cols)).
    - `p_change_directions`: turn probability of the room walker, default 0.35.
    - `search_states`: cap on positions visited by reverse play, default 5000.
    `info` also holds `boxes_on_target` (int).

    ## Deviations from the reference (RAGEN SimpleSokoban)
    - Reverse play is a capped breadth-first search (plain steps and optional pulls) instead
      of a depth-first search limited to depth 300 and 300,000 states, and the level is a
      uniform choice among the best-scoring positions instead of the first one found (the
      jiggle is kept). Failed attempts continue with the same generator instead of
      re-seeding with `hash(str(seed))` (which depended on `PYTHONHASHSEED`). The levels for
      a given seed therefore differ from the reference's; their difficulty is similar (see
      docs/envs.md).
    - Invalid action text never reaches the reference env; here it is a no-op that is not
      counted as a step, which is equivalent.
    - A level given as text may have no outer wall ring: cells outside the grid are walls.
    - Render modes are `grid` / `grid+coords` (reference: `text` / `text_with_coordinates`
      chosen by the `RENDER_MODE` environment variable); stepping after the end is a no-op.

    ## Version History
    - v0: initial version.
    """

    name = "sokoban"
    action_names = ACTION_NAMES
    default_action_budget = 10
    reports_distance = True

    def __init__(
        self,
        render_mode: str | None = "grid",
        dim_room: tuple[int, int] | int = (6, 6),
        num_boxes: int = 1,
        max_steps: int | None = 100,
        num_gen_steps: int | None = None,
        p_change_directions: float = 0.35,
        search_states: int = 5000,
    ) -> None:
        super().__init__(render_mode=render_mode, max_steps=max_steps)
        self.dim_room = _check_dim_room(dim_room)
        self.num_boxes = check_int("num_boxes", num_boxes, 1, 32)
        self.num_gen_steps = check_int("num_gen_steps", num_gen_steps, 1, allow_none=True)
        if not isinstance(p_change_directions, (int, float)) or not 0.0 <= p_change_directions <= 1.0:
            raise ConfigError(f"p_change_directions: {p_change_directions!r} must be a probability in [0, 1]")
        self.p_change_directions = float(p_change_directions)
        self.search_states = check_int("search_states", search_states, 1)
        self._set_observation_space(*self.dim_room)
        self._plan_cache: tuple[Any, list[int] | None] | None = None

    # ---- levels ----

    @classmethod
    def parse_level(cls, text: str, source: str = DEFAULT_SOURCE) -> SokobanLevel:
        return parse_sokoban_level(text, source)

    def generate_level(self, seed: int) -> SokobanLevel:
        return generate_sokoban_level(
            seed,
            self.dim_room,
            self.num_boxes,
            num_gen_steps=self.num_gen_steps,
            p_change_directions=self.p_change_directions,
            search_states=self.search_states,
        )

    @staticmethod
    def _level_shape(level: SokobanLevel) -> tuple[int, int]:
        return level.rows, level.cols

    def _load_level(self, level: SokobanLevel) -> None:
        self._board = _Board(level.rows, level.cols, level.walls)
        self._targets = frozenset(self._board.index(t) for t in level.targets)
        self._boxes = {self._board.index(b) for b in level.boxes}
        self._player = self._board.index(level.player)
        self._on_target = sum(1 for b in self._boxes if b in self._targets)
        self._num_boxes = len(self._boxes)
        self._plan_cache = None

    def current_level(self) -> SokobanLevel:
        """The current position as a `SokobanLevel`."""
        board = self._board
        walls = frozenset((r, c) for r in range(board.rows) for c in range(board.cols) if board.wall[board.index((r, c))])
        return SokobanLevel(
            board.rows,
            board.cols,
            walls,
            tuple(sorted(board.cell(t) for t in self._targets)),
            tuple(sorted(board.cell(b) for b in self._boxes)),
            board.cell(self._player),
        )

    # ---- rules ----

    def _parse_action(self, text: str) -> int | None:
        return _ACTION_INDEX.get(text.strip().lower())

    def _apply(self, move: int) -> tuple[float, bool, dict[str, Any]]:
        wall, boxes, targets = self._board.wall, self._boxes, self._targets
        d = self._board.deltas[move]
        before = self._on_target
        q = self._player + d
        moved = False
        if not wall[q]:
            if q in boxes:
                beyond = q + d
                if not wall[beyond] and beyond not in boxes:
                    boxes.remove(q)
                    boxes.add(beyond)
                    self._on_target += (beyond in targets) - (q in targets)
                    self._player, moved = q, True
            else:
                self._player, moved = q, True
        reward = STEP_REWARD
        if self._on_target > before:
            reward += BOX_ON_REWARD
        elif self._on_target < before:
            reward += BOX_OFF_REWARD
        if self._on_target == self._num_boxes:
            reward += SOLVED_REWARD
        return reward, moved, {"boxes_on_target": self._on_target}

    def _info(self, valid: bool, effective: bool) -> dict[str, Any]:
        info = super()._info(valid, effective)
        info["boxes_on_target"] = self._on_target if self._ready else 0
        info["distance_to_goal"] = self._box_distance() if self._ready else None
        return info

    def _box_distance(self) -> int:
        """Sum over boxes of the Manhattan distance to the nearest target: a lower bound on the
        pushes left (0 when solved). Walls and dead corners are ignored."""
        cell = self._board.cell
        targets = [cell(t) for t in self._targets]
        total = 0
        for box in self._boxes:
            r, c = cell(box)
            total += min(abs(r - tr) + abs(c - tc) for tr, tc in targets)
        return total

    def _is_over(self) -> bool:
        return self._on_target == self._num_boxes

    def _is_success(self) -> bool:
        return self._on_target == self._num_boxes

    # ---- renders ----

    def _render_grid(self) -> str:
        board, boxes, targets, player = self._board, self._boxes, self._targets, self._player
        wall, stride = board.wall, board.stride
        lines = []
        for r in range(board.rows):
            row = []
            start = (r + 1) * stride + 1
            for i in range(start, start + board.cols):
                if wall[i]:
                    row.append(WALL)
                elif i == player:
                    row.append(PLAYER_ON_TARGET if i in targets else PLAYER)
                elif i in boxes:
                    row.append(BOX_ON_TARGET if i in targets else BOX)
                else:
                    row.append(TARGET if i in targets else FLOOR)
            lines.append("".join(row))
        return "\n".join(lines)

    def _render_coords(self) -> str:
        board = self._board
        parts = ["Player (P) is at ({},{})".format(*board.cell(self._player))]
        parts += ["box (X) is at ({},{})".format(*board.cell(b)) for b in sorted(self._boxes)]
        parts += ["target (O) is at ({},{})".format(*board.cell(t)) for t in sorted(self._targets)]
        return "; ".join(parts) + "."

    # ---- solver ----

    def expert_actions(self, max_actions: int) -> list[str]:
        """The first `max_actions` actions of a shortest solution from the current position.

        Empty if the episode is over or no solution exists from here (a box was pushed into a
        dead position).
        """
        max_actions = check_int("max_actions", max_actions, 0)
        if self.episode_over:
            return []
        key = (self._player, tuple(sorted(self._boxes)))
        if self._plan_cache is None or self._plan_cache[0] != key:
            plan = _bfs(self._board, self._targets, key[1], self._player, 1_000_000)
            self._plan_cache = (key, plan)
        plan = self._plan_cache[1]
        return [] if plan is None else [ACTION_NAMES[k] for k in plan[:max_actions]]
