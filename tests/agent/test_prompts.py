"""PromptSet: loading and validation, the message layout (SPEC 2.2), placeholders, examples."""

import re

import pytest

import spa_rl.envs
from spa_rl.agent import PromptSet, format_reward, parse_response, prompt_variables
from spa_rl.errors import ConfigError, UnknownEnvError

ENVS = ("sokoban", "frozenlake", "sudoku")
FORMATS = {
    "base": "<think> [your thoughts] </think> <answer> [your answer] </answer>",
    "world-model": "<think> <observation> [current state] </observation> [your thoughts] "
    "<prediction> [next state] </prediction> </think> <answer> [your answer] </answer>",
}
GRID_VARS = {"rows": 6, "cols": 6, "last_row": 5, "last_col": 5, "size": 4, "box": 2}


def make_env(name, **options):
    return spa_rl.envs.make(name, render_mode="grid+coords", **options)


@pytest.mark.parametrize("name", ENVS)
def test_packaged_prompts_load(name):
    p = PromptSet.load(name)
    assert p.env_name == name and p.source.endswith(f"{name}.yaml")
    assert p.formats == FORMATS
    assert p.system and p.random_policy_reasoning and p.legend
    assert "{example}" in p.instructions["world-model"]
    assert "{example}" not in p.instructions["base"]


@pytest.mark.parametrize("name", ENVS)
def test_no_unfilled_placeholders(name):
    env = make_env(name)
    env.reset(seed=0)
    p = PromptSet.load(name)
    for mode in FORMATS:
        text = p.build_first_user_message(
            "S", 10, mode=mode, action_names=env.action_names, variables=prompt_variables(env)
        )
        assert not re.search(r"\{[A-Za-z_]\w*\}", text), text


def test_first_user_message_layout():
    p = PromptSet.load("sokoban")
    state = "######\n#P_O#\n######\nPlayer (P) is at (1,1); target (O) is at (1,3)."
    msg = p.build_first_user_message(
        state, 10, mode="base", action_names=("Up", "Down", "Left", "Right"), max_words=100, variables=GRID_VARS
    )
    prefix, turn = msg.split("\nTurn 1:\n")
    assert prefix.startswith(p.instructions["base"].strip())
    assert "\nSymbols in the state:\n#: wall, _: empty floor, O: target," in prefix
    assert "\nAvailable actions:\nUp, Down, Left, Right\n" in prefix
    assert prefix.endswith('\nYou can make up to 10 actions in total, separated by the action separator " || "\n')
    assert turn == (
        f"State:\n{state}\nYou have 10 actions left. Always output: {FORMATS['base']} with no extra text. "
        "Strictly follow this format. Max response length: 100 words (tokens).\n"
    )


def test_world_model_message_has_example_and_format():
    p = PromptSet.load("sokoban")
    msg = p.build_first_user_message("S", 10, mode="world-model", action_names=("Up",), variables=GRID_VARS)
    assert p.example.strip() in msg
    assert f"Always output: {FORMATS['world-model']} with no extra text." in msg
    assert "(5,5)" in msg
    base = p.build_first_user_message("S", 10, mode="base", action_names=("Up",), variables=GRID_VARS)
    assert "<observation>" not in base


def test_sudoku_has_no_action_list_but_a_budget_line():
    env = make_env("sudoku")
    env.reset(seed=1)
    p = PromptSet.load("sudoku")
    msg = p.build_first_user_message(env.render(), 50, action_names=env.action_names, variables=prompt_variables(env))
    assert "Available actions" not in msg
    assert "You can make up to 50 actions in total" in msg
    assert "4x4 Sudoku" in msg and "2x2 box" in msg and "from 1 to 4" in msg


def test_next_user_message_layout_and_rounding():
    p = PromptSet.load("frozenlake")
    msg = p.build_next_user_message(-0.1 * 3, "G__", 2, 7)
    assert msg == (
        "Reward:\n-0.3\n\nTurn 2:\nState:\nG__\nYou have 7 actions left. Always output: "
        f"{FORMATS['base']} with no extra text. Strictly follow this format. Max response length: 100 words (tokens).\n"
    )
    assert "You have 1 action left." in p.build_next_user_message(0, "s", 3, 1)


@pytest.mark.parametrize(
    "reward, text",
    [(-0.1 * 3, "-0.3"), (10.700000000000001, "10.7"), (1.0, "1"), (0, "0"), (-0.0001, "0"), (0.125, "0.12"),
     (-1.1, "-1.1"), (10.9, "10.9"), (100, "100")],
)
def test_format_reward(reward, text):
    assert format_reward(reward) == text


