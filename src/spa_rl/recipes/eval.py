"""spa eval: play fixed validation levels and report Pass@1, Pass@k and the protocol metrics.

    spa eval --env sokoban --model default --eval.levels 128 --eval.samples 8 --out runs/eval
    spa eval --model runs/sft/final --episode.mode world-model --sampling.temperature 0.7

The config and the evaluation loop live in `spa_rl.rollout.evaluation` (train's validation
uses the same ones). Writes metrics.json, trajectories.jsonl and config.yaml to --out.
"""

from __future__ import annotations

import json
from pathlib import Path

from spa_rl.config import save_config
from spa_rl.rollout.evaluation import EvalConfig as Config


def print_summary(metrics: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        if isinstance(v, list):  # per-level counts: in metrics.json, too long for the table
            continue
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    Console(stderr=True).print(table)


def main(cfg: Config) -> int:
    from spa_rl import runtime
    from spa_rl.artifacts import atomic_write_text
    from spa_rl.models import load_model_and_tokenizer
    from spa_rl.rollout.evaluation import evaluate, write_trajectories

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    rt = runtime.setup(device=cfg.model.device, dtype=cfg.model.dtype, distributed=False)
    model, tokenizer = load_model_and_tokenizer(cfg.model.name, dtype=rt.dtype, device=rt.device)
    metrics, rollouts = evaluate(model, tokenizer, cfg)
    write_trajectories(rollouts, out / "trajectories.jsonl")
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    print_summary(metrics, f"spa eval: {cfg.env.name}, {cfg.eval.levels} levels x {cfg.eval.samples} samples, "
                           f"model {cfg.model.name}")
    print(f"wrote {out / 'metrics.json'}, {out / 'trajectories.jsonl'}, {out / 'config.yaml'}")
    return 0
