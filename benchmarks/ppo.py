"""Seconds per PPO step (rollout / scoring / update), tokens per second and peak memory.

    python benchmarks/ppo.py [--model default] [--groups 8] [--group-size 4] [--steps 2]

Runs `spa train` in this process on the given model with `groups x group_size` episodes per step
(default 8 x 4 = 32) and the paper's other settings (keep 25% of groups, micro-batch 1), and
reads the per-phase timings the recipe logs. Validation is shrunk to one level so that it
does not dominate; its time is not part of the step timings. Peak memory is the process's
maximum resident set (ru_maxrss), compared with the 8 GiB budget of issue 5.

The update phase (old log-probs, then the mini-batch updates) runs through
`training.token_logprobs`: rows packed without padding, bf16 block attention, the fused LM-head
backward. The critic's forward and the loss normalisation are recipes/train.py's own.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
from pathlib import Path

BUDGET_GIB = 8.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--env", default="sokoban")
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--max-turns", type=int, default=5)
    args = ap.parse_args()

    from spa_rl.config import load_config
    from spa_rl.recipes import train

    import os

    load_start = os.getloadavg()
    out = Path(tempfile.mkdtemp(prefix="spa-ppo-bench-"))
    cfg = load_config(train.Config, dict(
        env=args.env, model=args.model, steps=args.steps, groups=args.groups, group_size=args.group_size,
        sampling={"max_new_tokens": args.max_new_tokens}, episode={"max_turns": args.max_turns},
        eval={"levels": 1, "samples": 2}, eval_every=0, save_every=10**9, out=str(out)))
    train.main(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "time/step_s" in r]
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\nmodel={args.model} env={args.env} episodes/step={args.groups * args.group_size} "
          f"max_new_tokens={args.max_new_tokens} max_turns={args.max_turns}")
    print("step  rollout_s  scoring_s  update_s  total_s  gen_tokens/s  resp_tokens/episode  kept_episodes")
    for r in steps:
        kept = int(r["rollout/kept_groups"]) * args.group_size
        print(f"{r['step']:>4}  {r['time/rollout_s']:9.1f}  {r['time/scoring_s']:9.3f}  {r['time/update_s']:8.1f}  "
              f"{r['time/step_s']:7.1f}  {r['rollout/generated_tokens_per_s']:12.1f}  "
              f"{r['rollout/response_tokens']:19.1f}  {kept:13d}")
    mean = {k: sum(r[k] for r in steps) / len(steps) for k in ("time/rollout_s", "time/scoring_s", "time/update_s",
                                                                "time/step_s")}
    print(f"mean seconds per step: rollout {mean['time/rollout_s']:.1f}, scoring {mean['time/scoring_s']:.3f}, "
          f"update {mean['time/update_s']:.1f}, total {mean['time/step_s']:.1f}")
    print(f"peak memory (max RSS): {peak_gib:.2f} GiB = {peak_gib / BUDGET_GIB:.2f}x the {BUDGET_GIB:.0f} GiB budget")
    load_end = os.getloadavg()
    print("load average at the start " + " ".join(f"{x:.2f}" for x in load_start) + ", at the end "
          + " ".join(f"{x:.2f}" for x in load_end))


if __name__ == "__main__":
    main()
