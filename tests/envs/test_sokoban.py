"""Sokoban rules, renders, level text, generator and solver."""

from collections import deque

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spa_rl.envs.sokoban import SokobanEnv, SokobanLevel, generate_sokoban_level, solve_sokoban
from spa_rl.errors import LevelFormatError

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Two boxes: one left of the player, one below; targets at (1,1) and (3,3).
TWO_BOXES = "\n".join(
    [
        "#######",
        "#O____#",
        "#_X_P_#",
        "#___X_#",
        "#___O_#",
        "#######",
    ]
)


def env_from(text, **options):
    return SokobanEnv.from_level_text(text, **options)


def test_paper_example_coordinates():
    env = env_from("######\n#___O#\n#____#\n###X_#\n###P_#\n######", render_mode="grid+coords")
    assert env.render() == (
        "######\n#___O#\n#____#\n###X_#\n###P_#\n######\n"
        "Player (P) is at (4,3); box (X) is at (3,3); target (O) is at (1,4)."
    )


def test_grid_round_trip_and_symbols():
    text = "#####\n#S_X#\n#√__#\n#####"
    env = env_from(text)
    assert env.render_text("grid") == text
    assert env.render_text("grid+coords").splitlines()[-1] == (
        "Player (P) is at (1,1); box (X) is at (1,3); box (X) is at (2,1); "
        "target (O) is at (1,1); target (O) is at (2,1)."
    )


def test_move_into_free_cell_and_into_wall():
    env = env_from("#####\n#P_X#\n#__O#\n#####")
    state, reward, term, trunc, info = env.step("Right")
    assert state == "#####\n#_PX#\n#__O#\n#####"
    assert reward == pytest.approx(-0.1) and not term and not trunc
    assert info["action_is_valid"] and info["action_is_effective"] and not info["success"]
    state, reward, _, _, info = env.step("Up")  # wall
    assert state == "#####\n#_PX#\n#__O#\n#####"
    assert reward == pytest.approx(-0.1) and info["action_is_valid"] and not info["action_is_effective"]
    assert env.steps == 2


def test_push_box_blocked_by_wall_and_by_box():
    env = env_from("######\n#_PX_#\n#_O__#\n######")
    env.step("Right")  # push box to (1,4)
    assert env.render() == "######\n#__PX#\n#_O__#\n######"
    state, reward, _, _, info = env.step("Right")  # box against the wall
    assert state == "######\n#__PX#\n#_O__#\n######"
    assert not info["action_is_effective"] and reward == pytest.approx(-0.1)
    env = env_from("######\n#PXX_#\n#_OO_#\n######")
    state, _, _, _, info = env.step("Right")  # box behind box
    assert state == "######\n#PXX_#\n#_OO_#\n######" and not info["action_is_effective"]


def test_box_onto_target_without_solving():
    env = env_from("######\n#P_XO#\n#___X#\n#___O#\n######")
    _, reward, _, _, _ = env.step("Right")
    assert reward == pytest.approx(-0.1)
    _, reward, term, _, info = env.step("Right")  # box onto (1,4); the other box is still off
    assert reward == pytest.approx(0.9) and not term and info["boxes_on_target"] == 1
    assert env.render() == "######\n#__P√#\n#___X#\n#___O#\n######"


def test_pushing_a_box_off_a_target_costs_one():
    env = env_from("#######\n#P√___#\n#__X__#\n#__O__#\n#######")
    _, reward, _, _, info = env.step("Right")
    assert reward == pytest.approx(-1.1) and info["boxes_on_target"] == 0
    assert env.render() == "#######\n#_SX__#\n#__X__#\n#__O__#\n#######"  # player on the target: S


def test_target_to_target_push_has_no_box_reward():
    env = env_from("######\n#P√O_#\n#_X__#\n######")
    _, reward, _, _, info = env.step("Right")
    assert reward == pytest.approx(-0.1) and info["boxes_on_target"] == 1
    assert env.render() == "######\n#_S√_#\n#_X__#\n######"


def test_solving_gives_ten_point_nine_and_terminates():
    env = env_from("#####\n#PXO#\n#####")
    _, reward, term, trunc, info = env.step("Right")
    assert reward == pytest.approx(10.9) and term and not trunc and info["success"]
    state, reward, term, _, info = env.step("Left")  # after the end: a no-op
    assert state == "#####\n#_P√#\n#####" and reward == 0.0 and term and info["success"]
    assert not info["action_is_effective"] and env.steps == 1


def test_three_move_solution_rewards_match_the_spec_example():
    env = env_from("######\n#P___#\n#__XO#\n######")
    rewards = [env.step(a)[1] for a in ("Down", "Right", "Right")]
    assert rewards == pytest.approx([-0.1, -0.1, 10.9]) and sum(rewards) == pytest.approx(10.7)


