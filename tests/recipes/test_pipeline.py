"""spa pipeline with the tiny model: every stage runs, a finished stage is skipped, an
interrupted one resumes, bad presets fail before any work, and the report has its plots."""

import subprocess
import sys

import pytest

TINY = """
model: tiny
episode: {max_turns: 1}
sampling: {max_new_tokens: 8}
generate: {policy: solver, episodes: 4, group_size: 1, episode: {max_turns: 2}, val_fraction: 0.25}
sft: {epochs: 1, batch: 4, micro_batch: 4, model: {dtype: fp32}}
eval-sft-wm: {eval: {levels: 1, samples: 2}}
train: {steps: 2, groups: 2, group_size: 2, keep_ratio: 1.0, model: {dtype: fp32}, save_every: 1,
        eval: {levels: 1, samples: 2}}
eval: {eval: {levels: 1, samples: 2}}
"""


def spa(*args):
    return subprocess.run([sys.executable, "-m", "spa_rl.cli", *args], capture_output=True, text=True)


def test_pipeline_runs_skips_and_resumes(tmp_path):
    preset = tmp_path / "tiny.yaml"
    preset.write_text(TINY)
    out = tmp_path / "run"
    res = spa("pipeline", "--env", "sokoban", "--preset", str(preset), "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    for stage in ("generate", "sft", "eval-sft-wm", "train", "eval"):
        assert (out / stage / "STAGE_DONE").is_file()
    report = (out / "report.md").read_text()
    assert "pass_at_1.png" in report and (out / "pass_at_1.png").stat().st_size > 1000
    # the validation table carries the logged numbers: step 0 and the last step
    import json
    vals = [r for r in map(json.loads, (out / "train" / "metrics.jsonl").read_text().splitlines()) if "val/pass@1" in r]
    assert [r["step"] for r in vals] == [0, 2]
    for r in vals:
        assert f"| {r['step']} | {r['val/pass@1']:.3f} |" in report
    assert f"**Validation Pass@1 {vals[0]['val/pass@1']:.3f} ± " in report and "standard errors" in report

    res = spa("pipeline", "--env", "sokoban", "--preset", str(preset), "--out", str(out))
    assert res.stdout.count("complete, skipped") == 5

    # an interrupted training stage (no STAGE_DONE, a checkpoint at step 1) resumes
    (out / "train" / "STAGE_DONE").unlink()
    (out / "eval" / "STAGE_DONE").unlink()
    res = spa("pipeline", "--env", "sokoban", "--preset", str(preset), "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "train: resuming" in res.stdout and "resuming" in res.stdout


@pytest.mark.parametrize("text, needle", [("sftt: {epochs: 1}\n", "sftt"), ("sft: {epochz: 1}\n", "epochz"),
                                          ("train: {sampling: {temprature: 1}}\n", "did you mean sampling.temperature")])
def test_bad_preset_fails_by_name(tmp_path, text, needle):
    preset = tmp_path / "p.yaml"
    preset.write_text(text)
    res = spa("pipeline", "--preset", str(preset), "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()


def _shipped_presets():
    from importlib import resources

    return sorted(f.name[:-5] for f in resources.files("spa_rl.configs").iterdir() if f.name.endswith(".yaml"))


@pytest.mark.parametrize("preset", _shipped_presets())
def test_every_shipped_preset_resolves(tmp_path, preset):
    from spa_rl.recipes.pipeline import load_preset, stage_configs

    data = load_preset(preset)
    configs = stage_configs(data, "sokoban", data.get("model", "default"), tmp_path, [])
    assert "eval" in configs or preset == "demo"  # the demo's final measure is training's last validation
    if "train" in configs and "eval" in configs:  # the final evaluation plays what training played
        assert configs["eval"].episode == configs["train"].episode
        assert configs["eval"].model.name == str(tmp_path / "train" / "final")


def test_demo_ends_with_the_validation_change(tmp_path):
    # the demo preset shrunk to the tiny model: the same stages, the verdict line at the end
    preset = tmp_path / "tiny-demo.yaml"
    preset.write_text("""
base: demo
model: tiny
sampling: {max_new_tokens: 8}
generate: {episodes: 4, val_fraction: 0.25}
sft: {epochs: 1, batch: 4, micro_batch: 4, model: {dtype: fp32}}
train: {steps: 1, groups: 2, group_size: 2, keep_ratio: 1.0, mini_batch: 0, model: {dtype: fp32}, save_every: 1,
        eval: {levels: 2, samples: 2}}
""")
    res = spa("demo", "--preset", str(preset), "--out", str(tmp_path / "demo"))
    assert res.returncode == 0, res.stderr[-2000:]
    for stage in ("generate", "sft", "train"):
        assert (tmp_path / "demo" / stage / "STAGE_DONE").is_file()
    import yaml
    train = yaml.safe_load((tmp_path / "demo" / "train" / "config.yaml").read_text())
    assert train["env"]["name"] == "frozenlake" and train["env"]["options"] == "{is_slippery: false, layout: corners}"
    assert train["progress_reward"] == 0.5
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith("[demo] Validation Pass@1 ") and "at step 0 -> " in last and "at step 1:" in last
    assert "the same 2 levels x 2 samples" in last
    assert last.replace("[demo] ", "") in (tmp_path / "demo" / "report.md").read_text().replace("**", "")


@pytest.mark.parametrize("preset", ["cpu-small-solver", "paper"])
def test_full_presets_link_their_stages(tmp_path, preset):
    from spa_rl.recipes.pipeline import DEFAULT_STAGES, load_preset, stage_configs

    configs = stage_configs(load_preset(preset), "sokoban", "default", tmp_path, [])
    assert tuple(configs) == DEFAULT_STAGES  # no warm-up unless a preset lists it
    assert configs["sft"].model.name == "default"
    assert configs["train"].model.name == str(tmp_path / "sft" / "final")
    assert configs["eval"].model.name == str(tmp_path / "train" / "final")
    assert configs["eval-sft-wm"].episode.mode == "world-model"
    # the final evaluation plays what training played
    assert configs["eval"].episode == configs["train"].episode


def test_train_episode_overrides_reach_the_final_evaluation(tmp_path):
    """--set train.episode.render=grid changes what the final evaluation plays too (a baseline
    arm set this way was evaluated with coordinates before); eval's own setting still wins."""
    from spa_rl.recipes.pipeline import load_preset, stage_configs

    configs = stage_configs(load_preset("cpu-small"), "sokoban", "default", tmp_path,
                            ["train.episode.render=grid", "train.episode.mode=base"])
    assert configs["eval"].episode.render == "grid" and configs["eval"].episode.mode == "base"
    configs = stage_configs(load_preset("cpu-small"), "sokoban", "default", tmp_path,
                            ["train.episode.render=grid", "eval.episode.render=grid+coords"])
    assert configs["train"].episode.render == "grid" and configs["eval"].episode.render == "grid+coords"


def test_a_preset_file_bases_on_a_file_beside_it(tmp_path, monkeypatch):
    from spa_rl.recipes.pipeline import load_preset

    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "common.yaml").write_text("base: cpu-small\ntrain: {steps: 7}\n")
    (folder / "arm.yaml").write_text("base: common.yaml\ntrain: {groups: 2}\n")
    monkeypatch.chdir(tmp_path)  # not the presets' folder
    data = load_preset(str(folder / "arm.yaml"))
    assert data["train"]["steps"] == 7 and data["train"]["groups"] == 2 and data["sft"]["epochs"] == 2


def test_warmup_stages_feed_self_play(tmp_path):
    """cpu-small (the default preset): the warm-up SFT trains the base model on the warm-up data,
    and self-play and SFT start from its final model; the shared sections reach the warm-up too."""
    from spa_rl.recipes.pipeline import STAGES, load_preset, stage_configs

    configs = stage_configs(load_preset("cpu-small"), "sokoban", "base", tmp_path,
                            ["warmup-sft.seed=3"], env_options="{}")
    assert tuple(configs) == STAGES
    warm_gen, warm_sft = configs["warmup-generate"], configs["warmup-sft"]
    assert (warm_gen.policy, warm_gen.episodes, warm_gen.group_size, warm_gen.episode.max_turns) == ("random", 64, 1, 3)
    assert warm_gen.out == str(tmp_path / "warmup-generate") and warm_gen.env.options == "{}"
    assert warm_gen.sampling.max_new_tokens == configs["generate"].sampling.max_new_tokens == 288
    assert warm_sft.data == warm_gen.out and warm_sft.model.name == "base" and warm_sft.seed == 3
    assert (warm_sft.epochs, warm_sft.batch, warm_sft.micro_batch, warm_sft.optim.lr,
            warm_sft.gradient_checkpointing) == (1, 8, 4, 1e-4, True)
    warmed = str(tmp_path / "warmup-sft" / "final")
    assert configs["generate"].policy == "self"
    assert configs["generate"].model.name == configs["sft"].model.name == warmed
    assert configs["sft"].data == str(tmp_path / "generate")
    assert configs["train"].model.name == str(tmp_path / "sft" / "final")


def test_warmup_sft_needs_its_data(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("stages: [warmup-sft, generate, sft]\n")
    res = spa("pipeline", "--preset", str(preset), "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "stage warmup-sft needs warmup-generate" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "o").exists()


def test_shared_sections_are_set_once(tmp_path):
    from spa_rl.recipes.pipeline import stage_configs

    preset = {"sampling": {"max_new_tokens": 99}, "episode": {"max_turns": 2}, "train": {"episode": {"max_turns": 3}}}
    configs = stage_configs(preset, "sokoban", "tiny", tmp_path, ["eval.sampling.temperature=0.5"])
    assert list(configs) == ["generate", "sft", "eval-sft-wm", "train", "eval"]  # no warm-up by default
    assert {s: c.sampling.max_new_tokens for s, c in configs.items() if hasattr(c, "sampling")} == \
        {"generate": 99, "eval-sft-wm": 99, "train": 99, "eval": 99}
    assert (configs["generate"].episode.max_turns, configs["train"].episode.max_turns) == (2, 3)
    assert configs["eval"].episode.max_turns == 3  # follows training
    assert configs["eval"].sampling.temperature == 0.5 and configs["train"].sampling.temperature == 1.0


def test_env_options_reach_every_stage_that_plays(tmp_path):
    from spa_rl.recipes.pipeline import load_preset, stage_configs

    configs = stage_configs(load_preset("cpu-small"), "frozenlake", "default", tmp_path,
                            ["eval.env.options={is_slippery: true}"], env_options="{is_slippery: false}")
    for stage in ("generate", "eval-sft-wm", "train"):
        assert configs[stage].env.options == "{is_slippery: false}"
    assert configs["eval"].env.options == "{is_slippery: true}"  # --set wins over --env-options


def test_ablation_presets_differ_from_spa_only_where_they_say(tmp_path):
    from spa_rl.recipes.pipeline import load_preset, stage_configs

    def resolved(name):
        return stage_configs(load_preset(name), "sokoban", "m", tmp_path, [])

    spa = resolved("paper")
    assert resolved("paper-spa-masked")["sft"].mask_world_model and not spa["sft"].mask_world_model
    assert resolved("paper-spa-random-policy")["generate"].policy == "random"
    vanilla = resolved("paper-vanilla-rl")
    assert list(vanilla) == ["train", "eval"] and vanilla["train"].model.name == "m"
    assert vanilla["eval"].episode.render == "grid" and spa["eval"].episode.render == "grid+coords"
    assert resolved("paper-vagen")["train"].world_model_reward > 0
