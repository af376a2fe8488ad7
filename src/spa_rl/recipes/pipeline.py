"""spa pipeline: the whole SPA recipe in one command, resumable.

    spa pipeline --env sokoban --preset cpu-small --out runs/pipeline       # self-play after a warm-up, on a CPU
    spa pipeline --env sokoban --preset paper --model Qwen/Qwen2.5-1.5B-Instruct --out runs/paper

Stages, each in its own sub-folder of --out, in order:
  warmup-generate/  optional, only when a preset lists it: format warm-up data, e.g. random-policy
                    episodes whose observation/prediction hold the simulator's true states
  warmup-sft/       optional: SFT of the base model on it, so that a small model writes the
                    world-model format before its own self-play (SmolLM2-135M never does zero-shot)
  generate/      self-play world-model data (`spa generate`), from the warmed model when
                 warmup-sft runs
  sft/           world-model SFT on it (`spa sft`), from the same starting model
  eval-sft-wm/   the SFT model in world-model mode: how well it predicts states
  train/         PPO from the last SFT checkpoint (`spa train`, validating on the way)
  eval/          the final policy on the validation levels (`spa eval`)
and then report.md with plots (`spa report`).

A stage whose folder holds a `STAGE_DONE` file is skipped. A stage that was interrupted runs
again: SFT and PPO resume from their last checkpoint, generation and evaluation start over
(they write their outputs atomically at the end).

Presets are YAML files (spa_rl/configs/ or your own). Top-level keys:
  base: another preset (a name or a file) whose values this one overrides, section by section;
  model: the starting model (the warm-up, generate, sft, and train or eval when no earlier
      stage runs);
  stages: the stages to run, in order (default: the five from generate on, no warm-up); e.g.
      [train, eval] is RL from the base model, [eval] evaluates it; each stage loads the final
      model of the last earlier stage that trains (warmup-sft, sft, train), or `model`;
  env / episode / sampling / ...: a shared config section, applied to every stage that has it
      (the warm-up stages included), so that a value is set once (e.g. `sampling: {max_new_tokens: 288}`);
  warmup-generate / warmup-sft / generate / sft / eval-sft-wm / train / eval: one stage's values,
      over the shared ones (the warm-up sections are generate and sft configs).
The final evaluation plays the episode settings of the training stage (render, prompt mode,
turns) unless its own section says otherwise. `--set STAGE.FIELD=VALUE` overrides one field
(`--set train.sampling.temperature=0.7`).
"""

from __future__ import annotations

import argparse
import importlib
import time
from importlib import resources
from pathlib import Path

import yaml

from spa_rl.artifacts import atomic_write_text
from spa_rl.config import load_config, save_config
from spa_rl.envs import ENV_NAMES
from spa_rl.errors import ConfigError

STAGES = ("warmup-generate", "warmup-sft", "generate", "sft", "eval-sft-wm", "train", "eval")
# The warm-up runs only where a preset lists it: a model that already writes the world-model
# format (the paper's models) needs none, and a default warm-up would change what every other
# preset runs.
DEFAULT_STAGES = STAGES[2:]
RECIPES = {"warmup-generate": "spa_rl.recipes.generate", "warmup-sft": "spa_rl.recipes.sft",
           "generate": "spa_rl.recipes.generate", "sft": "spa_rl.recipes.sft", "eval-sft-wm": "spa_rl.recipes.eval",
           "train": "spa_rl.recipes.train", "eval": "spa_rl.recipes.eval"}
DONE = "STAGE_DONE"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--env", default="sokoban", choices=ENV_NAMES, help="game (default: sokoban)")
    p.add_argument("--preset", default="cpu-small",
                   help="cpu-small (embedded model, this laptop: self-play after a format warm-up), cpu-small-solver "
                        "(the same with the solver's play), paper (SPEC's numbers, GPU), or a YAML file")
    p.add_argument("--model", default=None, help="model to start from (default: the preset's)")
    p.add_argument("--env-options", default=None,
                   help="game options as YAML for every stage that plays, e.g. '{is_slippery: false}'")
    p.add_argument("--out", default="runs/pipeline", help="output folder (default: runs/pipeline)")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.FIELD=VALUE",
                   help="override one field of one stage, e.g. --set train.steps=20 (repeatable)")