def test_grid_placeholders_follow_configured_size():
    env = make_env("sokoban", dim_room=(8, 7))
    env.reset(seed=0)
    variables = prompt_variables(env)
    assert (variables["rows"], variables["cols"], variables["last_row"], variables["last_col"]) == (8, 7, 7, 6)
    text = PromptSet.load("sokoban").instruction("world-model", variables)
    assert "(7,6) the bottom-right" in text.replace("\n", " ")
    lake = make_env("frozenlake", size=6)
    lake.reset(seed=0)
    text = PromptSet.load("frozenlake").instruction("world-model", prompt_variables(lake))
    assert "(5,5) the bottom-right" in text.replace("\n", " ")


def test_sudoku_variables():
    env = make_env("sudoku")
    env.reset(seed=0)
    v = prompt_variables(env)
    assert (v["rows"], v["cols"], v["size"], v["box"]) == (4, 4, 4, 2)


@pytest.mark.parametrize("name", ENVS)
def test_worked_example_is_a_real_transition(name):
    """The example's observation is a real render and its prediction is what the env does."""
    p = PromptSet.load(name)
    parsed = parse_response(p.example, "world-model", 5)
    assert parsed.format_ok and parsed.actions
    grid = "\n".join(parsed.observation.splitlines()[:-1])
    options = {"is_slippery": False} if name == "frozenlake" else {}
    cls = type(make_env(name))
    env = cls.from_level_text(grid, render_mode="grid+coords", **options)
    assert env.render_text("grid+coords") == parsed.observation
    for action in parsed.actions:
        _, _, terminated, _, info = env.step(action)
        assert info["action_is_valid"] and info["action_is_effective"]
    assert env.render_text("grid+coords") == parsed.prediction


def write(tmp_path, text):
    path = tmp_path / "p.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def packaged_text(name):
    from importlib import resources

    return resources.files("spa_rl.agent").joinpath("prompts", f"{name}.yaml").read_text(encoding="utf-8")


def test_user_yaml_overrides(tmp_path):
    text = packaged_text("sokoban").replace('system: "You are a helpful assistant."', 'system: "Custom."')
    p = PromptSet.load("sokoban", path=write(tmp_path, text))
    assert p.build_system_message() == "Custom." and p.source.endswith("p.yaml")


@pytest.mark.parametrize("key", ["system", "instructions", "legend", "formats", "example", "random_policy_reasoning"])
def test_missing_key_names_file_and_key(tmp_path, key):
    lines = packaged_text("sokoban").splitlines()
    out, skipping = [], False
    for line in lines:  # drop the top-level key and its indented block
        if line.startswith(f"{key}:"):
            skipping = True
            continue
        if skipping and (line.startswith(" ") or not line.strip()):
            continue
        skipping = False
        out.append(line)
    path = write(tmp_path, "\n".join(out))
    with pytest.raises(ConfigError, match=rf"p\.yaml: missing key '{key}'"):
        PromptSet.load("sokoban", path=path)


def test_missing_mode_and_bad_values(tmp_path):
    text = packaged_text("sokoban")
    with pytest.raises(ConfigError, match=r"missing key 'formats.world-model'"):
        PromptSet.load("sokoban", path=write(tmp_path, text.replace("  world-model: \"<think>", "  other: \"<think>")))
    with pytest.raises(ConfigError, match=r"'system' must be a string"):
        bad = text.replace('system: "You are a helpful assistant."', "system: [1]")
        PromptSet.load("sokoban", path=write(tmp_path, bad))
    with pytest.raises(ConfigError, match=r"unknown placeholder \{grid_size\}"):
        PromptSet.load("sokoban", path=write(tmp_path, text.replace("({last_row},{last_col})", "{grid_size}")))
    with pytest.raises(ConfigError, match="invalid YAML"):
        PromptSet.load("sokoban", path=write(tmp_path, "system: [unclosed"))
    with pytest.raises(ConfigError, match="top level"):
        PromptSet.load("sokoban", path=write(tmp_path, "- a list"))
    with pytest.raises(ConfigError, match="cannot read"):
        PromptSet.load("sokoban", path=tmp_path / "missing.yaml")


def test_unknown_env_and_missing_variable():
    with pytest.raises(UnknownEnvError, match="known: frozenlake, sokoban, sudoku"):
        PromptSet.load("chess")
    with pytest.raises(ConfigError, match=r"placeholder \{last_row\}"):
        PromptSet.load("sokoban").instruction("world-model", {})


def test_frozenlake_prompt_follows_the_slip_setting():
    from spa_rl.agent import Episode, EpisodeConfig, PromptSet
    from spa_rl.envs import make

    def first_user(**options):
        env = make("frozenlake", render_mode="grid+coords", **options)
        return Episode(env, 0, EpisodeConfig(), PromptSet.load("frozenlake")).messages[1]["content"]

    assert "The ice is slippery" in first_user()
    firm = first_user(is_slippery=False)
    assert "not slippery" in firm and "The ice is slippery" not in firm
