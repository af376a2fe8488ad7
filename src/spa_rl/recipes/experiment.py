"""spa experiment: a matrix of arms x seeds over pipeline presets, resumable, summarised in
RESULTS.md with intervals over seeds and learning curves.

    spa experiment study.yaml                 # runs the missing cells, then writes RESULTS.md
    spa experiment study.yaml --report-only   # RESULTS.md from the results already there

The file:

    name: SPA vs RL on FrozenLake 4x4
    env: frozenlake
    env_options: '{is_slippery: false}'   # optional, every stage that plays
    model: default                        # optional, the presets' otherwise
    preset: cpu-small                     # the arms' preset unless an arm names its own
    seeds: [0, 1, 2]
    set: [train.steps=10]                 # overrides for every arm (STAGE.FIELD=VALUE)
    runs: runs/study                      # the pipeline folders (large; not for git)
    results: docs/results/study           # per-run JSON, RESULTS.md, plots (small; for git)
    arms:
      spa:     {preset: my-spa.yaml, description: "world-model SFT, then RL"}
      vanilla: {preset: my-rl.yaml, set: [train.episode.render=grid]}
    conclusion: |                         # optional: what the numbers say, kept as RESULTS.md's
      ...                                 # last section when the file is rewritten
    keep_checkpoints: false               # default: a finished cell's stages keep only `final`

A cell (arm, seed) is one `spa pipeline` run in `runs/ARM/seed-N` with every stage's `seed`
set to N (the validation levels stay fixed). When it finishes, its metrics go to
`results/ARM/seed-N.json`, written atomically; a cell whose JSON exists is skipped, so a
matrix can be completed over several sittings, and an interrupted cell resumes from its
pipeline folder. Cells run seed by seed (every arm's seed 0 first). A cell that starts afresh
reuses the leading stages another arm of its seed already ran with the same resolved config
(hard links, `REUSED_FROM`): SPA and its masked-world-model ablation share the warm-up and the
self-play, so the two arms differ only where their configs do. A path in the file (a preset,
runs, results) is relative to the file; so is a preset's `base:` file.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from spa_rl.algorithms.stats import mean_ci
from spa_rl.errors import ConfigError

@dataclass
class Arm:
    name: str
    preset: str
    overrides: list[str] = field(default_factory=list)
    description: str = ""


@dataclass
class Study:
    name: str
    env: str
    env_options: str | None
    model: str | None
    seeds: list[int]
    arms: list[Arm]
    runs: Path
    results: Path
    source: Path
    conclusion: str = ""
    keep_checkpoints: bool = False


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="the experiment YAML (arms, seeds, presets)")
    p.add_argument("--report-only", action="store_true", help="write RESULTS.md from the results present")


def load_study(path: str | Path) -> Study:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        raise ConfigError(f"{path}: not valid YAML") from None
    known = {"name", "env", "env_options", "model", "preset", "seeds", "set", "runs", "results", "arms", "conclusion",
             "keep_checkpoints"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    base = path.parent

    def rel(p):
        return str(base / p) if p and (p.endswith((".yaml", ".yml")) or "/" in p) and not Path(p).is_absolute() else p

    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"{path}: seeds must be a list of integers, got {seeds!r}")
    shared = list(data.get("set") or [])
    arms_data = data.get("arms")
    if not isinstance(arms_data, dict) or not arms_data:
        raise ConfigError(f"{path}: arms must map each arm's name to its preset and overrides")
    arms = []
    for name, spec in arms_data.items():
        spec = spec or {}
        bad = sorted(set(spec) - {"preset", "set", "description"})
        if bad:
            raise ConfigError(f"{path}: arm {name}: unknown key(s) {', '.join(bad)}")
        preset = spec.get("preset", data.get("preset"))
        if not preset:
            raise ConfigError(f"{path}: arm {name} has no preset (and the file names none)")
        arms.append(Arm(str(name), rel(preset), shared + list(spec.get("set") or []), spec.get("description", "")))
    for key in ("runs", "results"):
        if not data.get(key):
            raise ConfigError(f"{path}: {key} (a folder) is required")
    conclusion = data.get("conclusion") or ""
    if not isinstance(conclusion, str):
        raise ConfigError(f"{path}: conclusion must be text (what the results say, kept in RESULTS.md), "
                          f"got {type(conclusion).__name__}")
    keep_checkpoints = data.get("keep_checkpoints", False)
    if not isinstance(keep_checkpoints, bool):
        raise ConfigError(f"{path}: keep_checkpoints must be true or false, got {keep_checkpoints!r}")
    return Study(name=data.get("name", path.stem), env=data.get("env", "sokoban"), env_options=data.get("env_options"),
                 model=data.get("model"), seeds=seeds, arms=arms, runs=base / data["runs"],
                 results=base / data["results"], source=path, conclusion=conclusion.strip(),
                 keep_checkpoints=keep_checkpoints)


def cell_overrides(study: Study, arm: Arm, seed: int) -> list[str]:
    """The arm's overrides plus the seed of every stage."""
    from spa_rl.recipes.pipeline import STAGES

    return arm.overrides + [f"{stage}.seed={seed}" for stage in STAGES]


