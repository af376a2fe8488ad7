"""spa report: report.md with PNG plots for one or more run folders, side by side.

    spa report runs/pipeline-a runs/pipeline-b --out runs/report

A run folder is a pipeline folder (with train/, eval*/ inside) or a single stage's folder. The
report reads what the recipes wrote: `metrics.jsonl` of training (validation every K steps) and
every `metrics.json` of evaluations. Plots: Pass@1 and Pass@k over steps, training reward,
response length, and world-model accuracy of the world-model-mode evaluations.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from spa_rl.artifacts import read_jsonl
from spa_rl.errors import DataError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--out", default=None, help="folder for report.md and the plots (default: the first run folder)")


def collect(run: Path) -> dict:
    """Training series and evaluation tables found in one run folder."""
    if not run.is_dir():
        raise DataError(f"run folder {run} does not exist")
    # the training log: a `spa train` folder, or the train/ stage of a pipeline (SFT logs differ)
    series = []
    for path in [run / "metrics.jsonl", run / "train" / "metrics.jsonl"]:
        if path.is_file():
            rows = read_jsonl(path)
            if any("val/pass@1" in r or "rollout/score_mean" in r for r in rows):
                series = rows
                break
    evals = {}
    for path in sorted(run.glob("metrics.json")) + sorted(run.glob("*/metrics.json")):
        try:
            evals[str(path.parent.relative_to(run)) or "."] = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise DataError(f"{path}: not valid JSON") from None
    if not series and not evals:
        raise DataError(f"{run}: no metrics.jsonl or metrics.json found (is it a spa-rl run folder?)")
    return {"name": run.name, "series": series, "evals": evals}


def _plot(runs, keys, title, ylabel, path: Path) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    drawn = False
    for run in runs:
        for key in keys:
            pts = [(r["step"], r[key]) for r in run["series"] if r.get(key) is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", markersize=3, label=f"{run['name']} {key}")
                drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set_title(title)
    ax.set_xlabel("PPO step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_world_model(runs, path: Path) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("observation_exact", "prediction_exact", "prediction_cell_accuracy")
    bars = [(f"{run['name']}/{name}", ev) for run in runs for name, ev in run["evals"].items()
            if any(k in ev for k in keys)]
    if not bars:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.6))
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        ax.bar([j + i * width for j in range(len(bars))], [ev.get(key, 0.0) for _, ev in bars], width, label=key)
    ax.set_xticks([j + width for j in range(len(bars))], [name for name, _ in bars], rotation=20, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_title("world-model accuracy (world-model-mode evaluations)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


TABLE_KEYS = ("pass@1", "pass@2", "pass@4", "pass@8", "success", "num_actions", "format_ok_rate",
              "valid_action_rate", "effective_action_rate", "response_tokens", "truncated_turn_rate", "observation_exact",
              "prediction_exact", "prediction_cell_accuracy", "episodes")


def _with_error(row: dict) -> str:
    """Pass@1 with its binomial standard error over the validation episodes, so that a change
    between two validations can be read against the noise of a small validation set."""
    p, n = row["val/pass@1"], row.get("val/episodes")
    if not n:
        return f"{p:.3f}"
    # the count too: at 0/n or n/n the binomial error is 0 and says nothing about the noise
    return f"{p:.3f} ({round(p * n)}/{n}) ± {(p * (1 - p) / n) ** 0.5:.3f}"


def validation_change(first: dict, last: dict) -> str:
    """One line: how validation Pass@1 moved between two validations of a run, against its noise.

    With the per-level counts that validations record, the change is paired by level and its
    standard error comes from the per-level differences (algorithms.stats); a change beyond two
    standard errors is called significant. Older logs without the counts get the binomial error
    of each side over episodes, and no verdict.
    """
    from spa_rl.algorithms.stats import paired_difference, pass_at_1_se

    a, b = first.get("val/level_counts"), last.get("val/level_counts")
    if not (a and b and len(a) == len(b)):
        return (f"Validation Pass@1 {_with_error(first)} at step {first['step']} -> {_with_error(last)} at step "
                f"{last['step']} ({last.get('val/episodes', '?')} episodes per validation; ± one binomial standard "
                "error).")
    (p0, se0), (p1, se1) = pass_at_1_se(a), pass_at_1_se(b)
    diff, se = paired_difference(a, b)
    z = diff / se if se > 0 else (math.copysign(math.inf, diff) if diff else 0.0)
    verdict = ("a significant rise" if z > 2 else "a significant fall" if z < -2
               else "not significant (within two standard errors)")
    samples = sorted({n for n, _ in b})
    return (f"**Validation Pass@1 {p0:.3f} ± {se0:.3f} at step {first['step']} -> {p1:.3f} ± {se1:.3f} at step "
            f"{last['step']}: {diff:+.3f} ± {se:.3f}, {z:+.1f} standard errors, {verdict}** (the same {len(b)} levels "
            f"x {'/'.join(map(str, samples))} samples at both steps; ± one standard error over levels, the change "
            "paired by level).")


def build_report(run_dirs: list[Path], out: Path) -> Path:
    runs = [collect(Path(r)) for r in run_dirs]
    out.mkdir(parents=True, exist_ok=True)
    passk = sorted({k for run in runs for r in run["series"] for k in r if k.startswith("val/pass@")},
                   key=lambda k: int(k.split("@")[1]))
    plots = []
    for fname, keys, title, ylabel in [
        ("pass_at_1.png", ["val/pass@1"], "validation Pass@1", "Pass@1"),
        ("pass_at_k.png", passk, "validation Pass@k", "Pass@k"),
        ("reward.png", ["rollout/score_mean"], "training score (rewards + penalties)", "mean score"),
        ("response_length.png", ["rollout/response_tokens", "val/response_tokens"], "response tokens per episode",
         "tokens"),
    ]:
        if _plot(runs, keys, title, ylabel, out / fname):
            plots.append((title, fname))
    if _plot_world_model(runs, out / "world_model.png"):
        plots.append(("world-model accuracy", "world_model.png"))

    lines = ["# spa-rl report", "", "Runs: " + ", ".join(f"`{r}`" for r in run_dirs), ""]
    columns = [(run["name"], name, ev) for run in runs for name, ev in run["evals"].items()]
    if columns:
        lines += ["## Evaluations", "", "| metric | " + " | ".join(f"{r}/{n}" for r, n, _ in columns) + " |",
                  "|---|" + "---|" * len(columns)]
        for key in TABLE_KEYS:
            if any(key in ev for _, _, ev in columns):
                cells = [f"{ev[key]:.3f}" if isinstance(ev.get(key), float) else str(ev.get(key, "")) for _, _, ev in columns]
                lines.append(f"| {key} | " + " | ".join(cells) + " |")
        lines.append("")
    for run in runs:
        vals = [r for r in run["series"] if "val/pass@1" in r]
        if len(vals) >= 1:
            first, last = vals[0], vals[-1]
            lines += [f"## Training: {run['name']}", "", validation_change(first, last), ""]
            keys = ["val/pass@1"] + [k for k in passk if k != "val/pass@1"] + [
                f"val/{k}" for k in ("format_ok_rate", "valid_action_rate", "truncated_turn_rate", "response_tokens")]
            keys = [k for k in keys if any(k in r for r in vals)]
            lines += ["| step | " + " | ".join(k[4:] for k in keys) + " |", "|---|" + "---|" * len(keys)]
            lines += [f"| {r['step']} | " + " | ".join(f"{r[k]:.3f}" if isinstance(r.get(k), float) else str(r.get(k, ""))
                                                       for k in keys) + " |" for r in vals]
            lines.append("")
    for title, fname in plots:
        lines += [f"## {title}", "", f"![{title}]({fname})", ""]
    path = out / "report.md"
    from spa_rl.artifacts import atomic_write_text
    atomic_write_text(path, "\n".join(lines))
    return path


def run(args) -> int:
    out = Path(args.out) if args.out else Path(args.runs[0])
    path = build_report([Path(r) for r in args.runs], out)
    print(f"wrote {path}")
    return 0