def test_invalid_action_text_changes_nothing():
    env = env_from("#####\n#P_X#\n#__O#\n#####")
    before = env.render()
    for text in ("Up.", "move up", "", "U", "upp", "Up Up"):
        state, reward, term, trunc, info = env.step(text)
        assert state == before and reward == 0.0 and not term and not trunc
        assert info == {"success": False, "action_is_valid": False, "action_is_effective": False, "boxes_on_target": 0,
                        "distance_to_goal": 1}  # the box (1,3) is one cell from the target (2,3)
    assert env.steps == 0
    assert env.step("  rIGHT \n")[4]["action_is_valid"]


def test_step_cap_truncates():
    env = env_from("####\n#P_#\n#XO#\n#__#\n####", max_steps=3)
    flags = [env.step("Up")[2:4] for _ in range(3)]
    assert flags == [(False, False), (False, False), (False, True)]


def test_level_without_outer_walls_treats_outside_as_wall():
    env = env_from("P_XO")
    assert not env.step("Left")[4]["action_is_effective"]
    assert not env.step("Up")[4]["action_is_effective"]
    env.step("Right")
    _, reward, term, _, _ = env.step("Right")
    assert term and reward == pytest.approx(10.9)


@pytest.mark.parametrize(
    "text, line, column, fragment",
    [
        ("####\n#PZ#\n####", 2, 3, "unknown symbol 'Z'"),
        ("####\n#PX#\n#O#\n####", 3, 4, "equally long"),
        ("#####\n#PXP#\n#O__#\n#####", 2, 4, "second player"),
        ("####\n#XO#\n####", 1, 1, "no player"),
        ("####\n#P_#\n####", 1, 1, "no box"),
        ("#####\n#PXX#\n#O__#\n#####", 2, 4, "2 boxes but 1 targets"),
        ("#####\n#PXO#\n#O__#\n#####", 3, 2, "1 boxes but 2 targets"),
        ("####\n#P√#\n####", 2, 3, "already solved"),
        ("\n\n####\n#P #\n####", 4, 3, "unknown symbol ' '"),
        ("####\n\n#PX#", 2, 1, "blank line"),
        ("", 1, 1, "empty"),
    ],
)
def test_level_errors_name_line_and_column(text, line, column, fragment):
    with pytest.raises(LevelFormatError) as err:
        SokobanEnv.from_level_text(text, source="lvl.txt")
    assert f"lvl.txt, line {line}, column {column}:" in str(err.value)
    assert fragment in str(err.value)
    assert (err.value.line, err.value.column) == (line, column)


def test_crlf_and_trailing_spaces_are_accepted():
    env = SokobanEnv.from_level_text("#####  \r\n#PXO#\r\n#####\r\n")
    assert env.render() == "#####\n#PXO#\n#####"


# ---- an independent breadth-first solver (no pruning) for cross-checks -------------------------

MOVES = {"Up": (-1, 0), "Down": (1, 0), "Left": (0, -1), "Right": (0, 1)}


def naive_shortest(level: SokobanLevel):
    def free(cell, boxes):
        r, c = cell
        return 0 <= r < level.rows and 0 <= c < level.cols and cell not in level.walls and cell not in boxes

    start = (level.player, frozenset(level.boxes))
    dist = {start: 0}
    queue = deque([start])
    while queue:
        state = queue.popleft()
        player, boxes = state
        if boxes == frozenset(level.targets):
            return dist[state]
        for dr, dc in MOVES.values():
            q = (player[0] + dr, player[1] + dc)
            new_boxes = boxes
            if q in boxes:
                beyond = (q[0] + dr, q[1] + dc)
                if not free(beyond, boxes):
                    continue
                new_boxes = (boxes - {q}) | {beyond}
            elif not free(q, boxes):
                continue
            new = (q, new_boxes)
            if new not in dist:
                dist[new] = dist[state] + 1
                queue.append(new)
    return None


@FAST
@given(seed=st.integers(0, 2**40))
def test_generated_levels_are_solvable_and_optimal(seed):
    level = generate_sokoban_level(seed)
    assert len(level.boxes) == len(level.targets) == 1
    assert not set(level.boxes) & set(level.targets)
    border = {(r, c) for r in range(6) for c in range(6) if r in (0, 5) or c in (0, 5)}
    assert border <= level.walls
    plan = solve_sokoban(level)
    assert plan is not None and len(plan) == naive_shortest(level)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**40))
def test_bigger_levels_with_two_boxes_are_solvable(seed):
    level = generate_sokoban_level(seed, (8, 8), 2)
    assert len(level.boxes) == len(level.targets) == 2
    assert solve_sokoban(level) is not None


def test_generation_is_deterministic():
    assert generate_sokoban_level(123) == generate_sokoban_level(123)
    assert SokobanEnv().reset(seed=5)[0] == SokobanEnv().reset(seed=5)[0]
    assert len({generate_sokoban_level(s).to_text() for s in range(30)}) > 20


