"""FrozenLake rules, slips, renders, level text, generator and the DP solver."""

import copy
from functools import lru_cache

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spa_rl.envs.frozenlake import (
    FrozenLakeEnv,
    FrozenLakeLevel,
    frozenlake_dp,
    generate_frozenlake_map,
    shortest_path_length,
    success_probability,
)
from spa_rl.errors import ConfigError, LevelFormatError

FAST = settings(max_examples=100, deadline=None)

MAP = "P__O\n_O__\n___G"  # start (0,0), holes (0,3), (1,1), goal (2,3)


def still(text=MAP, **options):
    return FrozenLakeEnv.from_level_text(text, is_slippery=False, **options)


def test_renders_and_coordinates():
    env = still(render_mode="grid+coords")
    assert env.render() == "P__O\n_O__\n___G\nPlayer (P) is at (0,0); hole (O) is at (0,3); hole (O) is at (1,1); goal (G) is at (2,3)."
    no_holes = still("G_\n_P", render_mode="grid+coords")
    assert no_holes.render().splitlines()[-1] == "Player (P) is at (1,1); goal (G) is at (0,0)."


@pytest.mark.parametrize(
    "action, expected, effective",
    [("Right", "_P_O\n_O__\n___G", True), ("Down", "___O\nPO__\n___G", True), ("Left", MAP, False), ("Up", MAP, False)],
)
def test_moves_and_borders(action, expected, effective):
    env = still()
    state, reward, term, trunc, info = env.step(action)
    assert state == expected and reward == 0.0 and not term and not trunc
    assert info["action_is_valid"] and info["action_is_effective"] is effective and not info["success"]
    assert info["executed_action"] == action and env.steps == 1


def test_hole_terminates_without_reward():
    env = still()
    env.step("Down")
    state, reward, term, trunc, info = env.step("Right")
    assert state == "___O\n_X__\n___G" and reward == 0.0 and term and not trunc and not info["success"]
    assert env.step("Right")[1:4] == (0.0, True, False)  # after the end: a no-op


def test_goal_gives_one_and_terminates():
    env = still()
    rewards = [env.step(a)[1] for a in ("Down", "Down", "Right", "Right")]
    state, reward, term, _, info = env.step("Right")
    assert rewards == [0.0] * 4
    assert state == "___O\n_O__\n___√" and reward == 1.0 and term and info["success"]


def test_invalid_action_draws_no_random_number_and_is_not_a_step():
    env = FrozenLakeEnv.from_level_text(MAP)
    env.reset(seed=3)
    before = copy.deepcopy(env.np_random.bit_generator.state)
    for text in ("left.", "go left", "", "L"):
        state, reward, term, trunc, info = env.step(text)
        assert state == MAP and reward == 0.0 and not term and not trunc
        assert not info["action_is_valid"] and not info["action_is_effective"] and info["executed_action"] is None
    assert env.np_random.bit_generator.state == before and env.steps == 0
    assert env.step(" LEFT ")[4]["action_is_valid"]


def executed_counts(action, trials, **options):
    """How often each direction was executed for `action` from the middle of an open map."""
    env = FrozenLakeEnv.from_level_text("_____\n_____\n__P__\n_____\n____G", **options)
    counts = {"Left": 0, "Down": 0, "Right": 0, "Up": 0}
    for seed in range(trials):
        env.reset(seed=seed)
        counts[env.step(action)[4]["executed_action"]] += 1
    return counts


def chi_square(observed, probs):
    n = sum(observed)
    return sum((o - n * p) ** 2 / (n * p) for o, p in zip(observed, probs))


@pytest.mark.parametrize("action, left_turn, right_turn", [("Left", "Up", "Down"), ("Down", "Left", "Right"), ("Up", "Right", "Left")])
def test_slip_frequencies_are_a_third_each(action, left_turn, right_turn):
    counts = executed_counts(action, 3000)
    observed = [counts[left_turn], counts[action], counts[right_turn]]
    assert sum(observed) == 3000  # never the opposite direction
    # 2 degrees of freedom: P(chi2 > 13.82) = 0.001; the trials are seeded, so this never flakes.
    assert chi_square(observed, [1 / 3, 1 / 3, 1 / 3]) < 13.82