def load_preset(name: str, _depth: int = 0) -> dict:
    if name.endswith((".yaml", ".yml")) or Path(name).is_file():
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"preset file {path} does not exist")
        text = path.read_text()
    else:
        try:
            text = resources.files("spa_rl.configs").joinpath(f"{name}.yaml").read_text()
        except FileNotFoundError:
            raise ConfigError(f"unknown preset {name!r}: use cpu-small, paper or a YAML file") from None
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"preset {name}: expected a mapping of sections")
    base = data.pop("base", None)
    if base is not None:  # `base: paper`: this preset's values over another's
        base = str(base)
        if base.endswith((".yaml", ".yml")) and not Path(base).is_absolute() and name.endswith((".yaml", ".yml")):
            base = str(Path(name).parent / base)  # a file beside the preset that names it
        if _depth >= 8:
            raise ConfigError(f"preset {name}: base presets nest too deep (a cycle?)")
        data = _deep_merge(load_preset(base, _depth + 1), data)
    return data


def _deep_merge(below: dict, above: dict) -> dict:
    out = dict(below)
    for k, v in above.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _config_class(stage: str):
    return importlib.import_module(RECIPES[stage]).Config


def _shared_sections(preset: dict, name: str) -> dict:
    """The preset's shared sections, checked: each must be a section of at least one stage."""
    import dataclasses

    shared = {k.replace("-", "_"): v for k, v in preset.items() if k not in STAGES and k not in ("model", "stages")}
    for key in shared:
        if not any(key in {f.name for f in dataclasses.fields(_config_class(s))} for s in STAGES):
            raise ConfigError(f"preset {name}: unknown section {key!r}; sections are model, the stages "
                              f"({', '.join(STAGES)}) and the shared config sections (env, episode, sampling, ...)")
    return shared


def selected_stages(preset: dict, name: str = "preset") -> tuple[str, ...]:
    stages = preset.get("stages", list(DEFAULT_STAGES))
    if not isinstance(stages, list) or not stages or any(s not in STAGES for s in stages):
        raise ConfigError(f"preset {name}: stages must be a list of {', '.join(STAGES)}, got {stages!r}")
    if "sft" in stages and "generate" not in stages:
        raise ConfigError(f"preset {name}: stage sft needs generate (its data)")
    if "warmup-sft" in stages and "warmup-generate" not in stages:
        raise ConfigError(f"preset {name}: stage warmup-sft needs warmup-generate (its data)")
    return tuple(s for s in STAGES if s in stages)