def collect_cell(run: Path) -> dict:
    """The small per-run record: final evaluation, the SFT model's world-model evaluation,
    the validation curve and the stage times."""
    from spa_rl.artifacts import read_jsonl
    from spa_rl.recipes.pipeline import STAGES

    record: dict = {"stages": {}}
    for stage in STAGES:  # the stages the cell did not run have no STAGE_DONE
        done = run / stage / "STAGE_DONE"
        if done.is_file():
            record["stages"][stage] = float(done.read_text().split()[0])
    for stage, key in (("eval", "final"), ("eval-sft-wm", "sft_world_model")):
        path = run / stage / "metrics.json"
        if path.is_file():
            record[key] = json.loads(path.read_text())
    log = run / "train" / "metrics.jsonl"
    if log.is_file():
        rows = read_jsonl(log)
        record["curve"] = [{k: r[k] for k in r if k == "step" or k.startswith("val/")} for r in rows
                           if "val/pass@1" in r]
        record["train_success"] = [[r["step"], r["rollout/success"]] for r in rows if "rollout/success" in r]
    return record


def run_study(study: Study, after_cell=None) -> None:
    """Run the cells without results, seed by seed (every arm gets seed 0 before any arm gets
    seed 1, so a study stopped part-way compares the arms on the seeds it has); `after_cell()`
    runs after each finished cell (RESULTS.md is rewritten there)."""
    from spa_rl.artifacts import atomic_write_text
    from spa_rl.recipes import pipeline

    cells = [(arm, seed) for seed in study.seeds for arm in study.arms]
    todo = [(a, s) for a, s in cells if not (study.results / a.name / f"seed-{s}.json").is_file()]
    print(f"[experiment] {study.name}: {len(study.arms)} arms x {len(study.seeds)} seeds = {len(cells)} cells, "
          f"{len(cells) - len(todo)} done already, {len(todo)} to run")
    durations = []
    for k, (arm, seed) in enumerate(todo, 1):
        eta = f"; about {sum(durations) / len(durations) * (len(todo) - k + 1) / 60:.0f} min left" if durations else ""
        print(f"[experiment] cell {k}/{len(todo)}: arm {arm.name}, seed {seed}{eta}", flush=True)
        run = study.runs / arm.name / f"seed-{seed}"
        source, reused = (None, []) if run.exists() else reuse_stages(study, arm, seed, run)
        if reused:
            print(f"[experiment] reusing {', '.join(reused)} of {source}", flush=True)
        t0 = time.perf_counter()
        code = pipeline.run(argparse.Namespace(env=study.env, preset=arm.preset, model=study.model, out=str(run),
                                               set=cell_overrides(study, arm, seed), env_options=study.env_options))
        if code:
            raise SystemExit(code)
        record = {"arm": arm.name, "seed": seed, "preset": arm.preset, "overrides": arm.overrides,
                  "seconds": time.perf_counter() - t0, "reused_stages": reused, **collect_cell(run)}
        atomic_write_text(study.results / arm.name / f"seed-{seed}.json", json.dumps(record, indent=1) + "\n")
        if not study.keep_checkpoints:
            prune_checkpoints(run)
        durations.append(record["seconds"])
        if after_cell is not None:
            after_cell()


