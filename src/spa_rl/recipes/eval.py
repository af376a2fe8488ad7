"""spa eval: play fixed validation levels and report Pass@1, Pass@k and the protocol metrics.

    spa eval --env sokoban --model default --levels 128 --samples 8 --out runs/eval

Levels come from the validation seed stream (`level_seed("val", i)` for i in
[first_level, first_level + levels)), so every evaluation of a setting plays the same levels.
Pass@1 is the mean success over all sampled episodes; Pass@k uses the unbiased estimator over
each level's n samples. Writes metrics.json, trajectories.jsonl and config.yaml to --out.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from spa_rl.config import option, save_config, atomic_write_text
from spa_rl.envs import ENV_NAMES
from spa_rl.errors import ConfigError

MODES = ("base", "world-model")
RENDERS = ("grid", "grid+coords")


@dataclass
class Config:
    env: str = option("sokoban", "game to play", choices=ENV_NAMES)
    model: str = option("default", "'default' (embedded SmolLM2-135M-Instruct), 'tiny', a local folder or a hub id")
    mode: str = option("base", "prompt mode", choices=MODES)
    render: str = option("grid+coords", "state text: grid only, or grid plus coordinate line", choices=RENDERS)
    levels: int = option(128, "number of validation levels")
    samples: int = option(8, "episodes per level (n for Pass@k)")
    first_level: int = option(0, "index of the first level in the validation seed stream")
    level_file: str | None = option(None, "play the levels of this file (blank-line separated) instead of generated ones")
    env_options: str | None = option(None, "game options as YAML, e.g. '{size: 6}' or '{is_slippery: false}'")
    max_turns: int = option(5, "LLM turns per episode")
    max_actions_per_turn: int = option(5, "actions kept from one answer")
    action_budget: int | None = option(None, "actions per episode (default: the game's, 10 / 10 / 50)")
    max_new_tokens: int = option(400, "token cap for one turn's response")
    temperature: float = option(1.0, "sampling temperature (0 = greedy)")
    top_p: float = option(1.0, "nucleus sampling threshold")
    top_k: int = option(0, "top-k sampling (0 = off)")
    batch_size: int = option(64, "episodes generated together")
    max_context_tokens: int = option(8192, "an episode stops when its next turn would not fit")
    dtype: str = option("auto", "model dtype: auto (bf16 where the CPU/GPU supports it), bf16, fp32",
                        choices=("auto", "bf16", "fp32"))
    seed: int = option(0, "sampling seed")
    out: str = option("runs/eval", "output folder")

    def check(self) -> list[str]:
        errors = []
        for name in ("levels", "samples", "max_turns", "max_actions_per_turn", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                errors.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.action_budget is not None and self.action_budget < 1:
            errors.append(f"action_budget must be >= 1, got {self.action_budget}")
        if self.temperature < 0:
            errors.append(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            errors.append(f"top_p must be in (0, 1], got {self.top_p}")
        errors.extend(env_options_errors(self.env_options))
        return errors


def env_options_errors(text: str | None) -> list[str]:
    """The config-check form of `parse_env_options`, shared by every recipe that plays."""
    try:
        parse_env_options(text)
    except ConfigError as exc:
        return [str(exc)]
    return []


def parse_env_options(text: str | None) -> dict:
    """`--env-options '{size: 6, is_slippery: false}'` -> dict (validated by the env itself)."""
    import yaml

    if not text:
        return {}
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"env_options: {text!r} is not YAML") from None
    if not isinstance(value, dict):
        raise ConfigError(f"env_options: expected a mapping like '{{size: 6}}', got {text!r}")
    return value


def episode_config(cfg) -> "EpisodeConfig":
    from spa_rl.agent import EpisodeConfig
    return EpisodeConfig(mode=cfg.mode, render_mode=cfg.render, max_turns=cfg.max_turns,
                         max_actions_per_turn=cfg.max_actions_per_turn, action_budget=cfg.action_budget)


def sampling_params(cfg):
    from spa_rl.rollout.backend import SamplingParams
    return SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                          top_k=cfg.top_k)


def summarize(rollouts, samples: int) -> dict:
    """Run-level metrics from finished rollouts (all levels must have `samples` episodes)."""
    from spa_rl.agent import aggregate_metrics, episode_metrics
    from spa_rl.algorithms import pass_at_k_table

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
    table = pass_at_k_table([(len(v), sum(v)) for v in counts.values()])
    for k, v in table.items():
        metrics[f"pass@{k}"] = v
    metrics["episodes"] = len(rollouts)
    metrics["levels"] = len(counts)
    return metrics


def evaluate(model, tokenizer, cfg, split: str = "val", show_progress: bool = True):
    """Roll out `cfg.levels x cfg.samples` episodes and return (metrics, rollouts)."""
    from tqdm.auto import tqdm

    from spa_rl.rollout.backend import HFBackend
    from spa_rl.rollout.engine import make_episodes, run_rollouts
    from spa_rl.tokens import ChatTokenizer

    chat = ChatTokenizer(tokenizer)
    backend = HFBackend(model, tokenizer, max_batch_size=cfg.batch_size, seed=cfg.seed)
    episodes = make_episodes(cfg.env, split, cfg.first_level, cfg.levels, cfg.samples, episode_config(cfg),
                             env_options=parse_env_options(cfg.env_options), level_file=cfg.level_file)
    bar = tqdm(total=len(episodes), desc=f"eval {cfg.env}", unit="ep", disable=not show_progress)

    def on_turn(turn, n_active):
        bar.n = len(episodes) - n_active
        bar.set_postfix(turn=turn)
        bar.refresh()

    t0 = time.perf_counter()
    rollouts = run_rollouts(episodes, backend, chat, sampling_params(cfg), cfg.max_context_tokens, on_turn)
    bar.n = len(episodes)
    bar.close()
    seconds = time.perf_counter() - t0
    metrics = summarize(rollouts, cfg.samples)
    generated = sum(r.response_tokens for r in rollouts)
    metrics["seconds"] = seconds
    metrics["generated_tokens_per_second"] = generated / seconds if seconds > 0 else 0.0
    return metrics, rollouts


def write_trajectories(rollouts, path: Path) -> None:
    lines = []
    for r in rollouts:
        rec = r.episode.to_record()
        rec["group"] = r.group
        rec["response_tokens"] = r.response_tokens
        rec["finish_reasons"] = [t.finish_reason for t in r.turns]
        rec["context_overflow"] = r.context_overflow
        lines.append(json.dumps(rec, ensure_ascii=False))
    atomic_write_text(path, "\n".join(lines) + "\n")


def print_summary(metrics: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    Console(stderr=True).print(table)


def main(cfg: Config) -> int:
    from spa_rl.models import load_model_and_tokenizer

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    model, tokenizer = load_model_and_tokenizer(cfg.model, dtype=cfg.dtype)
    metrics, rollouts = evaluate(model, tokenizer, cfg)
    write_trajectories(rollouts, out / "trajectories.jsonl")
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    print_summary(metrics, f"spa eval: {cfg.env}, {cfg.levels} levels x {cfg.samples} samples, model {cfg.model}")
    print(f"wrote {out / 'metrics.json'}, {out / 'trajectories.jsonl'}, {out / 'config.yaml'}")
    return 0