@FAST
@given(seed=st.integers(0, 10**9))
def test_rewards_along_the_solution_add_up(seed):
    env = SokobanEnv()
    env.reset(seed=seed)
    plan = env.expert_actions(100)
    rewards = []
    for action in plan:
        _, reward, term, trunc, info = env.step(action)
        rewards.append(reward)
    assert term and info["success"] and not trunc
    n = len(plan)
    # one box, starting off its target: n - 1 steps of -0.1, then -0.1 + 1 + 10
    assert rewards[:-1] == pytest.approx([-0.1] * (n - 1))
    assert rewards[-1] == pytest.approx(10.9)
    assert sum(rewards) == pytest.approx(11.0 - 0.1 * n)


@FAST
@given(seed=st.integers(0, 10**9), actions=st.lists(st.sampled_from(["Up", "Down", "Left", "Right", "x"]), max_size=40))
def test_invariants_under_random_play(seed, actions):
    env = SokobanEnv(dim_room=(7, 7), num_boxes=2, max_steps=None)
    env.reset(seed=seed)
    start = env.current_level()
    on_target = sum(b in start.targets for b in start.boxes)
    for action in actions:
        _, reward, term, _, info = env.step(action)
        level = env.current_level()
        assert level.walls == start.walls and level.targets == start.targets
        assert len(set(level.boxes)) == len(start.boxes)
        assert level.player not in level.walls and level.player not in level.boxes
        assert not set(level.boxes) & level.walls
        now = sum(b in level.targets for b in level.boxes)
        if info["action_is_valid"]:
            expected = -0.1 + (now > on_target) - (now < on_target) + 10.0 * (now == len(level.boxes))
            assert reward == pytest.approx(expected)
        on_target = now
        if term:
            break


def test_expert_actions_prefix_and_dead_positions():
    env = env_from("######\n#P___#\n#__XO#\n######")
    assert env.expert_actions(2) == ["Down", "Right"]
    assert env.expert_actions(0) == []
    stuck = env_from("#####\n#X_O#\n#__P#\n#####")  # box in a corner: no solution
    assert stuck.expert_actions(10) == []
    assert solve_sokoban(stuck.current_level()) is None


def test_solver_trivial_cases():
    solved = SokobanLevel(3, 3, frozenset(), ((1, 1),), ((1, 1),), (0, 0))
    assert solve_sokoban(solved) == []


def reference_step(level: SokobanLevel, action: str):
    """The documented rules, written out independently on (row, col) sets."""
    dr, dc = MOVES[action]
    boxes = set(level.boxes)

    def blocked(cell):
        r, c = cell
        return not (0 <= r < level.rows and 0 <= c < level.cols) or cell in level.walls

    q = (level.player[0] + dr, level.player[1] + dc)
    player = level.player
    if not blocked(q):
        if q in boxes:
            beyond = (q[0] + dr, q[1] + dc)
            if not blocked(beyond) and beyond not in boxes:
                boxes = (boxes - {q}) | {beyond}
                player = q
        else:
            player = q
    before = sum(b in level.targets for b in level.boxes)
    after = sum(b in level.targets for b in boxes)
    solved = after == len(boxes)
    reward = -0.1 + (1.0 if after > before else -1.0 if after < before else 0.0) + (10.0 if solved else 0.0)
    new = SokobanLevel(level.rows, level.cols, level.walls, level.targets, tuple(sorted(boxes)), player)
    return new, reward, solved, player != level.player


@FAST
@given(seed=st.integers(0, 10**9), actions=st.lists(st.sampled_from(list(MOVES)), max_size=30))
def test_transitions_match_an_independent_implementation(seed, actions):
    env = SokobanEnv(dim_room=(7, 7), num_boxes=2)
    env.reset(seed=seed)
    for action in actions:
        expected, expected_reward, expected_done, moved = reference_step(env.current_level(), action)
        _, reward, term, _, info = env.step(action)
        assert env.current_level() == expected
        assert reward == pytest.approx(expected_reward) and term == expected_done == info["success"]
        assert info["action_is_effective"] == moved
        if term:
            break


def test_distance_to_goal_is_the_box_distance_to_the_nearest_target():
    """Sokoban's info["distance_to_goal"]: sum over boxes of the Manhattan distance to the
    nearest target; a push toward the target lowers it, 0 when solved."""
    env = SokobanEnv.from_level_text("######\n#PX_O#\n######")  # box (1,2), target (1,4)
    _, info = env.reset()
    assert info["distance_to_goal"] == 2
    assert env.step("Left")[4]["distance_to_goal"] == 2  # the player moves, the box does not
    env.reset()
    assert env.step("Right")[4]["distance_to_goal"] == 1
    info = env.step("Right")[4]
    assert info["success"] and info["distance_to_goal"] == 0
