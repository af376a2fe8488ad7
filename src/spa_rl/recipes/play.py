"""Play a game in the terminal, and measure the level generators.

- `run_play`: one episode driven by text lines (a human at the terminal, or a file/StringIO of
  actions): one action per line until end of input or the end of the episode; prints the state,
  reward, flags and info after every action and a summary at the end. A line `?` prints the
  solver's suggestion instead of playing (`env.expert_actions`); blank lines are skipped.
- `run_levels`: generates `n` levels (reset seeds `seed .. seed + n - 1`), solves each and prints
  how many are solvable within the action budget, a histogram of solution lengths
  (Sokoban: shortest solution in actions; FrozenLake: best success probability within the
  budget and shortest hole-free path; Sudoku: blanks) and generation speed.

The `spa` CLI wires these in; both take explicit streams so tests can drive them.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from typing import Any, TextIO

from spa_rl.envs import env_class, make
from spa_rl.envs.frozenlake import shortest_path_length, success_probability
from spa_rl.envs.sokoban import solve_sokoban
from spa_rl.envs.sudoku import count_sudoku_solutions
from spa_rl.errors import ConfigError


def run_play(
    env_name: str,
    seed: int | None = 0,
    level_file: str | None = None,
    render_mode: str = "grid",
    in_stream: TextIO | None = None,
    out_stream: TextIO | None = None,
) -> int:
    """Play one episode of `env_name`; returns the exit status (0).

    The level is the one of reset seed `seed` (None: a random level), or the level in
    `level_file` (then `seed` only seeds FrozenLake's slips). Errors in the level file or the
    options raise `SpaError` subclasses (the CLI prints them).
    """
    inp = sys.stdin if in_stream is None else in_stream
    out = sys.stdout if out_stream is None else out_stream
    cls = env_class(env_name)
    if level_file is not None:
        env = cls.from_level_file(level_file, render_mode=render_mode)
        origin = f"level file {level_file}"
    else:
        env = make(env_name, render_mode=render_mode)
        origin = f"seed {seed}" if seed is not None else "a random seed"
    state, info = env.reset(seed=seed)
    moves = ", ".join(cls.action_names) if cls.action_names else "r,c,v (1-indexed row, column, value)"
    print(f"{cls.name}: {origin}. Actions: {moves}; one per line, '?' for a hint, end of input to stop.", file=out)
    print(state, file=out)
    entered = invalid = 0
    total = 0.0
    terminated = truncated = False
    for line in inp:
        action = line.strip()
        if not action:
            continue
        if action == "?":
            budget = max(1, cls.default_action_budget - env.steps)
            hint = env.expert_actions(budget)
            print(f"hint: {' || '.join(hint) if hint else '(no solution from here)'}", file=out)
            continue
        entered += 1
        state, reward, terminated, truncated, info = env.step(action)
        total += reward
        invalid += not info["action_is_valid"]
        print(f"> {action}", file=out)
        print(state, file=out)
        print(f"reward {reward:g} | terminated {terminated} | truncated {truncated} | {_format_info(info)}", file=out)
        if terminated or truncated:
            break
    ended = "solved" if info["success"] else "game over" if terminated else "step cap" if truncated else "end of input"
    print(
        f"summary: {entered} actions entered, {env.steps} steps, {invalid} invalid, "
        f"return {round(total, 6):g}, success {info['success']} ({ended})",
        file=out,
    )
    return 0


def _format_info(info: dict[str, Any]) -> str:
    return ", ".join(f"{key} {value}" for key, value in info.items() if key != "level_seed")


def run_levels(
    env_name: str,
    n: int = 100,
    seed: int = 0,
    out_stream: TextIO | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Generate and solve `n` levels (reset seeds `seed .. seed + n - 1`); print and return stats.

    `options` are env options (`make(env_name, **options)`) plus an optional
    `action_budget` (default: the env's `default_action_budget`, 10 / 10 / 50).
    Returned keys: `env`, `n`, `seed`, `options`, `action_budget`, `levels_per_second`
    (generation only), `solve_seconds`, `solvable_share`, `histograms` (name -> {bucket:
    count}) and `means` (name -> mean).
    """
    out = sys.stdout if out_stream is None else out_stream
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"n: the number of levels must be a positive int, got {n!r}")
    env_opts = dict(options or {})
    cls = env_class(env_name)
    budget = env_opts.pop("action_budget", cls.default_action_budget)
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ConfigError(f"action_budget: expected an int >= 0, got {budget!r}")
    env = make(env_name, **env_opts)

    start = time.perf_counter()
    levels = [env.generate_level(seed + k) for k in range(n)]
    gen_seconds = time.perf_counter() - start

    start = time.perf_counter()
    histograms: dict[str, Counter] = {}
    means: dict[str, float] = {}
    if cls.name == "sokoban":
        lengths = [_length(solve_sokoban(level)) for level in levels]
        solvable = [x is not None and x <= budget for x in lengths]
        histograms["shortest solution (actions)"] = Counter("unsolved" if x is None else x for x in lengths)
        means["shortest solution (actions)"] = _mean([x for x in lengths if x is not None])
    elif cls.name == "frozenlake":
        probs = [success_probability(level, budget, is_slippery=env.is_slippery, success_rate=env.success_rate) for level in levels]
        paths = [shortest_path_length(level) for level in levels]
        solvable = [p is not None and p <= budget for p in paths]
        histograms[f"success probability within {budget} actions"] = Counter(_bucket(p) for p in probs)
        histograms["shortest path (actions, no slips)"] = Counter("none" if p is None else p for p in paths)
        means[f"success probability within {budget} actions"] = _mean(probs)
        means["shortest path (actions, no slips)"] = _mean([p for p in paths if p is not None])
    else:
        blanks = [level.blanks for level in levels]
        unique = [count_sudoku_solutions(level.cells, level.size, 2) == 1 for level in levels]
        solvable = [u and b <= budget for u, b in zip(unique, blanks)]
        histograms["blanks"] = Counter(blanks)
        means["blanks"] = _mean(blanks)
        means["unique solution"] = _mean([float(u) for u in unique])
    solve_seconds = time.perf_counter() - start

    stats = {
        "env": cls.name,
        "n": n,
        "seed": seed,
        "options": env_opts,
        "action_budget": budget,
        "levels_per_second": n / gen_seconds if gen_seconds > 0 else float("inf"),
        "solve_seconds": solve_seconds,
        "solvable_share": sum(solvable) / n,
        "histograms": {name: dict(sorted(h.items(), key=lambda kv: _sort_key(kv[0]))) for name, h in histograms.items()},
        "means": means,
    }
    _print_levels(stats, out)
    return stats


