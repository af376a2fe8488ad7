"""Episode: the per-turn rules of SPEC 1.5 on the real games."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import spa_rl.envs
from spa_rl.agent import (
    Episode,
    EpisodeConfig,
    PromptSet,
    aggregate_metrics,
    episode_metrics,
    serialize_response,
)
from spa_rl.errors import ConfigError

# Player at (1,1), box at (1,2), target at (1,4): "Right || Right" solves it.
CORRIDOR = "######\n#PX_O#\n######"
# The paper's level: shortest solution Up, Up, Left, Up, Right.
PAPER = "######\n#___O#\n#____#\n###X_#\n###P_#\n######"
# A 4x4 Sudoku with 6 blanks; the solution of (1,2) is 2 and of (3,1) is 1.
BOARD = "| 4 . . 3 | 3 1 . . | . 4 . 2 | 2 3 4 1"


def level_env(name, text, **options):
    cls = type(spa_rl.envs.make(name))
    return cls.from_level_text(text, **options)


def base(answer, think="ok"):
    return f"<think> {think} </think> <answer> {answer} </answer>"


def test_messages_and_reward_text():
    env = level_env("sokoban", PAPER)
    ep = Episode(env, level_seed=0, config=EpisodeConfig())
    s0 = env.render_text("grid+coords")
    assert ep.states == [s0]
    assert [m["role"] for m in ep.messages] == ["system", "user"]
    assert ep.messages[0]["content"] == PromptSet.load("sokoban").build_system_message()
    assert f"\nTurn 1:\nState:\n{s0}\nYou have 10 actions left." in ep.messages[1]["content"]
    assert ep.next_user_message == ep.messages[1]["content"]

    text = base("Right || Right || Right")  # (4,4) then two bumps into the wall
    rec = ep.apply_response(text)
    assert rec.actions_executed == ["Right"] * 3
    assert rec.action_rewards == pytest.approx([-0.1] * 3)
    assert rec.format_penalty == 0.0 and rec.num_effective == 1 and rec.num_valid == 3
    assert ep.messages[2] == {"role": "assistant", "content": text}  # raw text, as generated
    user = ep.messages[3]["content"]
    assert user.startswith("Reward:\n-0.3\n\nTurn 2:\nState:\n" + ep.states[1] + "\nYou have 7 actions left.")
    assert ep.next_user_message == user
    assert ep.total_reward == pytest.approx(-0.3) and ep.score == ep.total_reward
    assert not ep.done and ep.num_actions == 3 and ep.actions_left == 7


def test_env_reset_with_level_seed():
    env = spa_rl.envs.make("sokoban", render_mode="grid+coords")
    ep = Episode(env, level_seed=123, config=EpisodeConfig())
    other = spa_rl.envs.make("sokoban")
    other.reset(seed=123)
    assert ep.states[0] == other.render_text("grid+coords")
    assert ep.level_seed == 123 and ep.env_name == "sokoban" and ep.action_budget == 10
    grid_ep = Episode(other, level_seed=123, config=EpisodeConfig(render_mode="grid"))
    assert grid_ep.states[0] == other.render_text("grid")


@pytest.mark.parametrize(
    "text, executed, penalized",
    [
        ("no tags at all: Up", [], True),
        ("<think>x</think> <answer>Up", [], True),  # unclosed answer
        (base("Up || Jump || Left"), ["Up", "Left"], True),  # one unknown name
        (base("Jump || Fly"), [], True),  # no known name
        (base(""), [], True),  # well formed, no action
        (base("up || LEFT "), ["Up", "Left"], False),  # names match case-insensitively
        (base("Up"), ["Up"], False),
    ],
)
def test_format_penalty_rules(text, executed, penalized):
    env = level_env("sokoban", PAPER)
    ep = Episode(env, 0, EpisodeConfig(format_penalty=-0.25))
    rec = ep.apply_response(text)
    assert rec.actions_executed == executed
    assert rec.format_penalty == (-0.25 if penalized else 0.0)
    assert ep.total_reward == pytest.approx(-0.1 * len(executed) + rec.format_penalty)
    assert len(ep.turns) == 1 and not ep.done  # the turn is consumed either way
    if not executed:
        assert rec.state_after == rec.state_before and rec.info == {}
        assert ep.messages[-1]["content"].startswith("Reward:\n0\n\nTurn 2:")


def test_penalty_once_per_turn_and_accumulates():
    ep = Episode(level_env("sokoban", PAPER), 0, EpisodeConfig())
    for _ in range(3):
        ep.apply_response("garbage")
    assert [t.format_penalty for t in ep.turns] == [-0.1] * 3
    assert ep.total_reward == pytest.approx(-0.3)
    assert ep.num_actions == 0


def test_max_actions_per_turn_and_budget_truncation():
    ep = Episode(level_env("sokoban", PAPER), 0, EpisodeConfig(max_actions_per_turn=5, action_budget=7))
    rec = ep.apply_response(base(" || ".join(["Right", "Left"] * 4)))  # 8 actions, 5 kept
    assert rec.num_parsed == 5 and len(rec.actions_executed) == 5 and rec.format_penalty == 0.0
    rec = ep.apply_response(base("Right || Left || Right || Left"))  # only 2 left in the budget
    assert rec.actions_executed == ["Right", "Left"]
    assert ep.done and ep.end_reason == "budget" and not ep.success
    assert ep.num_actions == 7 and ep.actions_left == 0
    assert ep.messages[-1]["role"] == "assistant" and ep.next_user_message is None
    with pytest.raises(RuntimeError, match="already ended"):
        ep.apply_response(base("Up"))


def test_default_budget_of_sokoban_ends_after_two_full_turns():
    ep = Episode(level_env("sokoban", PAPER), 0, EpisodeConfig())
    ep.apply_response(base("Right || Left || Right || Left || Right"))
    ep.apply_response(base("Left || Right || Left || Right || Left"))
    assert ep.done and ep.end_reason == "budget" and len(ep.turns) == 2


def test_early_stop_on_success():
    ep = Episode(level_env("sokoban", CORRIDOR), 0, EpisodeConfig())
    rec = ep.apply_response(base("Right || Right || Left || Left"))
    assert rec.actions_executed == ["Right", "Right"]
    assert rec.action_rewards == pytest.approx([-0.1, 10.9])
    assert rec.terminated and rec.info["success"]
    assert ep.done and ep.success and ep.end_reason == "success"
    assert ep.num_actions == 2 and ep.total_reward == pytest.approx(10.8)
    assert [m["role"] for m in ep.messages] == ["system", "user", "assistant"]
    m = episode_metrics(ep)
    # The two actions never sent after the win do not lower the valid rate.
    assert m["success"] == 1.0 and m["valid_action_rate"] == 1.0 and m["effective_action_rate"] == 1.0


def test_max_turns():
    ep = Episode(level_env("sokoban", PAPER), 0, EpisodeConfig(max_turns=2))
    ep.apply_response(base("Right"))
    assert not ep.done
    ep.apply_response(base("Left"))
    assert ep.done and ep.end_reason == "max_turns" and len(ep.states) == 3


def test_frozenlake_hole_ends_episode_without_success():
    # Not slippery so the move is certain: P at (0,0), hole at (0,1).
    env = level_env("frozenlake", "PO\n_G", is_slippery=False)
    ep = Episode(env, 0, EpisodeConfig())
    rec = ep.apply_response(base("Right || Down"))
    assert rec.actions_executed == ["Right"] and rec.terminated
    assert ep.done and not ep.success and ep.end_reason == "terminated"


def test_frozenlake_default_budget_and_slippery_seeded_env():
    env = spa_rl.envs.make("frozenlake", render_mode="grid+coords")
    ep = Episode(env, level_seed=5, config=EpisodeConfig())
    assert ep.action_budget == 10
    assert "Available actions:\nLeft, Down, Right, Up" in ep.messages[1]["content"]
    while not ep.done:
        ep.apply_response(base("Down || Right"))
    assert ep.num_actions <= 10 and len(ep.turns) <= 5


def test_sudoku_free_text_moves():
    env = level_env("sudoku", BOARD)
    ep = Episode(env, 0, EpisodeConfig())
    assert ep.action_budget == 50 and env.action_names is None
    # Every non-empty string goes to the env: a good move, an unreadable one, a conflicting one.
    rec = ep.apply_response(base("1,2,2 || place it somewhere || 3 1 4"))
    assert rec.actions_executed == ["1,2,2", "place it somewhere", "3 1 4"]
    assert rec.format_penalty == 0.0
    assert rec.num_valid == 2 and rec.num_effective == 1
    assert ep.num_actions == 3 and ep.actions_left == 47  # rejected moves still use the budget
    assert "| 4 2 . 3 |" in ep.states[1]
    m = episode_metrics(ep)
    assert m["valid_action_rate"] == pytest.approx(2 / 3) and m["effective_action_rate"] == pytest.approx(1 / 3)


def test_sudoku_world_model_reference_bug_case_burns_no_budget():
    env = level_env("sudoku", BOARD)
    ep = Episode(env, 0, EpisodeConfig(mode="world-model"))
    rec = ep.apply_response("<think> fill </think> <answer> 1,2,2 || 3,1,1 </answer>")
    assert rec.actions_executed == [] and rec.format_penalty == -0.1
    assert ep.num_actions == 0 and ep.actions_left == 50


def test_sudoku_solve_ends_with_success():
    env = level_env("sudoku", BOARD)
    ep = Episode(env, 0, EpisodeConfig())
    ep.apply_response(base("1,2,2 || 3,1,1 || 1,3,1"))
    rec = ep.apply_response(base("2,3,2 || 2,4,4 || 3,3,3"))
    assert ep.success and ep.end_reason == "success" and rec.action_rewards[-1] == 1.0


def test_world_model_episode_metrics_and_record():
    env = level_env("sokoban", PAPER, render_mode="grid+coords")
    ep = Episode(env, 0, EpisodeConfig(mode="world-model"))
    assert "<observation>" in ep.messages[1]["content"]
    s0 = ep.states[0]
    truth = level_env("sokoban", PAPER)
    truth.step("Up")
    s1 = truth.render_text("grid+coords")
    good = serialize_response("world-model", "push up", "Up", s0, s1)
    rec = ep.apply_response(good)
    assert rec.format_penalty == 0.0 and rec.parsed.observation == s0
    wrong = serialize_response("world-model", "hm", "Left", "nonsense", s1)  # Left is blocked by a wall
    ep.apply_response(wrong)
    ep.apply_response("<think>no format</think><answer>Up</answer>")
    m = episode_metrics(ep)
    assert m["world_model_turns"] == 2.0
    assert m["observation_exact"] == 0.5  # turn 1 right, turn 2 wrong; turn 3 not scored
    # Both predictions are s1: Up leads there, and the blocked Left keeps the player there.
    assert m["prediction_exact"] == 1.0 and m["prediction_cell_accuracy"] == 1.0
    assert m["format_ok_rate"] == pytest.approx(2 / 3)

    record = ep.to_record()
    again = json.loads(json.dumps(record))
    assert again["states"] == ep.states and len(again["turns"]) == 3
    assert again["messages"] == ep.messages
    assert again["turns"][0]["actions_executed"] == ["Up"]
    assert again["success"] is False and again["config"]["mode"] == "world-model"


def test_metrics_and_aggregation():
    ep = Episode(level_env("sokoban", PAPER), 0, EpisodeConfig())
    ep.apply_response(base("Right || Jump"))  # 1 executed, 1 unrecognised
    ep.apply_response("nothing")
    m = episode_metrics(ep)
    assert m["num_actions"] == 1.0 and m["num_turns"] == 2.0
    assert m["valid_action_rate"] == 0.5 and m["effective_action_rate"] == 1.0
    assert m["format_ok_rate"] == 0.5 and m["format_penalty_rate"] == 1.0
    assert m["score"] == pytest.approx(-0.1 - 0.2) and m["env_reward"] == pytest.approx(-0.1)
    assert "observation_exact" not in m
    agg = aggregate_metrics([{"a": 1.0, "b": None, "c": True}, {"a": 0.0, "b": 0.5, "c": False}, {"b": None}])
    assert agg == {"a": 0.5, "b": 0.5, "c": 0.5}
    assert aggregate_metrics([{"x": None}]) == {}


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"mode": "add_worldmodel"}, "mode"),
        ({"render_mode": "text"}, "render_mode"),
        ({"max_turns": 0}, "max_turns"),
        ({"max_actions_per_turn": 2.5}, "max_actions_per_turn"),
        ({"action_budget": 0}, "action_budget"),
        ({"format_penalty": 0.1}, "format_penalty"),
        ({"max_words": True}, "max_words"),
    ],
)
def test_config_validation_names_field(kwargs, field):
    with pytest.raises(ConfigError, match=rf"\b{field}:"):
        EpisodeConfig(**kwargs)


def test_config_reports_all_errors_at_once():
    with pytest.raises(ConfigError, match=r"mode:.*max_turns:"):
        EpisodeConfig(mode="x", max_turns=0)


ACTION_WORDS = ["Up", "down", "LEFT", "Right", "1,2,2", "3 1 1", "2,3,2", "jump", "", "日本"]
answers = st.lists(st.sampled_from(ACTION_WORDS), max_size=7).map(" || ".join)
responses = st.one_of(
    answers.map(base),
    st.tuples(answers, st.text(max_size=20)).map(lambda p: serialize_response("world-model", "t", p[0], p[1], p[1])),
    st.text(max_size=60),
)


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(["sokoban", "frozenlake", "sudoku"]),
    seed=st.integers(0, 10_000),
    mode=st.sampled_from(["base", "world-model"]),
    budget=st.one_of(st.none(), st.integers(1, 12)),
    texts=st.lists(responses, min_size=1, max_size=6),
)
def test_random_play_keeps_invariants(name, seed, mode, budget, texts):
    cfg = EpisodeConfig(mode=mode, action_budget=budget)
    ep = Episode(spa_rl.envs.make(name), seed, cfg)
    for text in texts:
        if ep.done:
            break
        ep.apply_response(text)
    assert ep.num_actions <= ep.action_budget and len(ep.turns) <= cfg.max_turns
    assert len(ep.states) == len(ep.turns) + 1
    roles = [m["role"] for m in ep.messages]
    assert roles[:2] == ["system", "user"]
    assert roles[2:] == ["assistant", "user"] * (len(ep.turns) - ep.done) + ["assistant"] * ep.done
    assert all(t.format_penalty in (0.0, -0.1) for t in ep.turns)
    assert ep.total_reward == pytest.approx(sum(t.env_reward + t.format_penalty for t in ep.turns))
    assert ep.success == (ep.end_reason == "success")
    json.dumps(ep.to_record())
    m = episode_metrics(ep)
    assert 0.0 <= m["valid_action_rate"] <= 1.0 and 0.0 <= m["effective_action_rate"] <= 1.0


def test_progress_is_the_share_of_the_distance_closed():
    """Episode.progress over the env's distance_to_goal: on "P__\\n_O_\\n__G" the goal is 4
    moves away; two moves the right way close half, a hole or a move away earns 0, success 1."""
    text = "P__\n_O_\n__G"
    cases = [("Right || Right", 0.5), ("Right || Down", 0.0), ("Left", 0.0),
             ("Right || Right || Down || Down", 1.0)]
    for answer, progress in cases:
        ep = Episode(level_env("frozenlake", text, is_slippery=False), 0, EpisodeConfig(max_turns=1))
        ep.apply_response(base(answer))
        assert ep.distances[0] == 4 and ep.progress == progress, answer
    # no action executed: the distance is carried over, no progress
    ep = Episode(level_env("frozenlake", text, is_slippery=False), 0, EpisodeConfig(max_turns=2))
    ep.apply_response("no format")
    assert ep.distances == [4, 4] and ep.progress == 0.0
    # a game without a distance (Sudoku) has progress 0 unless solved
    ep = Episode(level_env("sudoku", BOARD), 0, EpisodeConfig(max_turns=1))
    ep.apply_response(base("1,2,2"))
    assert ep.distances == [None, None] and ep.progress == 0.0
