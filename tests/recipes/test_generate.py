"""spa generate: ground-truth substitution is exact on recorded episodes of every game, the split
is by level, the ablations do what they say, and the folder opens with `datasets`."""

import json
import re

import pytest

from spa_rl.data import load_rows, read_jsonl
from spa_rl.envs import ENV_NAMES
from spa_rl.errors import ConfigError
from spa_rl.config import load_config
from spa_rl.recipes.generate import Config as GenerateConfig, episode_rows, main
from spa_rl.rollout.engine import make_episodes
from spa_rl.tokens import WORLD_MODEL_TAGS, content_spans


def Config(**values):
    """A resolved, validated `spa generate` config (nested sections as mappings)."""
    return load_config(GenerateConfig, values)

OBS, PRED = WORLD_MODEL_TAGS


def _contents(text, tags):
    return [text[a:b] for a, b in content_spans(text, [tags])]


def _without_contents(text):
    """The text with every observation/prediction content removed (tags kept)."""
    out, pos = [], 0
    for a, b in content_spans(text):
        out.append(text[pos:a])
        pos = b
    return "".join(out) + text[pos:]


def assert_substitution_exact(rows, record):
    """Rows of one recorded episode: turn t's observation is s_{t-1}, its prediction s_t, all
    other text is as generated, and earlier turns inside the prompt are the substituted ones."""
    states = record["states"]
    by_turn = {r["turn"]: r for r in rows}
    for t, row in by_turn.items():
        original = record["turns"][t - 1]["response"]
        completion = row["completion"][0]["content"]
        assert completion.startswith("<think>")
        if content_spans(original):
            assert row["substituted"]
            assert _contents(completion, OBS) == [states[t - 1]] * len(_contents(original, OBS))
            assert _contents(completion, PRED) == [states[t]] * len(_contents(original, PRED))
        else:
            assert completion == original and not row["substituted"]
        assert _without_contents(completion) == _without_contents(original)  # reasoning and answer kept
        assistants = [m["content"] for m in row["prompt"] if m["role"] == "assistant"]
        assert len(assistants) == t - 1
        for k, text in enumerate(assistants, 1):
            if k in by_turn:
                assert text == by_turn[k]["completion"][0]["content"]
        users = [m for m in record["messages"] if m["role"] == "user"][:t]
        assert [m for m in row["prompt"] if m["role"] == "user"] == users
        assert row["prompt"][0] == record["messages"][0]


def _scripted_turns(env):
    """Responses covering: no valid action (wrong states), a valid action, a broken format with
    tags, and no tags at all."""
    if env.action_names:
        valid, invalid = env.action_names[0], "Jump"
    else:
        valid, invalid = (env.expert_actions(1) or ["1,1,1"])[0], "0,0,0"
    wm = "<think> <observation>my guess</observation> I plan. <prediction>{p}</prediction> </think> <answer> {a} </answer>"
    return [wm.format(p="same as before", a=invalid), wm.format(p="moved", a=valid),
            "<think> <observation>x</observation> no prediction and no answer",
            "<think> just text </think> <answer> Up </answer>"]


@pytest.mark.parametrize("env_name", ENV_NAMES)
def test_substitution_exact_on_scripted_episodes(env_name):
    cfg = Config(env=env_name, policy="self", episodes=1, group_size=1)
    [(group, ep)] = make_episodes(env_name, "train", 0, 1, 1, cfg.episode.to_episode_config())
    for text in _scripted_turns(ep.env):
        if ep.done:
            break
        ep.apply_response(text)
    record = ep.to_record()
    assert record["turns"][0]["actions_executed"] in ([], ["0,0,0"])  # nothing changed the state...
    assert record["states"][1] == record["states"][0]  # ...so the true prediction equals the observation
    rows = episode_rows(ep, 0, group, cfg, rng=None)
    assert len(rows) == len(record["turns"]) >= 2
    first = rows[0]["completion"][0]["content"]
    assert _contents(first, OBS) == _contents(first, PRED) == [record["states"][0]]
    assert_substitution_exact(rows, record)
    assert [r["format_ok"] for r in rows][:2] == [True, True]


