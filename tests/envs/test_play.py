"""`run_play` driven by a StringIO of actions, and `run_levels` statistics."""

import io

import pytest

from spa_rl.envs import make
from spa_rl.errors import ConfigError, LevelFormatError, UnknownEnvError
from spa_rl.recipes.play import run_levels, run_play


def play(env_name, actions, **kwargs):
    out = io.StringIO()
    status = run_play(env_name, kwargs.pop("seed", 0), kwargs.pop("level_file", None), kwargs.pop("render_mode", "grid"), io.StringIO(actions), out)
    return status, out.getvalue()


def test_play_sokoban_to_the_end():
    env = make("sokoban")
    env.reset(seed=0)
    plan = env.expert_actions(50)
    status, text = play("sokoban", "?\nnot-an-action\n\n" + "\n".join(plan) + "\nUp\n", render_mode="grid+coords")
    assert status == 0
    assert f"hint: {' || '.join(plan)}" in text
    assert "> not-an-action" in text and "action_is_valid False" in text
    assert text.count("\n> ") == len(plan) + 1  # the action after the win is never read
    summary = text.strip().splitlines()[-1]
    assert summary == f"summary: {len(plan) + 1} actions entered, {len(plan)} steps, 1 invalid, return {round(11.0 - 0.1 * len(plan), 6):g}, success True (solved)"
    assert "Player (P) is at" in text


def test_play_stops_at_end_of_input():
    status, text = play("frozenlake", "", seed=3)
    assert status == 0 and text.strip().endswith("summary: 0 actions entered, 0 steps, 0 invalid, return 0, success False (end of input)")


def test_play_from_level_file(tmp_path):
    path = tmp_path / "lake.txt"
    path.write_text("PG\n__\n", encoding="utf-8")
    outcomes = set()
    for seed in range(6):  # slippery: the seed decides the slips
        _, text = play("frozenlake", "Right\nRight\nRight\nRight\nRight\n", seed=seed, level_file=str(path))
        assert f"frozenlake: level file {path}" in text
        outcomes.add(text.strip().splitlines()[-1])
    assert any("success True (solved)" in line for line in outcomes)


def test_play_sudoku_and_errors(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("4..3\n31..\n.4.2\n2341\n", encoding="utf-8")
    _, text = play("sudoku", "1,2,2\n1,3,1\n2,3,2\n2,4,4\n3,1,1\nrow 3 col 3 value 3\n", level_file=str(path))
    assert text.strip().endswith("return 1, success True (solved)")
    path.write_text("4..3\n31..\n.4.2\n23x1\n", encoding="utf-8")
    with pytest.raises(LevelFormatError, match="line 4, column 3"):
        play("sudoku", "", level_file=str(path))
    with pytest.raises(UnknownEnvError):
        play("tetris", "")


@pytest.mark.parametrize("name", ["sokoban", "frozenlake", "sudoku"])
def test_run_levels_statistics(name):
    out = io.StringIO()
    stats = run_levels(name, 30, 0, out, None)
    assert stats["env"] == name and stats["n"] == 30 and stats["levels_per_second"] > 0
    assert 0.0 <= stats["solvable_share"] <= 1.0
    assert all(sum(h.values()) == 30 for h in stats["histograms"].values())
    text = out.getvalue()
    assert f"{name}: 30 levels, seeds 0..29" in text and "levels/s" in text and "solvable within" in text
    if name == "sudoku":
        assert stats["histograms"]["blanks"] == {6: 30} and stats["solvable_share"] == 1.0
    if name == "sokoban":
        assert "unsolved" not in stats["histograms"]["shortest solution (actions)"]


def test_run_levels_options():
    stats = run_levels("frozenlake", 10, 5, io.StringIO(), {"size": 6, "action_budget": 20, "is_slippery": False})
    assert stats["action_budget"] == 20 and stats["options"] == {"size": 6, "is_slippery": False}
    assert stats["histograms"]["success probability within 20 actions"] == {"1": 10}
    with pytest.raises(ConfigError, match="not an option"):
        run_levels("sudoku", 5, 0, io.StringIO(), {"holes": 3})
    with pytest.raises(ConfigError, match="n:"):
        run_levels("sudoku", 0, 0, io.StringIO(), None)
