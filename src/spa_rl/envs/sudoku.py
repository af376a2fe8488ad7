"""Sudoku: the env, its puzzle generator (unique solution, exact blank count) and a solver."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from spa_rl.envs.base import TextGameEnv, check_int, level_rng
from spa_rl.envs.levels import DEFAULT_SOURCE, level_error, level_lines
from spa_rl.errors import ConfigError

SIZES = (4, 9)
DEFAULT_BLANKS = {4: 6, 9: 45}
BLANK = "."
SOLVED_REWARD = 1.0
AUTO = "auto"

_INT = re.compile(r"^[+-]?[0-9]+$")
_ROW = re.compile(r"row\s*[:=#]?\s*([0-9]+)")
_COL = re.compile(r"col(?:umn)?\s*[:=#]?\s*([0-9]+)")
_NUMBER = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class SudokuPuzzle:
    """A board of side `size` (4 or 9); `cells` row-major with 0 for a blank.

    `solution` (row-major digits) is filled in by the generator and ignored in comparisons.
    """

    size: int
    cells: tuple[int, ...]
    solution: tuple[int, ...] | None = field(default=None, compare=False)

    @property
    def blanks(self) -> int:
        return sum(1 for v in self.cells if v == 0)

    def to_text(self) -> str:
        """The one-line `grid` render (the level text format)."""
        return render_board(self.cells, self.size)


def render_board(cells: tuple[int, ...] | list[int], size: int) -> str:
    """`| 4 . . 3 | 3 1 . . | ...`: per row `"| "` then every cell and a space; no newline."""
    parts = []
    for r in range(size):
        parts.append("| " + "".join((str(v) if v else BLANK) + " " for v in cells[r * size : (r + 1) * size]))
    return "".join(parts)


@lru_cache(maxsize=None)
def _peers(size: int) -> tuple[tuple[int, ...], ...]:
    """For each cell, the other cells of its row, column and box."""
    box = math.isqrt(size)
    out = []
    for i in range(size * size):
        r, c = divmod(i, size)
        same = {r * size + k for k in range(size)} | {k * size + c for k in range(size)}
        br, bc = r - r % box, c - c % box
        same |= {(br + a) * size + bc + b for a in range(box) for b in range(box)}
        same.discard(i)
        out.append(tuple(sorted(same)))
    return tuple(out)


# ---- solver -----------------------------------------------------------------------------------


def _search(cells: tuple[int, ...] | list[int], size: int, limit: int) -> tuple[int, list[int] | None]:
    """(number of solutions up to `limit`, the first solution found) by backtracking on the
    most constrained blank, values tried in increasing order."""
    box = math.isqrt(size)
    grid = list(cells)
    rows, cols, boxes = [0] * size, [0] * size, [0] * size
    blanks = []
    for i, v in enumerate(grid):
        r, c = divmod(i, size)
        k = (r // box) * box + c // box
        if v:
            bit = 1 << v
            if (rows[r] | cols[c] | boxes[k]) & bit:
                return 0, None
            rows[r] |= bit
            cols[c] |= bit
            boxes[k] |= bit
        else:
            blanks.append((i, r, c, k))
    full = ((1 << (size + 1)) - 1) ^ 1  # bits 1..size
    state: dict[str, Any] = {"count": 0, "first": None}

    def recurse(open_blanks: list[tuple[int, int, int, int]]) -> None:
        if not open_blanks:
            state["count"] += 1
            if state["first"] is None:
                state["first"] = list(grid)
            return
        best, best_cands, best_n = 0, 0, size + 1
        for j, (_, r, c, k) in enumerate(open_blanks):
            cands = full & ~(rows[r] | cols[c] | boxes[k])
            n = cands.bit_count()
            if n < best_n:
                best, best_cands, best_n = j, cands, n
                if n <= 1:
                    break
        if best_n == 0:
            return
        i, r, c, k = open_blanks[best]
        rest = open_blanks[:best] + open_blanks[best + 1 :]
        cands = best_cands
        while cands:
            bit = cands & -cands
            cands ^= bit
            grid[i] = bit.bit_length() - 1
            rows[r] |= bit
            cols[c] |= bit
            boxes[k] |= bit
            recurse(rest)
            rows[r] ^= bit
            cols[c] ^= bit
            boxes[k] ^= bit
            if state["count"] >= limit:
                break
        grid[i] = 0

    recurse(blanks)
    return state["count"], state["first"]


def count_sudoku_solutions(cells: tuple[int, ...] | list[int], size: int, limit: int = 2) -> int:
    """How many solutions the board has, counting no further than `limit`."""
    return _search(cells, size, limit)[0]


def solve_sudoku(cells: tuple[int, ...] | list[int], size: int) -> tuple[int, ...] | None:
    """A solution (the first in the solver's order), or None if there is none."""
    solution = _search(cells, size, 1)[1]
    return None if solution is None else tuple(solution)


# ---- generator --------------------------------------------------------------------------------


def generate_sudoku(seed: int, size: int = 4, blanks: int | None = None, *, max_attempts: int = 50) -> SudokuPuzzle:
    """The puzzle of `seed`: exactly `blanks` empty cells (default 6 for 4x4, 45 for 9x9) and
    exactly one solution.

    Each attempt (randomness from `level_rng(seed)`, in this order): a full grid from the
    pattern `((r * b + r // b + c) % N) + 1` (b = box side) with the bands, the rows inside
    each band, the stacks, the columns inside each stack and the digits randomly permuted;
    then the cells are visited in a random order and each is emptied if the puzzle still has
    a unique solution, until `blanks` cells are empty. Too few could be emptied: next attempt
    (fresh grid and order). No success after `max_attempts` -> `ConfigError`.
    """
    size = _check_size(size)
    blanks = DEFAULT_BLANKS[size] if blanks is None else check_int("blanks", blanks, 0, size * size - 1)
    box = math.isqrt(size)
    rng = level_rng(seed)
    for _ in range(max_attempts):
        band_rows = [g * box + r for g in rng.permutation(box) for r in rng.permutation(box)]
        stack_cols = [g * box + c for g in rng.permutation(box) for c in rng.permutation(box)]
        digits = [int(d) + 1 for d in rng.permutation(size)]
        solution = tuple(
            digits[(r * box + r // box + c) % size] for r in band_rows for c in stack_cols
        )
        cells = list(solution)
        empty = 0
        for i in rng.permutation(size * size):
            if empty == blanks:
                break
            i = int(i)
            cells[i] = 0
            if count_sudoku_solutions(cells, size, 2) == 1:
                empty += 1
            else:
                cells[i] = solution[i]
        if empty == blanks:
            return SudokuPuzzle(size, tuple(cells), solution)
    raise ConfigError(
        f"blanks={blanks}: no {size}x{size} puzzle with a unique solution found in {max_attempts} attempts "
        f"(seed {seed}); use fewer blanks"
    )


def _check_size(size: Any) -> int:
    if size not in SIZES or isinstance(size, bool):
        raise ConfigError(f"size: Sudoku boards are 4x4 or 9x9, got size={size!r}")
    return int(size)


# ---- actions and level text -------------------------------------------------------------------


def parse_sudoku_action(text: str) -> tuple[int, int, int] | None:
    """`(row, col, value)` as written (1-indexed, not range-checked), or None if unreadable.

    Forms: `r,c,v` or `r c v` (commas become spaces; the first three tokens must be
    integers, further tokens are ignored), or text containing `row R` and `col C` (or
    `column C`), case-insensitive, whose value is the first other number
    (`place 3 at row 2 col 1` -> (2, 1, 3)).
    """
    tokens = text.replace(",", " ").split()
    if len(tokens) >= 3 and all(_INT.match(t) for t in tokens[:3]):
        r, c, v = (int(t) for t in tokens[:3])
        return r, c, v
    lower = text.lower()
    row, col = _ROW.search(lower), _COL.search(lower)
    if row is None or col is None:
        return None
    rest = lower
    for m in sorted((row, col), key=lambda m: m.start(), reverse=True):
        rest = rest[: m.start()] + " " + rest[m.end() :]
    value = _NUMBER.search(rest)
    if value is None:
        return None
    return int(row.group(1)), int(col.group(1)), int(value.group(0))


def parse_sudoku_level(text: str, source: str = DEFAULT_SOURCE) -> SudokuPuzzle:
    """Read a puzzle: the one-line `grid` render (`| 4 . . 3 | 3 1 . . | ...`), one line per
    row (`4..3`, spaces between cells allowed) or all cells on one line (`4..331..` 16 or 81
    cells). Blanks are `.` or `0`. Every digit is a clue. The puzzle must be free of
    conflicts, have a blank and have at least one solution."""
    lines = level_lines(text, source)
    if lines[0][1].lstrip().startswith("|"):
        grid = _cells_from_render(lines, source)
    else:
        grid = _cells_from_rows(lines, source)
    size = len(grid)
    if size not in SIZES:
        number, column, _ = grid[-1][0] if grid[-1] else (lines[-1][0], 1, "")
        raise level_error(source, number, column, f"found {size} rows; Sudoku boards are 4x4 or 9x9")
    cells: list[int] = []
    for row in grid:
        if len(row) != size:
            number, column, _ = row[-1] if row else (lines[0][0], 1, "")
            raise level_error(source, number, column, f"row has {len(row)} cells; a {size}x{size} board needs {size}")
        for number, column, ch in row:
            if ch in (".", "0"):
                cells.append(0)
            elif ch.isdigit() and ch.isascii() and 1 <= int(ch) <= size:
                cells.append(int(ch))
            else:
                raise level_error(source, number, column, f"cell {ch!r} is not a digit 1-{size} or a blank ('.' or '0')")
    where = [(number, column) for row in grid for number, column, _ in row]
    peers = _peers(size)
    for i, v in enumerate(cells):
        clash = [j for j in peers[i] if j < i and cells[j] == v] if v else []
        if clash:
            line, column = where[i]
            first = where[clash[0]]
            raise level_error(source, line, column, f"clue {v} repeats the {v} at line {first[0]}, column {first[1]} (same row, column or box)")
    if 0 not in cells:
        raise level_error(source, where[0][0], where[0][1], "the board has no blank cell; there is nothing to play")
    if count_sudoku_solutions(cells, size, 1) == 0:
        raise level_error(source, where[0][0], where[0][1], "the puzzle has no solution")
    return SudokuPuzzle(size, tuple(cells))


def _cells_from_render(lines: list[tuple[int, str]], source: str) -> list[list[tuple[int, int, str]]]:
    if len(lines) > 1:
        number, _ = lines[1]
        raise level_error(source, number, 1, "the one-line '| ...' format takes a single line")
    number, line = lines[0]
    rows: list[list[tuple[int, int, str]]] = []
    token_start = None
    for column, ch in enumerate(line + " ", start=1):
        if ch == "|" or ch.isspace():
            if token_start is not None:
                token = line[token_start - 1 : column - 1]
                if len(token) != 1:
                    raise level_error(source, number, token_start, f"cell {token!r} should be one character")
                rows[-1].append((number, token_start, token))
                token_start = None
            if ch == "|":
                rows.append([])
        elif token_start is None:
            if not rows:
                raise level_error(source, number, column, "expected '|' before the first row")
            token_start = column
    if len(rows) > 1 and not rows[-1]:
        rows.pop()  # a closing '|' after the last row
    return rows


def _cells_from_rows(lines: list[tuple[int, str]], source: str) -> list[list[tuple[int, int, str]]]:
    rows = [[(number, column, ch) for column, ch in enumerate(line, start=1) if not ch.isspace()] for number, line in lines]
    if len(rows) == 1:
        n = math.isqrt(len(rows[0]))
        if n * n != len(rows[0]) or n not in SIZES:
            number, column, _ = rows[0][-1]
            raise level_error(source, number, column, f"{len(rows[0])} cells on one line; a one-line board has 16 or 81 cells")
        return [rows[0][r * n : (r + 1) * n] for r in range(n)]
    return rows


# ---- env --------------------------------------------------------------------------------------------


class SudokuEnv(TextGameEnv):
    """Sudoku: fill every blank so that each row, column and box holds every digit once.

    ## Description
    A 4x4 (boxes 2x2, digits 1-4) or 9x9 (boxes 3x3, digits 1-9) board with some clues.
    Generated puzzles (`generate_sudoku`) have exactly the requested number of blanks and
    exactly one solution. Moves can only place digits that fit the current board; a digit
    placed by the agent may later be overwritten, a clue never.

    ## Action Space
    Free text, one move per action (`action_names` is None): `r,c,v`, `r c v` (the first
    three tokens must be integers; more tokens are ignored) or text with `row R` and
    `col C`/`column C` whose value is the first other number (`place 3 at row 2 col 1`).
    Rows and columns are 1-indexed. Outcomes, checked in this order:
    1. Unreadable, row/column/value out of range, or the cell holds a clue: invalid
       (`action_is_valid = False`): no change, reward 0.0, not counted as a step.
    2. The value already appears in another cell of the row, column or box, or the cell
       already holds that value: valid but not effective; a step with reward 0.0.
    3. Otherwise the value is written (replacing an earlier agent value, if any):
       `action_is_effective = True`; reward 1.0 if the board is now full, else 0.0.

    ## Observation
    `render_text(render_mode)`. `grid`: one line, each row as `"| "` followed by every cell
    and a space (`.` blank), e.g. `| 4 . . 3 | 3 1 . . | . 4 . 2 | 2 3 4 1 ` (trailing space,
    no newline). `grid+coords` adds a newline and
    `Empty positions to be filled are at (1,2), (1,3).` (1-indexed (row,col), row-major);
    with one blank `Empty position to be filled is at (r,c).`; with none
    `No empty positions found (board might be complete).`

    ## Rewards
    1.0 for the move that fills the last blank, else 0.0: an episode returns 1.0 on success.

    ## Episode End
    - Termination: the board is full (`info["success"] = True`); every written digit fits, so
      a full board is a solution.
    - Truncation: `max_steps` counted steps (default "auto": 30, the reference value, or
      twice the number of blanks if that is larger).

    ## Arguments
    - `render_mode`: `"grid"` (default) or `"grid+coords"`.
    - `size`: 4 (default) or 9.
    - `blanks`: empty cells of generated puzzles, default 6 (4x4) / 45 (9x9).
    - `max_steps`: step cap (truncation): an int, None (no cap) or "auto" (default).

    ## Level text
    The one-line render, one line per row (`4..3`), or all cells on one line; blanks `.` or
    `0`; every digit is a clue. Conflicting clues, a full board and an unsolvable board are
    rejected; several solutions are allowed (any full board wins).

    ## Deviations from the reference (RAGEN PR #147)
    - Invalid moves (unreadable, out of range, clue cell) do not count as steps; the
      reference counts every call towards its 30-step cap.
    - Writing the value a cell already holds is not effective (the board does not change).
    - Generation restarts with a fresh grid when digging stalls (the reference retries up to
      8 reshuffled passes); randomness comes from `level_rng(seed)`, never from the global
      `random`/`np.random` state.
    - Render modes are `grid` / `grid+coords` (reference: `text` / `text_with_coordinates`
      chosen by the `RENDER_MODE` environment variable); stepping after the end is a no-op.

    ## Version History
    - v0: initial version.
    """

    name = "sudoku"
    action_names = None
    default_action_budget = 50

    def __init__(
        self,
        render_mode: str | None = "grid",
        size: int = 4,
        blanks: int | None = None,
        max_steps: int | str | None = AUTO,
    ) -> None:
        super().__init__(render_mode=render_mode, max_steps=None)
        self.size = _check_size(size)
        self.blanks = DEFAULT_BLANKS[self.size] if blanks is None else check_int("blanks", blanks, 0, self.size * self.size - 1)
        if max_steps != AUTO:
            check_int("max_steps", max_steps, 1, allow_none=True)
        self._max_steps_option = max_steps
        self._set_observation_space(self.size, self.size)

    # ---- levels ----

    @classmethod
    def parse_level(cls, text: str, source: str = DEFAULT_SOURCE) -> SudokuPuzzle:
        return parse_sudoku_level(text, source)

    def generate_level(self, seed: int) -> SudokuPuzzle:
        return generate_sudoku(seed, self.size, self.blanks)

    @staticmethod
    def _level_shape(level: SudokuPuzzle) -> tuple[int, int]:
        return level.size, 2 * level.size + 1

    def _load_level(self, level: SudokuPuzzle) -> None:
        self._puzzle = level
        self._n = level.size
        self._board = list(level.cells)
        self._clue = [v != 0 for v in level.cells]
        self._empty = level.blanks
        self._solution = level.solution
        option = self._max_steps_option
        self.max_steps = max(30, 2 * level.blanks) if option == AUTO else option

    @property
    def board(self) -> tuple[int, ...]:
        """The current cells, row-major, 0 for a blank."""
        return tuple(self._board)

    # ---- rules ----

    def _parse_action(self, text: str) -> tuple[int, int] | None:
        move = parse_sudoku_action(text)
        if move is None:
            return None
        r, c, v = move
        n = self._n
        if not (1 <= r <= n and 1 <= c <= n and 1 <= v <= n):
            return None
        i = (r - 1) * n + (c - 1)
        return None if self._clue[i] else (i, v)

    def _apply(self, move: tuple[int, int]) -> tuple[float, bool, dict[str, Any]]:
        i, v = move
        board = self._board
        if board[i] == v or any(board[j] == v for j in _peers(self._n)[i]):
            return 0.0, False, {}
        if board[i] == 0:
            self._empty -= 1
        board[i] = v
        return (SOLVED_REWARD if self._empty == 0 else 0.0), True, {}

    def _is_over(self) -> bool:
        return self._empty == 0

    def _is_success(self) -> bool:
        return self._empty == 0

    # ---- renders ----

    def _render_grid(self) -> str:
        return render_board(self._board, self._n)

    def _render_coords(self) -> str:
        n = self._n
        empty = [f"({i // n + 1},{i % n + 1})" for i, v in enumerate(self._board) if v == 0]
        if not empty:
            return "No empty positions found (board might be complete)."
        if len(empty) == 1:
            return f"Empty position to be filled is at {empty[0]}."
        return f"Empty positions to be filled are at {', '.join(empty)}."

    # ---- solver ----

    def expert_actions(self, max_actions: int) -> list[str]:
        """Up to `max_actions` moves `"r,c,v"` towards a solution, each effective when played
        in order.

        If the current board (agent values included) can still be completed: its completion's
        values for the blanks, row-major. Otherwise (a wrong agent value): corrections
        towards the puzzle's solution, each chosen as the first row-major cell that differs
        from the solution and whose solution value fits the board at that point; this can stop
        early when two wrong values block each other (Sudoku has no erase move).
        """
        max_actions = check_int("max_actions", max_actions, 0)
        if self.episode_over or max_actions == 0:
            return []
        n, board = self._n, list(self._board)
        completion = solve_sudoku(board, n)
        if completion is not None:
            moves = [(i, completion[i]) for i, v in enumerate(board) if v == 0]
            return [f"{i // n + 1},{i % n + 1},{v}" for i, v in moves[:max_actions]]
        if self._solution is None:
            self._solution = solve_sudoku(self._puzzle.cells, n)
        solution, peers, plan = self._solution, _peers(n), []
        assert solution is not None  # parse_level and the generator only admit solvable puzzles
        while len(plan) < max_actions:
            for i in range(n * n):
                v = solution[i]
                if board[i] != v and not any(board[j] == v for j in peers[i]):
                    board[i] = v
                    plan.append(f"{i // n + 1},{i % n + 1},{v}")
                    break
            else:
                break
        return plan