def prune_checkpoints(run: Path) -> list[Path]:
    """Delete the intermediate `checkpoint-*` folders of the cell's finished stages (those with
    STAGE_DONE); the one that each stage's `final` points to stays, for later stages and for
    reuse by other arms. A matrix then keeps a few GB per cell instead of tens (a study filled
    a disk with them)."""
    import shutil

    from spa_rl.artifacts import final_model, list_checkpoints

    removed = []
    for done in sorted(run.glob("*/STAGE_DONE")):
        keep = final_model(done.parent).resolve()
        for _, ckpt in list_checkpoints(done.parent):
            if ckpt.resolve() != keep:
                shutil.rmtree(ckpt)
                removed.append(ckpt)
    return removed


def _cell_configs(study: Study, arm: Arm, seed: int, run: Path) -> dict:
    """The cell's resolved stage configs, as plain values with its own folder written `<RUN>`
    (so that two cells' configs compare equal when they differ only in where they live)."""
    from spa_rl.config import config_to_dict
    from spa_rl.recipes import pipeline

    preset = pipeline.load_preset(arm.preset)
    configs = pipeline.stage_configs(preset, study.env, study.model or preset.get("model", "default"), run,
                                     cell_overrides(study, arm, seed), study.env_options, arm.preset)
    return {stage: _relative(config_to_dict(cfg), run) for stage, cfg in configs.items()}


def _relative(values, run: Path):
    if isinstance(values, dict):
        return {k: _relative(v, run) for k, v in values.items() if k not in ("resume", "runtime")}
    if isinstance(values, list):
        return [_relative(v, run) for v in values]
    if isinstance(values, str) and values.startswith(str(run)):
        return "<RUN>" + values[len(str(run)):]
    return values


def _shared_prefix(study: Study, arm: Arm, seed: int, run: Path) -> tuple[Path | None, list[str]]:
    """The other arm's cell of this seed that already ran the longest leading run of this
    cell's stages with the same resolved configs, and those stages. Only a leading run: a
    stage's inputs are the earlier stages' outputs, so a stage is the same only when every
    stage before it is."""
    from spa_rl.recipes import pipeline

    mine = _cell_configs(study, arm, seed, run)
    best: tuple[Path | None, list[str]] = (None, [])
    for other_arm in study.arms:
        other = study.runs / other_arm.name / f"seed-{seed}"
        if other_arm.name == arm.name or not other.is_dir():
            continue
        shared = []
        for stage, values in mine.items():
            saved = other / stage / "stage_config.yaml"
            if not (other / stage / pipeline.DONE).is_file() or not saved.is_file():
                break
            if _relative(yaml.safe_load(saved.read_text()), other) != values:
                break
            shared.append(stage)
        if len(shared) > len(best[1]):
            best = (other, shared)
    return best


def reuse_stages(study: Study, arm: Arm, seed: int, run: Path) -> tuple[Path | None, list[str]]:
    """Before a cell first runs: stages that another arm of the same seed has already run
    with the same resolved config (e.g. SPA and masked-world-model SPA share the warm-up and
    the self-play) are hard-linked into this cell's folder instead of being run again (same
    bytes, no extra disk); `REUSED_FROM` names the cell they came from. Returns that cell's
    folder and the stages' names."""
    import os
    import shutil

    other, stages = _shared_prefix(study, arm, seed, run)
    if other is None:
        return None, []
    run.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        tmp = run / f".{stage}.linking"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(other / stage, tmp, symlinks=True, copy_function=os.link)
        tmp.rename(run / stage)  # a stage folder appears whole or not at all
    (run / "REUSED_FROM").write_text(f"{other}\n")
    return other, stages


# ---- the summary -----------------------------------------------------------------------------


def load_results(study: Study) -> dict[str, list[dict]]:
    out = {}
    for arm in study.arms:
        records = []
        for seed in study.seeds:
            path = study.results / arm.name / f"seed-{seed}.json"
            if path.is_file():
                records.append(json.loads(path.read_text()))
        out[arm.name] = records
    return out


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    mean, half = mean_ci(values)
    return f"{mean:.3f} ± {half:.3f}" if len(values) > 1 else f"{mean:.3f}"


