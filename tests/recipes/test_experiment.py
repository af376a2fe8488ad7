"""spa experiment on the tiny model: a 2 x 2 matrix runs end to end, finished cells are
skipped, RESULTS.md carries the per-run numbers with intervals, and bad files fail by name."""

import json
import subprocess
import sys

import pytest

PRESET = """
model: tiny
episode: {max_turns: 1}
sampling: {max_new_tokens: 8}
generate: {policy: solver, episodes: 4, group_size: 1, val_fraction: 0.25}
sft: {epochs: 1, batch: 4, micro_batch: 4, model: {dtype: fp32}}
eval-sft-wm: {eval: {levels: 1, samples: 2}}
train: {steps: 1, groups: 2, group_size: 2, keep_ratio: 1.0, model: {dtype: fp32}, eval: {levels: 2, samples: 2}}
eval: {eval: {levels: 2, samples: 2}}
"""

STUDY = """
name: tiny study
env: frozenlake
env_options: '{is_slippery: false}'
seeds: [0, 1]
runs: runs
results: results
arms:
  sft-then-rl: {preset: tiny.yaml, description: all five stages}
  rl-only:
    preset: rl.yaml
conclusion: |
  Two seeds of a tiny model: nothing to conclude.
"""


def spa(*args):
    return subprocess.run([sys.executable, "-m", "spa_rl.cli", *args], capture_output=True, text=True)


