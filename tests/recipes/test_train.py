"""spa train on the tiny model: exact first ratio, masks, checkpoints, kill -9 and resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from spa_rl.config import load_config
from spa_rl.recipes import train

SMALL = {"env": "frozenlake", "model": "tiny", "groups": 2, "group_size": 2, "keep_ratio": 1.0,
         "sampling": {"max_new_tokens": 12}, "episode": {"max_turns": 2}, "eval": {"levels": 2, "samples": 2},
         "optim": {"lr": 1e-3}, "critic_optim": {"lr": 1e-3}}


def run_train(tmp_path, name, **over):
    cfg = load_config(train.Config, {**SMALL, "out": str(tmp_path / name), **over})
    assert train.main(cfg) == 0
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def step_rows(rows):
    return [r for r in rows if "rollout/score_mean" in r]


@pytest.mark.parametrize("dtype", ["fp32", "auto"])
def test_first_minibatch_ratio_is_exactly_one(tmp_path, dtype):
    # the separate no-grad pass (fuse_old_pass off): with it on, the ratio is 1 by construction
    rows = step_rows(run_train(tmp_path, dtype, steps=1, fuse_old_pass=False, **{"model.dtype": dtype},
                               eval_every=0))
    assert rows[0]["actor/ratio_mean"] == 1.0 and rows[0]["actor/ratio_max"] == 1.0
    assert rows[0]["actor/clipfrac"] == 0.0
    # the sampler's log-probs agree with the training forward up to kernel differences
    assert rows[0]["rollout/logprob_gap"] < (1e-4 if dtype == "fp32" else 0.1)


@pytest.mark.parametrize("over", [{"algo": "ppo", "micro_batch": 2}, {"algo": "ppo", "micro_batch": 1, "kl_coef": 0.1},
                                  {"algo": "grpo", "micro_batch": 1}, {"algo": "ppo", "old_logprobs": "rollout"}])
def test_one_pass_update_equals_the_separate_old_pass(tmp_path, over):
    """`fuse_old_pass` reads the old log-probs and values off the update's forwards: two steps
    give the weights, critic and logged losses of the separate no-grad pass, in fp32."""
    from safetensors.torch import load_file

    runs = {}
    for fuse in (True, False):
        rows = step_rows(run_train(tmp_path, f"fuse-{fuse}", steps=2, eval_every=0, fuse_old_pass=fuse,
                                   **{"model.dtype": "fp32"}, **over))
        final = tmp_path / f"fuse-{fuse}" / "final"
        weights = load_file(str(final / "model.safetensors"))
        if over["algo"] == "ppo":
            weights.update({f"critic.{k}": v for k, v in load_file(str(final / "critic.safetensors")).items()})
        runs[fuse] = rows, weights
    (rows_a, w_a), (rows_b, w_b) = runs[True], runs[False]
    assert w_a.keys() == w_b.keys()
    for k in w_a:
        torch.testing.assert_close(w_a[k], w_b[k], rtol=1e-5, atol=1e-6, msg=k)
    for a, b in zip(rows_a, rows_b):
        for key in ("actor/pg_loss", "actor/entropy", "actor/grad_norm", "critic/vf_loss", "critic/grad_norm",
                    "rollout/logprob_gap", "rollout/score_mean"):
            if key in a or key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    # the runs trained (the comparison is not between two unchanged models)
    assert rows_a[0]["actor/grad_norm"] > 0


def test_run_writes_config_checkpoint_and_validation(tmp_path):
    rows = run_train(tmp_path, "r", steps=2, eval_every=1, algo="grpo", **{"model.dtype": "fp32"})
    out = tmp_path / "r"
    assert (out / "config.yaml").is_file() and (out / "checkpoint-step-2" / "COMPLETE").is_file()
    assert (out / "final").resolve() == (out / "checkpoint-step-2").resolve()
    assert (out / "checkpoint-step-2" / "model.safetensors").is_file()
    assert [r["step"] for r in rows if "val/pass@1" in r] == [0, 1, 2]
    assert not (out / "checkpoint-step-2" / "critic.safetensors").exists()  # grpo has no critic
    from spa_rl.models import load_model_and_tokenizer
    load_model_and_tokenizer(str(out / "final"))


def test_existing_run_needs_resume(tmp_path):
    run_train(tmp_path, "r", steps=1, eval_every=0, **{"model.dtype": "fp32"})
    from spa_rl.errors import ConfigError
    with pytest.raises(ConfigError, match="--resume"):
        run_train(tmp_path, "r", steps=1, eval_every=0, **{"model.dtype": "fp32"})


def test_loss_masks(tmp_path):
    from spa_rl.agent import EpisodeConfig
    from spa_rl.models import load_model_and_tokenizer
    from spa_rl.rollout.backend import HFBackend, SamplingParams
    from spa_rl.rollout.engine import make_episodes, run_rollouts
    from spa_rl.tokens import ChatTokenizer

    model, tok = load_model_and_tokenizer("tiny", dtype="fp32")
    chat = ChatTokenizer(tok)
    rollouts = run_rollouts(make_episodes("sokoban", "val", 0, 1, 2, EpisodeConfig(max_turns=2)),
                            HFBackend(model, tok), chat, SamplingParams(max_new_tokens=8))
    cfg = load_config(train.Config, {**SMALL, "out": str(tmp_path)})
    batch = train.build_batch(rollouts, train.score(rollouts), chat, cfg, tok.pad_token_id)
    for b, r in enumerate(rollouts):
        m = batch.mask[b, :len(r.sequence)].long().tolist()
        assert m == r.sequence.loss_mask
        assert batch.rewards[b].nonzero().flatten().tolist() == [max(i for i, x in enumerate(m) if x)]
        assert batch.rewards[b].sum().item() == pytest.approx(r.episode.score)
    cfg_all = load_config(train.Config, {**SMALL, "out": str(tmp_path), "loss_tokens": "all-after-system"})
    batch_all = train.build_batch(rollouts, train.score(rollouts), chat, cfg_all, tok.pad_token_id)
    n_system = len(chat.encode(chat.render(rollouts[0].episode.messages[:1], False)))
    row = batch_all.mask[0, :len(rollouts[0].sequence)].long().tolist()
    assert row == [0] * n_system + [1] * (len(row) - n_system)


def _cli(out, steps, *extra):
    args = ["--env", "frozenlake", "--model", "tiny", "--steps", str(steps), "--groups", "2", "--group-size", "2",
            "--keep-ratio", "1.0", "--sampling.max-new-tokens", "12", "--episode.max-turns", "2", "--eval.levels", "2",
            "--eval.samples", "2", "--eval-every", "2", "--save-every", "1", "--optim.lr", "1e-3",
            "--critic-optim.lr", "1e-3", "--model.dtype", "fp32", "--out", str(out), *extra]
    return [sys.executable, "-m", "spa_rl.cli", "train", *args]


def _comparable(rows):
    return [{k: v for k, v in r.items() if not (k.startswith("time/") or "per_s" in k or "seconds" in k)}
            for r in rows]


def test_killed_run_resumes_to_the_same_result(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = tmp_path / "straight"
    subprocess.run(_cli(straight, 4), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(killed, 4), env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 300
    for line in proc.stdout:  # kill -9 during step 3, after step 2's checkpoint is complete
        if line.startswith("step 3/4") or time.time() > deadline:
            break
        if line.startswith("step 2/4"):
            while not (killed / "checkpoint-step-2" / "COMPLETE").exists():
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "checkpoint-step-3").exists()
    subprocess.run(_cli(killed, 4, "--resume"), check=True, env=env, capture_output=True)

    a = load_file(str(straight / "final" / "model.safetensors"))
    b = load_file(str(killed / "final" / "model.safetensors"))
    assert (killed / "final").resolve().name == "checkpoint-step-4"
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows_a = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert json.dumps(_comparable(rows_a)) == json.dumps(_comparable(rows_b))


def test_bad_env_options_fail_at_config_time():
    from spa_rl.config import load_config
    from spa_rl.errors import ConfigError
    from spa_rl.recipes.train import Config

    with pytest.raises(ConfigError, match="env.options"):
        load_config(Config, {"env": {"name": "frozenlake", "options": "[1, 2]"}})


def test_validation_uses_the_eval_config_and_its_checks():
    from spa_rl.config import load_config
    from spa_rl.rollout.evaluation import EvalConfig

    cfg = load_config(train.Config, {**SMALL, "sampling": {"temperature": 0.7}})
    ec = train.eval_config(cfg)
    assert isinstance(ec, EvalConfig)
    assert (ec.model.name, ec.env.name, ec.sampling.temperature, ec.eval.levels) == ("tiny", "frozenlake", 0.7, 2)


def test_world_model_reward_adds_the_exact_share(tmp_path):
    """The VAGEN-style score: env score + weight x mean over turns of (obs exact + pred exact) / 2."""
    from spa_rl.agent import Episode, EpisodeConfig, PromptSet
    from spa_rl.envs import make

    env = make("frozenlake", render_mode="grid+coords", is_slippery=False)
    ep = Episode(env, 0, EpisodeConfig(mode="world-model", max_turns=2), PromptSet.load("frozenlake"))
    state = ep.states[-1]
    action = env.expert_actions(1)[0]
    ep.apply_response(f"<think> <observation>{state}</observation> go <prediction>wrong</prediction> </think> "
                      f"<answer> {action} </answer>")  # observation right, prediction wrong: 0.5
    if not ep.done:
        ep.apply_response("no format at all")  # 0
    share = train.world_model_share(ep)
    assert share == pytest.approx(0.5 / len(ep.turns))

    class R:  # what score() reads of a rollout
        episode = ep
    assert train.score([R()], 0.4).item() == pytest.approx(ep.score + 0.4 * share)
    assert train.score([R()]).item() == pytest.approx(ep.score)
    from spa_rl.errors import ConfigError
    with pytest.raises(ConfigError, match="world_model_reward needs episode.mode world-model"):
        load_config(train.Config, {**SMALL, "world_model_reward": 0.5})


def test_progress_reward_adds_the_weighted_progress():
    """score = env score + weight x Episode.progress; a game without a distance is refused."""
    from spa_rl.agent import Episode, EpisodeConfig
    from spa_rl.envs import FrozenLakeEnv
    from spa_rl.errors import ConfigError

    env = FrozenLakeEnv.from_level_text("P__\n_O_\n__G", is_slippery=False)
    ep = Episode(env, 0, EpisodeConfig(max_turns=1))
    ep.apply_response("<think> ok </think> <answer> Right || Right </answer>")

    class R:  # what score() reads of a rollout
        episode = ep
    assert ep.progress == 0.5 and ep.score == 0.0
    assert train.score([R()], progress_reward=0.4).item() == pytest.approx(0.2)
    assert train.score([R()]).item() == 0.0
    with pytest.raises(ConfigError, match="progress_reward needs a game that reports"):
        load_config(train.Config, {**SMALL, "env": "sudoku", "progress_reward": 0.5})
    with pytest.raises(ConfigError, match="progress_reward must be >= 0"):
        load_config(train.Config, {**SMALL, "progress_reward": -1})


def test_ratio_uses_the_sampling_temperature(tmp_path):
    """At T = 0.7 the sampler's log-probs are those of logits / 0.7; the training forward scores
    at the same temperature, so with the sampler's log-probs as the old ones the first ratio is 1."""
    rows = step_rows(run_train(tmp_path, "t", steps=1, eval_every=0, old_logprobs="rollout",
                               sampling={"max_new_tokens": 12, "temperature": 0.7}, **{"model.dtype": "fp32"}))
    assert "rollout/logprob_gap" not in rows[0]  # no recomputing forward pass, so no gap to log
    assert rows[0]["actor/ratio_mean"] == pytest.approx(1.0, abs=1e-4)


