"""The `spa` command: one sub-command per stage.

Each sub-command lives in a recipe module that is imported only when it runs, so `spa play`
starts without importing torch. Any `SpaError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from spa_rl.errors import SpaError

DESCRIPTION = "spa-rl: self-play world-model finetuning and RL for LLM agents on text games."

# name -> (module, one-line help). Config-driven recipes expose `Config` (a dataclass) and
# `main(cfg)`; the others expose `add_arguments(parser)` and `run(args)`.
COMMANDS = {
    "play": ("spa_rl.recipes.play", "play a game in the terminal; actions come from standard input"),
    "levels": ("spa_rl.recipes.play", "level generation statistics for an environment"),
    "eval": ("spa_rl.recipes.eval", "evaluate a model on fixed validation levels: Pass@1, Pass@k and more"),
    "generate": ("spa_rl.recipes.generate", "self-play world-model data with ground-truth states"),
    "sft": ("spa_rl.recipes.sft", "supervised finetuning on a generated dataset"),
    "train": ("spa_rl.recipes.train", "PPO or GRPO from a checkpoint, with periodic validation"),
    "pipeline": ("spa_rl.recipes.pipeline", "generate, sft, train and eval in order, resumable"),
    "experiment": ("spa_rl.recipes.experiment", "a matrix of arms x seeds over presets, resumable, with RESULTS.md"),
    "report": ("spa_rl.recipes.report", "report.md with plots for one or more run folders"),
    "demo": ("spa_rl.recipes.demo", "a short RL run on the embedded default model, ending with whether validation Pass@1 rose (what `make demo` runs)"),
}


def _add_play_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("env", help="sokoban, frozenlake or sudoku")
    p.add_argument("--seed", type=int, default=0, help="level seed (default: 0)")
    p.add_argument("--level", default=None, metavar="FILE", help="play a level from a text file instead")
    p.add_argument("--render", default="grid+coords", choices=["grid", "grid+coords"], help="state text shown")


def _add_levels_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("env", help="sokoban, frozenlake or sudoku")
    p.add_argument("--n", type=int, default=1000, help="number of levels to generate (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="first level index of the train stream (default: 0)")


def _run(argv: list[str]) -> int:
    # Build only the sub-parser that is needed: importing every recipe would import torch.
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser = argparse.ArgumentParser(prog="spa", description=DESCRIPTION)
        sub = parser.add_subparsers(dest="command", metavar="COMMAND")
        for name, (_, help_text) in COMMANDS.items():
            sub.add_parser(name, help=help_text)
        parser.parse_args(argv or ["--help"])
        return 2
    name, rest = argv[0], argv[1:]
    module, help_text = COMMANDS[name]
    p = argparse.ArgumentParser(prog=f"spa {name}", description=help_text)
    if name == "play":
        _add_play_arguments(p)
        args = p.parse_args(rest)
        from spa_rl.recipes.play import run_play
        return run_play(args.env, args.seed, args.level, args.render, sys.stdin, sys.stdout)
    if name == "levels":
        _add_levels_arguments(p)
        args = p.parse_args(rest)
        from spa_rl.recipes.play import run_levels
        run_levels(args.env, args.n, args.seed, sys.stdout)
        return 0
    mod = importlib.import_module(module)
    if hasattr(mod, "add_arguments"):
        mod.add_arguments(p)
        return int(mod.run(p.parse_args(rest)) or 0)
    from spa_rl.config import build_parser as add_config_flags, load_config
    add_config_flags(mod.Config, p)
    cfg = load_config(mod.Config, p.parse_args(rest))
    return int(mod.main(cfg) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _run(argv)
    except SpaError as exc:
        print(f"spa: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spa: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