@pytest.mark.parametrize("env_name", ENV_NAMES)
@pytest.mark.parametrize("policy", ["random", "solver"])
def test_generate_scripted_policies_every_env(tmp_path, env_name, policy):
    out = tmp_path / "data"
    assert main(Config(env=env_name, policy=policy, episodes=12, group_size=2, out=str(out))) == 0
    records = read_jsonl(out / "episodes.jsonl")
    train, val = load_rows(out, "train"), load_rows(out, "validation")
    assert len(records) == 12 and len(train) + len(val) == sum(len(r["turns"]) for r in records)
    # the split is by level: no level (hence no episode) on both sides
    assert not {r["level_seed"] for r in train} & {r["level_seed"] for r in val}
    assert {r["level"] for r in train + val} == set(range(6))
    assert len({r["level_seed"] for r in val}) == 1  # round(0.2 * 6)
    for rec in records:
        assert_substitution_exact([r for r in train + val if r["episode"] == rec["episode"]], rec)
    assert all(r["format_ok"] and r["policy"] == policy for r in train + val)
    if policy == "solver" and env_name != "frozenlake":  # deterministic games: the solver always wins
        assert all(r["success"] for r in train + val)
    card = (out / "README.md").read_text()
    assert "| all | 12 | 6 |" in card and "path: train.jsonl" in card


def test_env_options_reach_the_games(tmp_path):
    """Non-slippery FrozenLake: the solver plans the whole path in one turn and always wins
    (on the slippery default it moves one step per turn and sometimes falls in)."""
    out = tmp_path / "data"
    assert main(Config(env={"name": "frozenlake", "options": "{is_slippery: false}"}, policy="solver", episodes=10,
                       group_size=1, episode={"max_turns": 3}, out=str(out))) == 0
    records = read_jsonl(out / "episodes.jsonl")
    assert all(r["success"] for r in records)
    assert sum(len(r["turns"]) for r in records) < 2 * len(records)
    assert any(len(t["actions_executed"]) > 1 for r in records for t in r["turns"])


def test_dataset_opens_with_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    main(Config(env="sokoban", policy="random", episodes=10, group_size=2, out=str(tmp_path)))
    ds = datasets.load_dataset(str(tmp_path))
    assert set(ds) == {"train", "validation"}
    row = ds["train"][0]
    assert row["messages"] == row["prompt"] + row["completion"]
    assert row["prompt"][-1]["role"] == "user" and row["completion"][0]["role"] == "assistant"
    ds = datasets.load_dataset("json", data_files=str(tmp_path / "validation.jsonl"))
    assert ds["train"].num_rows == len(load_rows(tmp_path, "validation"))


def _state_in_prompt(row):
    text = row["prompt"][-1]["content"]
    return text[text.rindex("State:\n") + len("State:\n"):text.rindex("\nYou have")]


def test_random_coords_are_consistent_and_in_grid(tmp_path):
    main(Config(env="sokoban", policy="random", episodes=8, group_size=2, random_coords=True, out=str(tmp_path)))
    records = {r["episode"]: r for r in read_jsonl(tmp_path / "episodes.jsonl")}
    rows = load_rows(tmp_path, "train") + load_rows(tmp_path, "validation")
    changed = 0
    for row in rows:
        true = records[row["episode"]]["states"][row["turn"] - 1]
        shown = _state_in_prompt(row)
        [obs] = _contents(row["completion"][0]["content"], OBS)
        assert obs == shown  # the model is taught to copy the state it is shown
        assert shown.rsplit("\n", 1)[0] == true.rsplit("\n", 1)[0]  # grid untouched
        coords = [tuple(map(int, m)) for m in re.findall(r"\((\d+),(\d+)\)", shown.rsplit("\n", 1)[1])]
        assert coords and all(0 <= r < 6 and 0 <= c < 6 for r, c in coords)
        changed += shown != true
    assert changed > len(rows) // 2


