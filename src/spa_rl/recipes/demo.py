"""spa demo: RL that measurably learns on the embedded default model, what `make demo` runs.

The `demo` preset (spa_rl/configs/demo.yaml, which says why each choice) on FrozenLake 4x4
without slipping in gymnasium's layout: a format warm-up on random-policy episodes, then GRPO
with a progress reward, validated on the same 128 levels at the start and the end. About 11
minutes on 2 CPU cores from a fresh clone. Same as
`spa pipeline --env frozenlake --preset demo --out DIR`, and then one line: validation Pass@1
before and after RL, the change paired by level and whether it exceeds two standard errors.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--env", default="frozenlake", help="game (default: frozenlake)")
    p.add_argument("--preset", default="demo", help="preset (default: demo; cpu-small runs the SPA pipeline)")


def run(args) -> int:
    from spa_rl.artifacts import read_jsonl
    from spa_rl.recipes import pipeline
    from spa_rl.recipes.report import validation_change

    code = pipeline.run(argparse.Namespace(env=args.env, preset=args.preset, model=None, out=args.out, set=[],
                                           env_options=None))
    log = Path(args.out) / "train" / "metrics.jsonl"
    if code == 0 and log.is_file():
        vals = [r for r in read_jsonl(log) if "val/pass@1" in r]
        if len(vals) >= 2:
            print("[demo] " + validation_change(vals[0], vals[-1]).replace("**", ""))
    return code
