"""Sudoku moves (valid/effective semantics), renders, level text, generator and solver."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spa_rl.envs.sudoku import (
    SudokuEnv,
    count_sudoku_solutions,
    generate_sudoku,
    parse_sudoku_action,
    solve_sudoku,
)
from spa_rl.errors import ConfigError, LevelFormatError

PUZZLE = "| 4 . . 3 | 3 1 . . | . 4 . 2 | 2 3 4 1 "  # the spec's example; solution below
SOLUTION = "| 4 2 1 3 | 3 1 2 4 | 1 4 3 2 | 2 3 4 1 "


def env_from(text=PUZZLE, **options):
    return SudokuEnv.from_level_text(text, **options)


@pytest.mark.parametrize(
    "text, move",
    [
        ("1,2,3", (1, 2, 3)),
        ("1 2 3", (1, 2, 3)),
        (" 1, 2, 3 extra words", (1, 2, 3)),
        ("1,2,3,4", (1, 2, 3)),
        ("place 3 at row 2 col 1", (2, 1, 3)),
        ("Row 4, Column 2: 7", (4, 2, 7)),
        ("row2 col3 value 1", (2, 3, 1)),
        ("-1,2,3", (-1, 2, 3)),
        ("a,b,c", None),
        ("1,2", None),
        ("", None),
        ("row 1 col 2", None),
        ("put a 3 somewhere", None),
        ("(1,2,3)", None),
    ],
)
def test_action_forms(text, move):
    assert parse_sudoku_action(text) == move


def test_renders():
    env = env_from(render_mode="grid+coords")
    assert env.render() == PUZZLE + "\nEmpty positions to be filled are at (1,2), (1,3), (2,3), (2,4), (3,1), (3,3)."
    one = env_from("| 4 2 1 3 | 3 1 2 4 | 1 4 3 2 | 2 3 4 . ", render_mode="grid+coords")
    assert one.render().splitlines()[1] == "Empty position to be filled is at (4,4)."
    one.step("4,4,1")
    assert one.render() == "| 4 2 1 3 | 3 1 2 4 | 1 4 3 2 | 2 3 4 1 \nNo empty positions found (board might be complete)."


def test_clue_cells_and_out_of_range_are_invalid_and_not_steps():
    env = env_from()
    for text in ("1,1,4", "1,1,2", "0,2,2", "5,1,1", "1,2,5", "1,2,0", "nonsense"):
        state, reward, term, trunc, info = env.step(text)
        assert state == PUZZLE and reward == 0.0 and not term and not trunc
        assert not info["action_is_valid"] and not info["action_is_effective"]
    assert env.steps == 0


def test_constraint_violation_is_valid_but_not_effective():
    env = env_from()
    for text in ("1,2,4", "1,2,3", "1,2,1"):  # row, row, column (the 1 at (2,2))
        state, reward, term, _, info = env.step(text)
        assert state == PUZZLE and reward == 0.0 and not term
        assert info["action_is_valid"] and not info["action_is_effective"]
    env2 = env_from("| . . . . | . . . . | . . . . | . . . 1 ")
    assert not env2.step("3,3,1")[4]["action_is_effective"]  # same 2x2 box
    assert env.steps == 3


def test_overwriting_an_agent_value_is_allowed():
    env = env_from()
    assert env.step("1,2,2")[4]["action_is_effective"]
    state, _, _, _, info = env.step("row 1 col 2 value 2")  # same value again
    assert info["action_is_valid"] and not info["action_is_effective"]
    state, _, _, _, info = env.step("1 2 1")
    assert not info["action_is_effective"]  # the 1 at (2,2) shares the column and box
    env.step("1,3,1")
    state, _, _, _, info = env.step("1,3,2")  # the 2 at (1,2) blocks it
    assert not info["action_is_effective"]
    env2 = env_from("| . . . . | . . . . | . . . . | . . . 1 ")
    env2.step("1,1,2")
    assert env2.step("1,1,3")[4]["action_is_effective"]
    assert env2.board[0] == 3


def test_completion_rewards_one_and_terminates():
    env = env_from()
    moves = ["1,2,2", "1,3,1", "2,3,2", "2,4,4", "3,1,1"]
    for move in moves:
        _, reward, term, _, info = env.step(move)
        assert reward == 0.0 and not term and info["action_is_effective"]
    state, reward, term, trunc, info = env.step("3,3,3")
    assert state == SOLUTION and reward == 1.0 and term and not trunc and info["success"]
    assert env.step("1,2,3")[1:4] == (0.0, True, False)


def test_step_cap():
    env = env_from(max_steps=2)
    assert env.step("1,2,4")[2:4] == (False, False)
    assert env.step("1,2,4")[2:4] == (False, True)
    assert env_from().max_steps == 30
    big = SudokuEnv(size=9)
    big.reset(seed=0)
    assert big.max_steps == 90


@pytest.mark.parametrize(
    "text",
    [PUZZLE, "4..3\n31..\n.4.2\n2341", "4 . . 3\n3 1 . .\n. 4 . 2\n2 3 4 1", "4003310004022341", "| 4 . . 3 | 3 1 . . | . 4 . 2 | 2 3 4 1 |"],
)
def test_level_formats(text):
    assert env_from(text).render() == PUZZLE


@pytest.mark.parametrize(
    "text, line, column, fragment",
    [
        ("4..3\n31..\n.4.2\n2344", 4, 4, "repeats the 4 at line 4, column 3"),
        ("4..3\n31..\n.4.2\n23x1", 4, 3, "not a digit"),
        ("4..3\n31..\n.4.2\n2351", 4, 3, "not a digit 1-4"),
        ("4..3\n31.\n.4.2\n2341", 2, 3, "row has 3 cells"),
        ("4..3\n31..\n.4.2", 3, 1, "found 3 rows"),
        ("4213\n3124\n1432\n2341", 1, 1, "no blank"),
        ("12..\n..34\n....\n....", 1, 1, "no solution"),
        ("| 4 . . 3 | 3 1 . . | . 4 . 2 | 2 3 4 1 \nEmpty positions", 2, 1, "single line"),
        ("| 4 . . 3 | 3 1 . . | . 4 . 2 | 2 3 41 ", 1, 37, "one character"),
        ("| 4 . . 3 | 3 1 . . | . 4 . 2 | 2 3 x 1 ", 1, 37, "not a digit"),
        ("4..33", 1, 5, "16 or 81"),
    ],
)
def test_level_errors_name_line_and_column(text, line, column, fragment):
    with pytest.raises(LevelFormatError) as err:
        SudokuEnv.from_level_text(text, source="s.txt")
    assert f"s.txt, line {line}, column {column}:" in str(err.value) and fragment in str(err.value)


def test_solver_counts():
    assert count_sudoku_solutions([0] * 16, 4, limit=1000) == 288  # all 4x4 sudoku grids
    assert count_sudoku_solutions([1, 1] + [0] * 14, 4) == 0
    assert solve_sudoku(env_from().board, 4) == tuple(int(ch) for ch in SOLUTION if ch.isdigit())
    assert count_sudoku_solutions([0] * 81, 9, limit=3) == 3


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**40), blanks=st.integers(0, 10))
def test_generated_4x4_puzzles_are_unique_with_exact_blanks(seed, blanks):
    puzzle = generate_sudoku(seed, 4, blanks)
    assert puzzle.blanks == blanks
    assert count_sudoku_solutions(puzzle.cells, 4, 2) == 1
    assert all(v in (0, s) for v, s in zip(puzzle.cells, puzzle.solution))
    assert generate_sudoku(seed, 4, blanks) == puzzle


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**40))
def test_generated_9x9_puzzles_are_unique_with_exact_blanks(seed):
    puzzle = generate_sudoku(seed, 9)
    assert puzzle.blanks == 45 and count_sudoku_solutions(puzzle.cells, 9, 2) == 1


def test_impossible_blank_counts_fail_clearly():
    with pytest.raises(ConfigError, match="blanks"):
        generate_sudoku(0, 4, 15, max_attempts=3)
    with pytest.raises(ConfigError, match="size"):
        SudokuEnv(size=6)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**9))
def test_expert_solves_generated_puzzles(seed):
    env = SudokuEnv(render_mode="grid+coords")
    env.reset(seed=seed)
    plan = env.expert_actions(50)
    assert len(plan) == 6
    rewards = [env.step(move)[1] for move in plan]
    assert rewards == [0.0] * 5 + [1.0] and env.episode_over


def test_expert_repairs_a_wrong_agent_value():
    env = env_from()
    env.step("1,3,2")  # fits the board but is wrong (the solution has 1 there)
    plan = env.expert_actions(50)
    assert plan[0] == "1,3,1"  # (1,2) needs the 2 that now sits at (1,3), so fix (1,3) first
    for move in plan:
        *_, info = env.step(move)
    assert info["success"]