class _FakeBackend:
    """Stands in for HFBackend: answers from a script instead of sampling (tiny-model speed)."""

    def __init__(self, model, tokenizer, max_batch_size=32, seed=0, engine="auto"):
        self.tokenizer = tokenizer
        self.calls = 0

    def generate(self, prompts, params):
        from spa_rl.rollout.backend import Generation

        out = []
        for _ in prompts:
            self.calls += 1
            text = (" <observation>what I believe</observation> Go. <prediction>my forecast</prediction> </think>"
                    " <answer> Up || Left </answer>") if self.calls % 3 else " no format at all"
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            out.append(Generation(ids, [0.0] * len(ids), "eos"))
        return out


@pytest.fixture
def fake_self_play(monkeypatch, tmp_path):
    import spa_rl.rollout.backend

    monkeypatch.setenv("SPA_RL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(spa_rl.rollout.backend, "HFBackend", _FakeBackend)


@pytest.mark.parametrize("self_belief", [False, True])
def test_self_policy_substitutes_sampled_turns(tmp_path, fake_self_play, self_belief):
    out = tmp_path / "data"
    main(Config(env="sokoban", model="tiny", episodes=4, group_size=2, self_belief=self_belief, out=str(out)))
    records = read_jsonl(out / "episodes.jsonl")
    rows = load_rows(out, "train") + load_rows(out, "validation")
    assert any(not r["format_ok"] for r in rows) and any(r["format_ok"] for r in rows)
    for rec in records:
        ep_rows = [r for r in rows if r["episode"] == rec["episode"]]
        if self_belief:  # the model's own states stay, everywhere
            for r in ep_rows:
                assert r["completion"][0]["content"] == rec["turns"][r["turn"] - 1]["response"]
                assert not r["substituted"]
        else:
            assert_substitution_exact(ep_rows, rec)
            assert any("my forecast" in t["response"] for t in rec["turns"])
            assert not any("my forecast" in json.dumps(r["messages"]) for r in ep_rows)


def test_filter_format_drops_broken_turns(tmp_path, fake_self_play):
    main(Config(env="sokoban", model="tiny", episodes=4, group_size=2, filter_format=True, out=str(tmp_path)))
    rows = load_rows(tmp_path, "train") + load_rows(tmp_path, "validation")
    played = sum(len(r["turns"]) for r in read_jsonl(tmp_path / "episodes.jsonl"))
    assert rows and all(r["format_ok"] for r in rows) and len(rows) < played
    assert f"{played} turns played, {len(rows)} rows kept" in (tmp_path / "README.md").read_text()


def test_config_errors():
    with pytest.raises(ConfigError, match="self_belief"):
        Config(policy="random", self_belief=True)
    with pytest.raises(ConfigError, match="random_coords"):
        Config(episode={"render": "grid"}, random_coords=True)
    with pytest.raises(ConfigError, match="env.options"):
        Config(env={"options": "[1, 2]"})
    with pytest.raises(ConfigError, match="format-only"):
        Config(episode={"mode": "base"})  # the model's own play: world-model mode only


def test_base_mode_gives_format_only_rows(tmp_path):
    out = tmp_path / "data"
    assert main(Config(env="sokoban", policy="solver", episodes=4, group_size=1, episode={"mode": "base"},
                       out=str(out))) == 0
    rows = load_rows(out, "train") + load_rows(out, "validation")
    assert rows and all(r["format_ok"] and not r["substituted"] for r in rows)
    for r in rows:
        text = r["completion"][0]["content"]
        assert "<answer>" in text and "<observation>" not in text and "<prediction>" not in text


def test_any_episode_count_works(tmp_path):
    """Groups belong to RL: 5 episodes in groups of 2 play levels 0, 0, 1, 1, 2."""
    out = tmp_path / "data"
    assert main(Config(env="sokoban", policy="solver", episodes=5, group_size=2, out=str(out))) == 0
    records = read_jsonl(out / "episodes.jsonl")
    assert [r["level"] for r in records] == [0, 0, 1, 1, 2]