def stage_configs(preset: dict, env: str, model: str, out: Path, overrides: list[str],
                  env_options: str | None = None, preset_name: str = "preset") -> dict:
    """The resolved config of every selected stage, with the links between stages filled in."""
    import dataclasses

    from spa_rl.artifacts import final_model
    from spa_rl.config import flatten_values

    shared = _shared_sections(preset, preset_name)
    stages = selected_stages(preset, preset_name)
    per_stage: dict[str, dict] = {}
    for stage in STAGES:
        cls = _config_class(stage)
        names = {f.name for f in dataclasses.fields(cls)}
        where = f"preset {preset_name}, stage {stage}: "
        values = flatten_values(cls, {k: v for k, v in shared.items() if k in names}, where)
        own = flatten_values(cls, dict(preset.get(stage) or {}), where)
        if stage == "eval":
            eval_own_episode = {k for k in own if k.startswith("episode.")}
        values.update(own)
        per_stage[stage] = values
    if env_options is not None:  # the same game for every stage that plays (SFT only reads data)
        for stage in ("warmup-generate", "generate", "eval-sft-wm", "train", "eval"):
            per_stage[stage]["env.options"] = env_options
    for item in overrides:  # --set wins over everything else
        key, sep, value = item.partition("=")
        stage, dot, field = key.partition(".")
        if not sep or not dot or stage not in STAGES:
            raise ConfigError(f"--set {item!r}: expected STAGE.FIELD=VALUE with STAGE one of {', '.join(STAGES)}")
        if stage not in stages:
            continue  # a shared override (e.g. a seed for every stage) for a stage this preset skips
        values = flatten_values(_config_class(stage), {field: yaml.safe_load(value)}, f"--set {item}: ")
        per_stage[stage].update(values)
        if stage == "eval":
            eval_own_episode |= {k for k in values if k.startswith("episode.")}
    # The final evaluation plays what training played (mode, render, turns, ...), overrides of
    # train's episode included, unless the preset or a --set gives eval its own.
    per_stage["eval"].update({k: v for k, v in per_stage["train"].items()
                              if k.startswith("episode.") and k not in eval_own_episode})
    # each stage starts from the final model of the last earlier stage that trains, or `model`
    after_warmup = str(final_model(out / "warmup-sft")) if "warmup-sft" in stages else model
    after_sft = str(final_model(out / "sft")) if "sft" in stages else after_warmup
    after_train = str(final_model(out / "train")) if "train" in stages else after_sft
    links = {
        "warmup-generate": {"env.name": env, "model.name": model, "out": str(out / "warmup-generate")},
        "warmup-sft": {"data": str(out / "warmup-generate"), "model.name": model, "out": str(out / "warmup-sft")},
        "generate": {"env.name": env, "model.name": after_warmup, "out": str(out / "generate")},
        "sft": {"data": str(out / "generate"), "model.name": after_warmup, "out": str(out / "sft")},
        "eval-sft-wm": {"env.name": env, "model.name": after_sft, "episode.mode": "world-model",
                        "out": str(out / "eval-sft-wm")},
        "train": {"env.name": env, "model.name": after_sft, "out": str(out / "train")},
        "eval": {"env.name": env, "model.name": after_train, "out": str(out / "eval")},
    }
    configs = {}
    for stage in stages:
        try:
            configs[stage] = load_config(_config_class(stage), {**per_stage[stage], **links[stage]})
        except ConfigError as exc:
            raise ConfigError(f"stage {stage}: {exc}") from None
    return configs


def release_memory() -> None:
    """Hand the freed memory of a finished stage back to the system before the next one starts.
    Stages run in this one process, and glibc keeps freed small blocks (most weight and optimizer
    tensors of a 135M model are a few MB) in its heap. This lowers what a stage leaves behind; it
    did not lower the demo's measured peak (docs/ppo.md)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def run(args) -> int:
    out = Path(args.out)
    preset = load_preset(args.preset)
    model = args.model or preset.get("model", "default")
    configs = stage_configs(preset, args.env, model, out, args.set, args.env_options,
                           args.preset)  # all errors before any work
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "pipeline.yaml", yaml.safe_dump(
        {"env": args.env, "preset": args.preset, "model": model, "env_options": args.env_options,
         "stages": list(configs), "overrides": args.set}, sort_keys=False))
    for stage in configs:
        folder = out / stage
        if (folder / DONE).exists():
            print(f"[pipeline] {stage}: complete, skipped")
            continue
        cfg = configs[stage]
        if hasattr(cfg, "resume") and folder.exists():
            cfg.resume = True
            print(f"[pipeline] {stage}: resuming")
        print(f"[pipeline] {stage}: running")
        t0 = time.perf_counter()
        code = importlib.import_module(RECIPES[stage]).main(cfg)
        if code:
            print(f"[pipeline] {stage} failed with code {code}")
            return code
        save_config(cfg, folder, "stage_config.yaml")
        atomic_write_text(folder / DONE, f"{time.perf_counter() - t0:.1f} seconds\n")
        print(f"[pipeline] {stage}: done in {time.perf_counter() - t0:.0f}s")
        release_memory()
    from spa_rl.recipes.report import build_report
    print(f"[pipeline] wrote {build_report([out], out)}")
    return 0