def test_custom_success_rate_and_non_slippery():
    counts = executed_counts("Right", 3000, success_rate=0.8)
    assert chi_square([counts["Up"], counts["Right"], counts["Down"]], [0.1, 0.8, 0.1]) < 13.82
    assert executed_counts("Right", 50, is_slippery=False)["Right"] == 50


def test_same_seed_same_slips_on_the_same_level():
    def run(seed):
        env = FrozenLakeEnv()
        env.reset(seed=seed)
        return [env.step(a)[4]["executed_action"] for a in ["Left", "Right", "Up", "Down"] * 3 if not env.episode_over]

    assert run(11) == run(11)
    env = FrozenLakeEnv.from_level_text("_____\n_____\n__P__\n_____\n____G")
    seqs = set()
    for seed in range(20):
        env.reset(seed=seed)
        seqs.add(tuple(env.step("Right")[4]["executed_action"] for _ in range(2)))
    assert len(seqs) > 3


@pytest.mark.parametrize(
    "text, line, column, fragment",
    [
        ("P_\n_Z\n_G", 2, 2, "unknown symbol 'Z'"),
        ("P_\n_X\n_G", 2, 2, "finished game"),
        ("P_\n_√", 2, 2, "finished game"),
        ("PG\n_G", 2, 2, "second goal"),
        ("PG\nS_", 2, 1, "second start"),
        ("__\n_G", 1, 1, "no player"),
        ("P_\n__", 1, 1, "no goal"),
        ("P__\n_G", 2, 3, "equally long"),
    ],
)
def test_level_errors_name_line_and_column(text, line, column, fragment):
    with pytest.raises(LevelFormatError) as err:
        FrozenLakeEnv.from_level_text(text, source="map.txt")
    assert f"map.txt, line {line}, column {column}:" in str(err.value) and fragment in str(err.value)


def test_gymnasium_letters_are_accepted():
    env = FrozenLakeEnv.from_level_text("SFFF\nFHFH\nFFFH\nHFFG")
    assert env.render() == "P___\n_O_O\n___O\nO__G"


@FAST
@given(seed=st.integers(0, 2**40), size=st.sampled_from([2, 4, 6]), frozen=st.sampled_from([0.5, 0.8, 1.0]),
       layout=st.sampled_from(["random", "corners"]))
def test_generated_maps_have_a_path(seed, size, frozen, layout):
    level = generate_frozenlake_map(seed, size, frozen, layout=layout)
    assert (level.rows, level.cols) == (size, size)
    assert level.start != level.goal and level.start not in level.holes and level.goal not in level.holes
    assert shortest_path_length(level) is not None
    if frozen == 1.0:
        assert not level.holes
    if layout == "corners":  # gymnasium's layout
        assert level.start == (0, 0) and level.goal == (size - 1, size - 1)
    assert generate_frozenlake_map(seed, size, frozen, layout=layout) == level


def test_random_layout_places_start_and_goal_anywhere():
    """The default layout (the reference's) does not pin start and goal to the corners."""
    levels = [generate_frozenlake_map(seed, 4) for seed in range(50)]
    assert len({level.start for level in levels}) > 8 and len({level.goal for level in levels}) > 8


def test_generator_rejects_bad_options():
    with pytest.raises(ConfigError, match="frozen_prob"):
        FrozenLakeEnv(frozen_prob=0.0)
    with pytest.raises(ConfigError, match="success_rate"):
        FrozenLakeEnv(success_rate=1.5)
    with pytest.raises(ConfigError, match="size"):
        FrozenLakeEnv(size=1)
    with pytest.raises(ConfigError, match="layout: 'corner' is not one of random, corners"):
        FrozenLakeEnv(layout="corner")


# ---- solver: compare the DP with a plain recursive expectimax -----------------------------------

STEPS = ((0, -1), (1, 0), (0, 1), (-1, 0))


