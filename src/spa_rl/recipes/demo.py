"""spa demo: the main job on the embedded default model, what `make demo` runs.

The `cpu-small` SPA pipeline on Sokoban (world-model data from the solver, world-model SFT, PPO,
evaluation and a report), sized to finish in under 20 minutes on 2 CPU cores. Same as
`spa pipeline --env sokoban --preset cpu-small --out DIR`.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--env", default="sokoban", help="game (default: sokoban)")


def run(args) -> int:
    from spa_rl.recipes import pipeline

    return pipeline.run(argparse.Namespace(env=args.env, preset="cpu-small", model=None, out=args.out, set=[],
                                           env_options=None))
