"""The training machinery learns: the tiny random model, taught the answer format by `spa sft`,
then trained by `spa train` (GRPO), raises its validation success on an easy level set.

Levels: two 1x2 FrozenLake rows without slipping, "PG" (the goal is Right) and "GP" (Left);
one turn of up to two actions. A uniformly random two-action answer wins with probability
7/16 (the SFT model, trained on random actions, measured 0.19 at step 0), and a policy that
reads the state can reach 1.0.
Measured here (2026-12-07): 0.19 at step 0 -> 0.63-0.75 after 32 steps of
2 groups x 16 samples (about a minute with shared-prefix packing, the SFT included), in four
runs that differ only in floating-point rounding (packing with and without shared prefixes,
one or two threads, micro-batches reordered). With 8 samples per group the end point ranged
0.28-0.63 over such runs: a group whose 8 samples all fail carries no GRPO signal, and a policy
that settled on one direction (solving one level, never the other) stayed there.
"""

import json
import random

import pytest

from spa_rl.agent import Episode, EpisodeConfig, PromptSet
from spa_rl.artifacts import final_model
from spa_rl.config import load_config
from spa_rl.envs import env_class
from spa_rl.recipes import sft, train

LEVELS = ["PG", "GP"]
EPISODE = EpisodeConfig(max_turns=1, max_actions_per_turn=2)


def write_format_data(folder, n_rows=48, seed=0):
    """Rows whose answers are uniformly random actions: the format, and no skill."""
    rng = random.Random(seed)
    rows = []
    for k in range(n_rows):
        env = env_class("frozenlake").from_level_text(LEVELS[k % 2], render_mode="grid+coords", is_slippery=False)
        prompt = Episode(env, 0, EPISODE, PromptSet.load("frozenlake")).messages
        answer = " || ".join(rng.choice(["Up", "Down", "Left", "Right"]) for _ in range(2))
        completion = [{"role": "assistant", "content": f"<think>I move.</think><answer>{answer}</answer>"}]
        rows.append({"prompt": prompt, "completion": completion, "messages": prompt + completion})
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "README.md").write_text("format-only rows for the learning test\n")


@pytest.mark.slow
def test_grpo_raises_success_on_easy_levels(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    write_format_data(tmp_path / "data")
    (tmp_path / "levels.txt").write_text("\n\n".join(LEVELS) + "\n")
    sft_cfg = load_config(sft.Config, dict(data=str(tmp_path / "data"), model={"name": "tiny", "dtype": "fp32"},
                                           epochs=16, optim={"lr": 3e-3}, batch=8, micro_batch=8,
                                           out=str(tmp_path / "sft")))
    assert sft.main(sft_cfg) == 0
    train_cfg = load_config(train.Config, dict(
        model={"name": str(final_model(tmp_path / "sft")), "dtype": "fp32"},
        env={"name": "frozenlake", "level_file": str(tmp_path / "levels.txt"), "options": "{is_slippery: false}"},
        steps=32, algo="grpo", groups=2, group_size=16, keep_ratio=1.0,
        episode={"max_turns": 1, "max_actions_per_turn": 2}, sampling={"max_new_tokens": 64},
        eval={"levels": 2, "samples": 16}, eval_every=0, optim={"lr": 3e-4}, ppo_epochs=2, mini_batch=16,
        micro_batch=8, entropy_coef=0.0, out=str(tmp_path / "ppo")))
    assert train.main(train_cfg) == 0
    rows = [json.loads(x) for x in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val/pass@1"] for r in rows if "val/pass@1" in r]
    assert val[0] > 0.1, "the SFT model should already answer in format"
    assert val[-1] >= val[0] + 0.15, f"validation success {val[0]:.3f} -> {val[-1]:.3f}"
