"""Seconds per PPO step (rollout / scoring / update), tokens per second and peak memory.

    python benchmarks/ppo.py [--model default] [--groups 8] [--group-size 4] [--steps 2] [--sweep 16,32,64]
        [--micro-batch 8] [--update-baseline] [--attention-baseline] [--no-baseline]

Runs `spa train` in this process on the given model with `groups x group_size` episodes per step
(default 8 x 4 = 32) and the paper's other settings (keep 25% of groups, micro-batch 1 unless
`--micro-batch` says otherwise), and
reads the per-phase timings the recipe logs. A short untimed run first compiles what torch.compile
compiles (once per process). Validation is shrunk to one level so that it
does not dominate; its time is not part of the step timings. Peak memory is the process's
maximum resident set (ru_maxrss), compared with the 8 GiB budget of issue 5.

Baseline, measured in the same run: the same steps with `--sampling.backend hf`, the plain HF
forward that re-sends every context each turn (what the rollouts cost before the engine; the
update is the same code on both sides). `--sweep 16,32,64` also times steps of those sizes, to
show that a step's cost grows linearly with its episodes. `--update-baseline` also times the
same steps with the update at micro-batch 1, shared prefixes off (SPA_RL_SHARE_PREFIXES=0;
`pack_rows`) and a separate no-grad pass for the old log-probs and values
(`fuse_old_pass=false`), as the recipe ran it before 2026-12-07 apart from two defaults that
changed then: activation checkpointing (off on both sides) and the fused AdamW step (on both
sides). `--attention-baseline` also times the same steps with the training attention's softmax
passes compiled by torch.compile instead of done by the CPU kernels (`spa_rl.kernels`; the
rollouts, which do not use those passes' switch, sample the same episodes).

The update phase (old log-probs, then the mini-batch updates) runs through
`training.token_logprobs`: rows packed without padding, bf16 block attention, the fused LM-head
backward. The critic's forward and the loss normalisation are recipes/train.py's own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
from pathlib import Path

BUDGET_GIB = 8.0


PHASES = ("time/rollout_s", "time/scoring_s", "time/update_s", "time/step_s")


def run_steps(args, groups: int, backend: str, steps: int | None = None, max_new_tokens: int | None = None,
              max_turns: int | None = None, micro_batch: int | None = None, share_prefixes: bool = True,
              **overrides) -> list[dict]:
    """`args.steps` PPO steps of `groups x group_size` episodes; the logged per-step rows."""
    from spa_rl.config import load_config
    from spa_rl.recipes import train

    os.environ["SPA_RL_SHARE_PREFIXES"] = "1" if share_prefixes else "0"

    # the run's final checkpoint (~3 GB with the optimizer state) goes with the folder
    with tempfile.TemporaryDirectory(prefix="spa-ppo-bench-") as tmp:
        out = Path(tmp)
        cfg = load_config(train.Config, dict(
            env=args.env, model=args.model, steps=steps or args.steps, groups=groups, group_size=args.group_size,
            sampling={"max_new_tokens": max_new_tokens or args.max_new_tokens, "backend": backend},
            episode={"max_turns": max_turns or args.max_turns},
            micro_batch=micro_batch or args.micro_batch,
            eval={"levels": 1, "samples": 2}, eval_every=0, save_every=10**9, out=str(out), **overrides))
        train.main(cfg)
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "time/step_s" in r]


def print_steps(title: str, steps: list[dict], group_size: int) -> dict:
    print(f"\n{title}")
    print("step  rollout_s  scoring_s  update_s  total_s  gen_tokens/s  resp_tokens/episode  kept_episodes  "
          "trained_tokens")
    for r in steps:
        kept = int(r["rollout/kept_groups"]) * group_size
        print(f"{r['step']:>4}  {r['time/rollout_s']:9.1f}  {r['time/scoring_s']:9.3f}  {r['time/update_s']:8.1f}  "
              f"{r['time/step_s']:7.1f}  {r['rollout/generated_tokens_per_s']:12.1f}  "
              f"{r['rollout/response_tokens']:19.1f}  {kept:13d}  {int(r['rollout/trained_tokens']):14d}")
    mean = {k: sum(r[k] for r in steps) / len(steps) for k in PHASES}
    print(f"mean seconds per step: rollout {mean['time/rollout_s']:.1f}, scoring {mean['time/scoring_s']:.3f}, "
          f"update {mean['time/update_s']:.1f}, total {mean['time/step_s']:.1f}")
    return mean


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--env", default="sokoban")
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--max-turns", type=int, default=5)
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip the baseline (the same steps with --sampling.backend hf)")
    ap.add_argument("--micro-batch", type=int, default=1,
                    help="episodes per forward/backward in the update (the recipe's default is 1, the paper's)")
    ap.add_argument("--update-baseline", action="store_true",
                    help="also run the same steps at micro-batch 1 with shared prefixes off and a separate "
                         "old-log-prob pass (fuse_old_pass=false) and print the update-time ratio")
    ap.add_argument("--attention-baseline", action="store_true",
                    help="also run the same steps with the training attention's torch.compile'd blocks instead of "
                         "the CPU kernels' passes and print the update-time ratio")
    ap.add_argument("--sweep", default="", help="episode counts per step to time as well, e.g. 16,32,64")
    args = ap.parse_args()

    load_start = os.getloadavg()
    episodes = args.groups * args.group_size
    print(f"model={args.model} env={args.env} episodes/step={episodes} max_new_tokens={args.max_new_tokens} "
          f"max_turns={args.max_turns} steps={args.steps} micro_batch={args.micro_batch}")
    # Not timed: compiles the update's kernels and the engine's decode step, once per process
    # (without it the first measured step carried ~25 s of compilation).
    run_steps(args, args.groups, "auto", steps=1, max_new_tokens=16, max_turns=1)
    engine = print_steps("spa train, rollout engine (--sampling.backend auto)",
                         run_steps(args, args.groups, "auto"), args.group_size)
    sweep = {}
    for n in [int(x) for x in args.sweep.split(",") if x]:
        if n % args.group_size:
            raise SystemExit(f"--sweep: {n} episodes is not a multiple of the group size {args.group_size}")
        sweep[n] = engine if n == episodes else print_steps(
            f"engine, {n} episodes per step", run_steps(args, n // args.group_size, "auto"), args.group_size)
    baseline = None
    if not args.no_baseline:
        baseline = print_steps("baseline: the same steps through the HF forward (--sampling.backend hf: one call per "
                               "turn, every context re-sent)", run_steps(args, args.groups, "hf"), args.group_size)
    update_baseline = None
    if args.update_baseline:
        update_baseline = print_steps(
            "update baseline: the same steps at micro-batch 1, shared prefixes off, a separate no-grad old pass",
            run_steps(args, args.groups, "auto", micro_batch=1, share_prefixes=False, fuse_old_pass=False),
            args.group_size)
    attention_baseline = None
    if args.attention_baseline:
        from spa_rl import kernels

        real = kernels.training_attention_ops
        kernels.training_attention_ops = lambda *a: None  # what training.py asks; rollouts do not
        try:
            # untimed, as above: compiles the blocks, which the engine's side never compiled
            run_steps(args, args.groups, "auto", steps=1, max_new_tokens=16, max_turns=1)
            attention_baseline = print_steps(
                "attention baseline: the same steps with the training attention's torch.compile'd blocks",
                run_steps(args, args.groups, "auto"), args.group_size)
        finally:
            kernels.training_attention_ops = real
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print()
    if sweep:
        print("episodes/step  total_s  seconds/episode")
        for n, m in sorted(sweep.items()):
            print(f"{n:13d}  {m['time/step_s']:7.1f}  {m['time/step_s'] / n:15.2f}")
    print(f"peak memory of this process (max RSS over all runs): {peak_gib:.2f} GiB = "
          f"{peak_gib / BUDGET_GIB:.2f}x the {BUDGET_GIB:.0f} GiB budget")
    load_end = os.getloadavg()
    print("load average at the start " + " ".join(f"{x:.2f}" for x in load_start) + ", at the end "
          + " ".join(f"{x:.2f}" for x in load_end))
    print(f"engine step: {engine['time/step_s']:.1f} s (target <= 30 s at 32 episodes)")
    if update_baseline is not None:
        print(f"ratio update-baseline/engine update time: "
              f"{update_baseline['time/update_s'] / engine['time/update_s']:.2f}x")
    if attention_baseline is not None:
        print(f"ratio attention-baseline/engine update time: "
              f"{attention_baseline['time/update_s'] / engine['time/update_s']:.2f}x")
    if baseline is not None:
        print(f"ratio baseline/engine step time: {baseline['time/step_s'] / engine['time/step_s']:.2f}x "
              f"(rollout {baseline['time/rollout_s'] / engine['time/rollout_s']:.2f}x)")


if __name__ == "__main__":
    main()