def write_results(study: Study, command: str) -> Path:
    from spa_rl.artifacts import atomic_write_text

    results = load_results(study)
    lines = [f"# {study.name}", "", f"Regenerate: `{command}` (runs the missing cells, then rewrites this file).",
             f"Environment {study.env}" + (f", options `{study.env_options}`" if study.env_options else "") + ".",
             "", "Means over seeds with 95% t-intervals (± half-width). Pass@1: mean success over every validation "
             "episode; Pass@k: unbiased, k = samples per level; world-model accuracy: exact predictions of the next "
             "state in world-model-mode turns (final evaluation, or the SFT model's world-model evaluation when the "
             "final one plays base prompts).", ""]
    header = "| arm | seeds | levels x samples | Pass@1 | Pass@k | world-model accuracy | validation Pass@1 (first -> last) |"
    lines += [header, "|" + "---|" * 7]
    for arm in study.arms:
        recs = [r for r in results[arm.name] if "final" in r]
        if not recs:
            lines.append(f"| {arm.name} | 0 | - | - | - | - | - |")
            continue
        final = [r["final"] for r in recs]
        samples = max(int(key.split("@")[1]) for key in final[0] if key.startswith("pass@"))
        p1 = [f["pass@1"] for f in final]
        pk = [f[f"pass@{samples}"] for f in final]
        wm = [r["final"].get("prediction_exact", r.get("sft_world_model", {}).get("prediction_exact")) for r in recs]
        wm = [w for w in wm if w is not None]
        first = [r["curve"][0]["val/pass@1"] for r in recs if r.get("curve")]
        last = [r["curve"][-1]["val/pass@1"] for r in recs if r.get("curve")]
        curve = f"{_fmt(first)} -> {_fmt(last)}" if first else "-"
        lines.append(f"| {arm.name} | {len(recs)} | {final[0]['levels']} x {samples} | {_fmt(p1)} | "
                     f"{_fmt(pk)} (k={samples}) | {_fmt(wm)} | {curve} |")
    lines += ["", "Per seed (final Pass@1):", ""]
    for arm in study.arms:
        per = ", ".join(f"seed {r['seed']}: {r['final']['pass@1']:.3f}" for r in results[arm.name] if "final" in r)
        desc = f" ({arm.description})" if arm.description else ""
        lines.append(f"- **{arm.name}**{desc}: {per or 'no finished run'}; preset `{arm.preset}`"
                     + (f", overrides `{' '.join(arm.overrides)}`" if arm.overrides else ""))
    if _plot_curves(study, results, study.results / "curves.png"):
        lines += ["", "![validation Pass@1 over PPO steps, mean over seeds with min-max band](curves.png)"]
    if study.conclusion:  # the authors' reading of the numbers, from the experiment file
        lines += ["", "## Conclusion", "", study.conclusion]
    path = study.results / "RESULTS.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _plot_curves(study: Study, results: dict, path: Path) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    drawn = False
    for arm in study.arms:
        curves = [{c["step"]: c["val/pass@1"] for c in r["curve"]} for r in results[arm.name] if r.get("curve")]
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        if not steps:
            continue
        values = [[c[s] for c in curves] for s in steps]
        mean = [sum(v) / len(v) for v in values]
        line, = ax.plot(steps, mean, marker="o", markersize=3, label=f"{arm.name} (n={len(curves)})")
        ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], alpha=0.2,
                        color=line.get_color())
        drawn = True
    if drawn:
        ax.set_xlabel("PPO step")
        ax.set_ylabel("validation Pass@1")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def run(args) -> int:
    study = load_study(args.file)
    from spa_rl.recipes import pipeline

    for arm in study.arms:  # every arm's configs resolve before any cell runs
        preset = pipeline.load_preset(arm.preset)
        pipeline.stage_configs(preset, study.env, study.model or preset.get("model", "default"),
                               study.runs / arm.name / "check", cell_overrides(study, arm, study.seeds[0]),
                               study.env_options, arm.preset)
    command = f"spa experiment {args.file}"
    if not args.report_only:
        run_study(study, after_cell=lambda: write_results(study, command))
    path = write_results(study, command)
    print(f"[experiment] wrote {path}")
    return 0