def test_experiment_matrix_runs_skips_and_reports(tmp_path):
    (tmp_path / "tiny.yaml").write_text(PRESET)
    (tmp_path / "rl.yaml").write_text(PRESET + "stages: [train, eval]\n")
    (tmp_path / "study.yaml").write_text(STUDY)
    res = spa("experiment", str(tmp_path / "study.yaml"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "cell 4/4: arm rl-only, seed 1" in res.stdout
    for arm in ("sft-then-rl", "rl-only"):
        for seed in (0, 1):
            record = json.loads((tmp_path / "results" / arm / f"seed-{seed}.json").read_text())
            assert record["seed"] == seed and "pass@1" in record["final"] and record["curve"]
    rl = json.loads((tmp_path / "results" / "rl-only" / "seed-0.json").read_text())
    assert set(rl["stages"]) == {"train", "eval"}  # no data, no SFT
    assert not (tmp_path / "runs" / "rl-only" / "seed-0" / "sft").exists()
    # finished cells keep each stage's final model, not its intermediate checkpoints
    assert (tmp_path / "runs" / "sft-then-rl" / "seed-0" / "sft" / "final" / "COMPLETE").is_file()
    for stage in tmp_path.glob("runs/*/seed-*/*/"):
        assert [c.name for c in stage.glob("checkpoint-*")] in ([], [(stage / "final").resolve().name])
    # the seed reaches the stages: two seeds of one arm sample differently
    a = (tmp_path / "runs" / "sft-then-rl" / "seed-0" / "train" / "config.yaml").read_text()
    assert "seed: 0" in a and "seed: 1" in (tmp_path / "runs" / "sft-then-rl" / "seed-1" / "train" /
                                             "config.yaml").read_text()

    text = (tmp_path / "results" / "RESULTS.md").read_text()
    from spa_rl.algorithms.stats import mean_ci
    p1 = [json.loads((tmp_path / "results" / "rl-only" / f"seed-{s}.json").read_text())["final"]["pass@1"]
          for s in (0, 1)]
    mean, half = mean_ci(p1)
    assert f"| rl-only | 2 | 2 x 2 | {mean:.3f} ± {half:.3f} |" in text
    assert text.rstrip().endswith("## Conclusion\n\nTwo seeds of a tiny model: nothing to conclude.")
    assert "spa experiment" in text and (tmp_path / "results" / "curves.png").stat().st_size > 1000

    res = spa("experiment", str(tmp_path / "study.yaml"))  # everything is there: nothing runs
    assert res.returncode == 0 and "4 done already, 0 to run" in res.stdout


def test_collect_cell_times_every_stage_that_ran(tmp_path):
    from spa_rl.recipes.experiment import collect_cell

    for stage, seconds in (("warmup-generate", 1.5), ("warmup-sft", 60.0), ("generate", 2.0)):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "STAGE_DONE").write_text(f"{seconds} seconds\n")
    (tmp_path / "sft").mkdir()  # an interrupted stage: no STAGE_DONE, no time
    assert collect_cell(tmp_path)["stages"] == {"warmup-generate": 1.5, "warmup-sft": 60.0, "generate": 2.0}


def test_prune_checkpoints_only_in_finished_stages(tmp_path):
    from spa_rl.recipes.experiment import prune_checkpoints

    for stage, done in (("sft", True), ("train", False)):
        for folder in ("checkpoint-epoch-1", "checkpoint-epoch-2"):
            (tmp_path / stage / folder).mkdir(parents=True)
            (tmp_path / stage / folder / "model.safetensors").write_text("x")
            (tmp_path / stage / folder / "COMPLETE").write_text("")
        (tmp_path / stage / "final").symlink_to("checkpoint-epoch-2")
        if done:
            (tmp_path / stage / "STAGE_DONE").write_text("1.0 seconds\n")
    assert prune_checkpoints(tmp_path) == [tmp_path / "sft" / "checkpoint-epoch-1"]
    assert (tmp_path / "sft" / "final" / "model.safetensors").is_file()  # final's checkpoint stays
    assert (tmp_path / "train" / "checkpoint-epoch-1").is_dir()  # an unfinished stage resumes from it


@pytest.mark.parametrize("text, needle", [("arms: {a: {preset: x.yaml, sett: []}}\nruns: r\nresults: s\n", "sett"),
                                          ("seeds: one\narms: {a: {}}\nruns: r\nresults: s\n", "seeds"),
                                          ("arms: {a: {preset: cpu-small}}\n", "runs"),
                                          ("arms: {a: {preset: cpu-small}}\nruns: r\nresults: s\nconclusion: [1]\n",
                                           "conclusion"),
                                          ("arms: {a: {preset: cpu-small}}\nruns: r\nresults: s\nkeep_checkpoints: no please\n",
                                           "keep_checkpoints")])
def test_bad_files_fail_by_name(tmp_path, text, needle):
    (tmp_path / "s.yaml").write_text(text)
    res = spa("experiment", str(tmp_path / "s.yaml"))
    assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr


def test_cells_reuse_the_stages_another_arm_ran_with_the_same_config(tmp_path):
    """Arms that differ only from some stage on share the stages before it (hard links, not
    copies), and run the rest themselves."""
    import os

    (tmp_path / "tiny.yaml").write_text(PRESET)
    (tmp_path / "study.yaml").write_text("""
env: frozenlake
env_options: '{is_slippery: false}'
seeds: [0]
runs: runs
results: results
preset: tiny.yaml
arms:
  base: {}
  more-eval-samples: {set: [eval.eval.samples=4]}
  longer-sft: {set: [sft.epochs=2]}
""")
    res = spa("experiment", str(tmp_path / "study.yaml"))
    assert res.returncode == 0, res.stderr[-3000:]
    runs = tmp_path / "runs"
    record = json.loads((tmp_path / "results" / "more-eval-samples" / "seed-0.json").read_text())
    assert record["reused_stages"] == ["generate", "sft", "eval-sft-wm", "train"]
    assert (runs / "more-eval-samples" / "seed-0" / "REUSED_FROM").read_text().strip() == str(runs / "base" / "seed-0")
    a = runs / "base" / "seed-0" / "train" / "final" / "model.safetensors"
    b = runs / "more-eval-samples" / "seed-0" / "train" / "final" / "model.safetensors"
    assert os.stat(a).st_ino == os.stat(b).st_ino  # the same file, linked
    assert record["final"]["episodes"] == 2 * 4  # its own evaluation ran, with its own samples
    longer = json.loads((tmp_path / "results" / "longer-sft" / "seed-0.json").read_text())
    assert longer["reused_stages"] == ["generate"]  # sft differs, so everything after it is its own
    sft_a = (runs / "base" / "seed-0" / "sft" / "final" / "model.safetensors").read_bytes()
    sft_c = (runs / "longer-sft" / "seed-0" / "sft" / "final" / "model.safetensors").read_bytes()
    assert sft_a != sft_c