def _length(plan: list[str] | None) -> int | None:
    return None if plan is None else len(plan)


def _mean(values: list[float] | list[int]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _bucket(p: float) -> str:
    """Deciles `[0.0,0.1)`, ..., `[0.9,1.0]`, with exact 0 and 1 apart."""
    if p <= 0.0:
        return "0"
    if p >= 1.0:
        return "1"
    k = min(int(p * 10), 9)
    return f"[{k / 10:.1f},{(k + 1) / 10:.1f})"


def _sort_key(bucket: Any) -> tuple[int, float, str]:
    if isinstance(bucket, int):
        return (0, float(bucket), "")
    if bucket in ("0", "1"):
        return (1, float(bucket) * 2 - 0.5, bucket)
    if bucket.startswith("["):
        return (1, float(bucket[1:4]), bucket)
    return (2, 0.0, bucket)


def _print_levels(stats: dict[str, Any], out: TextIO) -> None:
    opts = ", ".join(f"{k}={v}" for k, v in stats["options"].items()) or "defaults"
    print(f"{stats['env']}: {stats['n']} levels, seeds {stats['seed']}..{stats['seed'] + stats['n'] - 1}, options: {opts}", file=out)
    print(f"generation: {stats['levels_per_second']:.1f} levels/s; solving took {stats['solve_seconds']:.2f} s", file=out)
    print(f"solvable within {stats['action_budget']} actions: {100 * stats['solvable_share']:.1f}%", file=out)
    for name, hist in stats["histograms"].items():
        mean = stats["means"].get(name)
        print(f"{name}" + (f" (mean {mean:.2f})" if mean is not None else "") + ":", file=out)
        top = max(hist.values())
        for bucket, count in hist.items():
            bar = "#" * max(1, round(40 * count / top))
            print(f"  {str(bucket):>12}  {count:6d}  {bar}", file=out)
    for name, mean in stats["means"].items():
        if name not in stats["histograms"]:
            print(f"{name}: {mean:.3f}", file=out)