def test_an_episode_without_a_turn_adds_no_loss_and_no_crash():
    """An episode whose first prompt does not fit the context budget plays no turn; the batch
    still builds (it used to raise on max() of nothing), with nothing of it covered."""
    from spa_rl.agent import EpisodeConfig
    from spa_rl.models import load_model_and_tokenizer
    from spa_rl.rollout.backend import HFBackend, SamplingParams
    from spa_rl.rollout.engine import make_episodes, run_rollouts
    from spa_rl.tokens import ChatTokenizer

    model, tok = load_model_and_tokenizer("tiny", dtype="fp32")
    chat = ChatTokenizer(tok)
    eps = make_episodes("frozenlake", "train", 0, 1, 2, EpisodeConfig(max_turns=1))
    first = len(chat.prompt_ids(eps[0][1].messages))
    params = SamplingParams(max_new_tokens=8)
    fits = run_rollouts(eps[:1], HFBackend(model, tok), chat, params, max_context_tokens=first + 8)
    overflows = run_rollouts(eps[1:], HFBackend(model, tok), chat, params, max_context_tokens=first)
    assert overflows[0].context_overflow and not overflows[0].turns
    cfg = load_config(train.Config, {**SMALL, "out": "unused"})
    batch = train.build_batch(fits + overflows, torch.tensor([1.0, -0.1]), chat, cfg, tok.pad_token_id)
    assert batch.mask[1].sum() == 0 and batch.rewards[1].abs().sum() == 0
    assert batch.mask[0].sum() > 0 and batch.rewards[0].sum() == 1.0