def expectimax(level: FrozenLakeLevel, budget: int, slippery: bool, rate: float):
    @lru_cache(maxsize=None)
    def value(cell, k):
        if cell == level.goal:
            return 1.0
        if cell in level.holes or k == 0:
            return 0.0
        best = 0.0
        for a in range(4):
            outcomes = [((a - 1) % 4, (1 - rate) / 2), (a, rate), ((a + 1) % 4, (1 - rate) / 2)] if slippery else [(a, 1.0)]
            total = 0.0
            for d, p in outcomes:
                r, c = cell[0] + STEPS[d][0], cell[1] + STEPS[d][1]
                nxt = (r, c) if 0 <= r < level.rows and 0 <= c < level.cols else cell
                total += p * value(nxt, k - 1)
            best = max(best, total)
        return best

    return value


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10**6), budget=st.integers(0, 7), slippery=st.booleans(), rate=st.sampled_from([1 / 3, 0.8]))
def test_dp_matches_expectimax(seed, budget, slippery, rate):
    level = generate_frozenlake_map(seed, 4, 0.7)
    values, policy = frozenlake_dp(level, budget, is_slippery=slippery, success_rate=rate)
    reference = expectimax(level, budget, slippery, rate)
    for k in range(budget + 1):
        for r in range(4):
            for c in range(4):
                assert values[k, r, c] == pytest.approx(reference((r, c), k), abs=1e-12)
    assert np.all(np.diff(values, axis=0) >= -1e-12)  # more budget never hurts
    if not slippery:
        path = shortest_path_length(level)
        assert success_probability(level, budget, is_slippery=False) == (1.0 if path <= budget else 0.0)


def test_expert_plan_reaches_the_goal_when_not_slippery():
    env = still()
    plan = env.expert_actions(10)
    assert len(plan) == shortest_path_length(env.level) == 5
    for action in plan:
        *_, info = env.step(action)
    assert info["success"]


def test_expert_picks_the_safe_action_when_slippery():
    # Goal to the left; Up is a hole. "Left" risks the hole (slip Up); "Down" slips Left or Right only.
    # With one action left both reach the goal with 1/3 (tie -> lowest id, Left); with more,
    # Down keeps the player alive for another try.
    env = FrozenLakeEnv.from_level_text("_O__\nGP__")
    values, policy = env.optimal_policy(3)
    assert values[1, 1, 1] == pytest.approx(1 / 3) and policy[1, 1, 1] == 0
    assert env.expert_actions(1) == ["Left"]
    assert env.expert_actions(3) == ["Down"] and policy[3, 1, 1] == 1
    assert values[3, 1, 1] > 1 / 3 + 0.1
    assert env.expert_actions(0) == []


@FAST
@given(seed=st.integers(0, 10**9), actions=st.lists(st.sampled_from(["Left", "Down", "Right", "Up"]), max_size=20))
def test_transitions_match_the_documented_rules(seed, actions):
    env = FrozenLakeEnv(size=5)
    env.reset(seed=seed)
    level = env.level
    perpendicular = {"Left": {"Up", "Down"}, "Right": {"Up", "Down"}, "Up": {"Left", "Right"}, "Down": {"Left", "Right"}}
    for action in actions:
        before = env.player
        _, reward, term, trunc, info = env.step(action)
        executed = info["executed_action"]
        assert executed == action or executed in perpendicular[action]
        dr, dc = STEPS[["Left", "Down", "Right", "Up"].index(executed)]
        r, c = before[0] + dr, before[1] + dc
        expected = (r, c) if 0 <= r < level.rows and 0 <= c < level.cols else before
        assert env.player == expected and info["action_is_effective"] == (expected != before)
        assert reward == (1.0 if expected == level.goal else 0.0) and not trunc
        assert term == (expected == level.goal or expected in level.holes) and info["success"] == (expected == level.goal)
        if term:
            break


def test_distance_to_goal_follows_the_path_around_the_holes():
    """info["distance_to_goal"] is the shortest path around holes from the player: on MAP the
    start is 5 moves away (Down, Down, Right, Right, Right), 0 on the goal, None in a hole."""
    env = still()
    _, info = env.reset()
    assert info["distance_to_goal"] == 5 == shortest_path_length(env.level)
    assert env.step("Down")[4]["distance_to_goal"] == 4
    assert env.step("Up")[4]["distance_to_goal"] == 5  # a step back away from the goal
    assert env.step("Right")[4]["distance_to_goal"] == 4  # (0,1): round the hole by (0,2), (1,2), (2,2)
    for action in ("Left", "Down", "Down", "Right", "Right"):
        info = env.step(action)[4]
    assert info["distance_to_goal"] == 1
    assert env.step("Right")[4]["distance_to_goal"] == 0
    env.reset()
    assert env.step("Down")[4]["distance_to_goal"] == 4
    assert env.step("Right")[4]["distance_to_goal"] is None  # (1,1) is a hole
