"""Evaluation over fixed levels, shared by `spa eval` and the validation inside `spa train`.

Levels come from the validation seed stream (`level_seed("val", i)` for i in
[first_level, first_level + levels)), or from a level file, so every evaluation of a setting
plays the same levels. Pass@1 is the mean success over all sampled episodes; Pass@k uses the
unbiased estimator over each level's n samples.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from spa_rl.config import option, section
from spa_rl.sections import EnvSection, EpisodeSection, EvalSection, ModelSection, SamplingSection


@dataclass
class EvalConfig:
    """`spa eval`'s config; `spa train` builds one for its validation (`train.eval_config`)."""

    model: ModelSection = section(ModelSection, "the model to evaluate")
    env: EnvSection = section(EnvSection, "the game")
    episode: EpisodeSection = section(EpisodeSection, "how an episode is played")
    sampling: SamplingSection = section(SamplingSection, "how responses are sampled")
    eval: EvalSection = section(EvalSection, "the validation levels")
    seed: int = option(0, "sampling seed")
    out: str = option("runs/eval", "output folder")


def summarize(rollouts) -> dict:
    """Run-level metrics from finished rollouts (every level with the same number of samples)."""
    from spa_rl.agent import aggregate_metrics, episode_metrics
    from spa_rl.algorithms import pass_at_k_table
    from spa_rl.algorithms.stats import pass_at_1_se

    per_episode = []
    for r in rollouts:
        m = episode_metrics(r.episode)
        m["response_tokens"] = r.response_tokens
        m["response_tokens_per_turn"] = r.response_tokens / max(1, len(r.turns))
        m["context_overflow"] = float(r.context_overflow)
        # turns cut by the token cap: a high share means max_new_tokens is below the response
        # length the model was trained to write, and those turns lose their answer
        m["truncated_turn_rate"] = sum(t.finish_reason == "length" for t in r.turns) / max(1, len(r.turns))
        per_episode.append(m)
    metrics = aggregate_metrics(per_episode)
    counts: dict[int, list[int]] = {}
    for r in rollouts:
        counts.setdefault(r.group, []).append(int(bool(r.episode.success)))
    level_counts = [(len(counts[g]), sum(counts[g])) for g in sorted(counts)]
    for k, v in pass_at_k_table(level_counts).items():
        metrics[f"pass@{k}"] = v
    metrics["pass_at_1_stderr"] = pass_at_1_se(level_counts)[1]  # over levels (algorithms.stats)
    metrics["episodes"] = len(rollouts)
    metrics["levels"] = len(counts)
    # (samples, successes) per level in level order, so that two validations of the same levels
    # compare level by level (algorithms.stats.paired_difference)
    metrics["level_counts"] = [list(c) for c in level_counts]
    return metrics


def evaluate(model, tokenizer, cfg: EvalConfig, split: str = "val", show_progress: bool = True,
             backend_cache: dict | None = None):
    """Roll out `cfg.eval.levels x cfg.eval.samples` episodes; return (metrics, rollouts).
    `backend_cache`: see `rollout.setup.make_backend` (spa train keeps its vLLM engine there)."""
    from tqdm.auto import tqdm

    from spa_rl.rollout.engine import run_rollouts
    from spa_rl.rollout.setup import make_backend, make_level_episodes, sampling_params
    from spa_rl.tokens import ChatTokenizer

    chat = ChatTokenizer(tokenizer)
    sampling = cfg.sampling
    if cfg.eval.temperature is not None:
        sampling = dataclasses.replace(sampling, temperature=cfg.eval.temperature)
    backend = make_backend(model, tokenizer, sampling, cfg.seed, model_name=cfg.model.name, dtype=cfg.model.dtype,
                           cache=backend_cache)
    episodes = make_level_episodes(cfg.env, cfg.episode, split, cfg.eval.first_level, cfg.eval.levels,
                                   cfg.eval.samples)
    bar = tqdm(total=len(episodes), desc=f"eval {cfg.env.name}", unit="ep", disable=not show_progress)

    def on_turn(turn, n_active):
        bar.n = len(episodes) - n_active
        bar.set_postfix(turn=turn)
        bar.refresh()

    t0 = time.perf_counter()
    rollouts = run_rollouts(episodes, backend, chat, sampling_params(sampling), cfg.episode.max_context_tokens,
                            on_turn)
    bar.n = len(episodes)
    bar.close()
    seconds = time.perf_counter() - t0
    metrics = summarize(rollouts)
    generated = sum(r.response_tokens for r in rollouts)
    metrics["seconds"] = seconds
    metrics["generated_tokens_per_second"] = generated / seconds if seconds > 0 else 0.0
    return metrics, rollouts


def write_trajectories(rollouts, path: Path) -> None:
    from spa_rl.artifacts import atomic_write_text

    lines = []
    for r in rollouts:
        rec = r.episode.to_record()
        rec["group"] = r.group
        rec["response_tokens"] = r.response_tokens
        rec["finish_reasons"] = [t.finish_reason for t in r.turns]
        rec["context_overflow"] = r.context_overflow
        lines.append(json.dumps(rec, ensure_ascii=False))
    atomic_write_text(path, "\n".join(lines) + "\n")