@pytest.mark.parametrize("algo, whiten, whitened", [("grpo", "auto", False), ("grpo", "always", True),
                                                    ("ppo", "auto", True), ("ppo", "never", False)])
def test_grpo_advantages_are_not_whitened_by_default(algo, whiten, whitened):
    """Group 0: a short success and a long failure; group 1: two equal failures (no signal).
    Unwhitened GRPO gives group 1 zero advantages and each episode its group-normalised score on
    every token; whitening would shift all of them by the token-weighted mean (the long failure
    weighs more), so that group 1 would be pushed up although it carries no signal."""
    mask = torch.zeros(4, 6)
    mask[0, 1:3] = 1  # 2 tokens
    mask[1, 1:6] = 1  # 5 tokens
    mask[2, 1:4] = 1
    mask[3, 1:4] = 1
    rewards = torch.zeros(4, 6)
    rewards[0, 2] = 1.0  # the score on the last covered token (what ppo's GAE reads)
    batch = train.PPOBatch(input_ids=torch.zeros(4, 6, dtype=torch.long), attention_mask=torch.ones(4, 6),
                           mask=mask, rewards=rewards, rollout_logprobs=torch.zeros(4, 6),
                           scores=torch.tensor([1.0, 0.0, 0.0, 0.0]), group_ids=torch.tensor([0, 0, 1, 1]),
                           old_values=torch.zeros(4, 6))
    cfg = load_config(train.Config, {**SMALL, "algo": algo, "whiten": whiten, "out": "unused"})
    train.add_advantages(batch, cfg)
    adv = batch.advantages
    assert (adv * (1 - mask)).abs().sum() == 0
    covered = adv[mask.bool()]
    assert abs(covered.mean().item()) < 1e-5 if whitened else covered.mean().item() != pytest.approx(0.0, abs=1e-3)
    if algo == "grpo" and not whitened:
        a = 1 / (2 ** 0.5 + 1e-6)  # (1 - 0.5) / std(1, 0) with the unbiased std
        assert adv[0, 1:3].tolist() == pytest.approx([a, a]) and adv[1, 1:6].tolist() == pytest.approx([-a] * 5)
        assert adv[2:].abs().sum() == 0
    if algo == "grpo" and whitened:
        assert adv[2, 1:4].abs().min() > 0.1  # the shift reaches the group without signal


@pytest.mark.parametrize("n,size", [(12, 4), (10, 4), (5, 8)])
def test_minibatches_cover_the_shuffle_once_each_in_batch_order(n, size):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    parts = train.minibatches(order, size)
    # the shuffle decides the membership of each mini-batch ...
    assert [set(p.tolist()) for p in parts] == [set(order[m:m + size].tolist()) for m in range(0, n, size)]
    # ... and each is in batch order, so that a level's samples sit side by side in the micro-batches
    assert all(p.tolist() == sorted(p.tolist()) for p in parts)
