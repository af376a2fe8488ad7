"""Speed of the games: level generations per second and env steps per second.

    python benchmarks/envs.py            # about 30 s on one core
    python benchmarks/envs.py --seconds 0.5

For each setting: `levels/s` = `env.generate_level(seed)` calls over consecutive seeds (level
generation only; this includes the uniqueness checks of Sudoku and the reverse search of
Sokoban), `steps/s` = `env.step(action)` calls with uniformly random valid action text
(Sudoku: random `r,c,v`, so most moves are rejected by the rules) and `grid+coords` rendering,
resetting with the next seed when an episode ends (reset time excluded), `solves/s` = the
solver on generated levels (Sokoban BFS, FrozenLake DP with a 10-action budget, Sudoku
uniqueness count). Each measurement runs for about `--seconds` wall-clock seconds.
"""

from __future__ import annotations

import argparse
import platform
import random
import time

from spa_rl.envs import make
from spa_rl.envs.frozenlake import success_probability
from spa_rl.envs.sokoban import solve_sokoban
from spa_rl.envs.sudoku import count_sudoku_solutions

SETTINGS = [
    ("sokoban", {}, "6x6, 1 box (SPA)"),
    ("sokoban", {"dim_room": (10, 10), "num_boxes": 2}, "10x10, 2 boxes"),
    ("frozenlake", {}, "4x4, p=0.8, slippery (SPA)"),
    ("frozenlake", {"size": 6}, "6x6, p=0.8, slippery"),
    ("sudoku", {}, "4x4, 6 blanks (SPA)"),
    ("sudoku", {"size": 9}, "9x9, 45 blanks"),
]


def rate(fn, seconds: float) -> float:
    """Calls of `fn(i)` per second, i = 0, 1, ..., for about `seconds`."""
    count, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        fn(count)
        count += 1
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - start)


def step_rate(name: str, options: dict, seconds: float) -> float:
    env = make(name, render_mode="grid+coords", **options)
    rng = random.Random(0)  # a private generator: benchmarks must not touch global state either
    size = getattr(env, "size", 4)
    seed, steps, busy = 0, 0, 0.0
    env.reset(seed=seed)
    while busy < seconds:
        if env.action_names:
            actions = [rng.choice(env.action_names) for _ in range(256)]
        else:
            actions = [f"{rng.randint(1, size)},{rng.randint(1, size)},{rng.randint(1, size)}" for _ in range(256)]
        start = time.perf_counter()
        for action in actions:
            _, _, term, trunc, _ = env.step(action)
            steps += 1
            if term or trunc:
                busy += time.perf_counter() - start
                seed += 1
                env.reset(seed=seed)
                start = time.perf_counter()
        busy += time.perf_counter() - start
    return steps / busy


def solve_rate(name: str, options: dict, seconds: float) -> float:
    env = make(name, **options)
    levels = [env.generate_level(seed) for seed in range(200 if name != "sudoku" or env.size == 4 else 20)]
    if name == "sokoban":
        return rate(lambda i: solve_sokoban(levels[i % len(levels)]), seconds)
    if name == "frozenlake":
        return rate(lambda i: success_probability(levels[i % len(levels)], 10), seconds)
    return rate(lambda i: count_sudoku_solutions(levels[i % len(levels)].cells, env.size, 2), seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.2, help="wall-clock seconds per measurement")
    args = parser.parse_args()
    print(f"python {platform.python_version()} on {platform.machine()}, {args.seconds:g} s per measurement")
    print(f"{'env':<11} {'setting':<28} {'levels/s':>10} {'steps/s':>10} {'solves/s':>10}")
    for name, options, label in SETTINGS:
        env = make(name, **options)
        levels = rate(env.generate_level, args.seconds)
        steps = step_rate(name, options, args.seconds)
        solves = solve_rate(name, options, args.seconds)
        print(f"{name:<11} {label:<28} {levels:>10,.0f} {steps:>10,.0f} {solves:>10,.0f}", flush=True)


if __name__ == "__main__":
    main()
