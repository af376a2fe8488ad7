"""spa eval end to end: the real default model through the real CLI, and metrics that agree with
the transcripts they summarise."""

import json
import subprocess
import sys

import pytest
import yaml

from spa_rl.config import load_config
from spa_rl.recipes import eval as eval_recipe


def check_outputs(out, levels, samples):
    metrics = json.loads((out / "metrics.json").read_text())
    rows = [json.loads(x) for x in (out / "trajectories.jsonl").read_text().splitlines()]
    assert len(rows) == metrics["episodes"] == levels * samples
    # metrics agree with the transcripts
    successes = [bool(r["success"]) for r in rows]
    assert metrics["pass@1"] == pytest.approx(sum(successes) / len(rows))
    assert metrics["success"] == pytest.approx(metrics["pass@1"])
    by_level = {}
    for r in rows:
        by_level.setdefault(r["level_seed"], []).append(r["success"])
    assert len(by_level) == levels
    assert metrics[f"pass@{samples}"] == pytest.approx(sum(any(v) for v in by_level.values()) / levels)
    # per-level counts in level order (the transcripts' level seeds ascend with the level index)
    ordered = [by_level[seed] for seed in dict.fromkeys(r["level_seed"] for r in rows)]
    assert metrics["level_counts"] == [[len(v), sum(map(bool, v))] for v in ordered]
    rates = [sum(map(bool, v)) / len(v) for v in ordered]
    spread = sum((x - metrics["pass@1"]) ** 2 for x in rates) / (levels - 1) if levels > 1 else 0.0
    assert metrics["pass_at_1_stderr"] == pytest.approx((spread / levels) ** 0.5)
    assert metrics["num_actions"] == pytest.approx(sum(r["num_actions"] for r in rows) / len(rows))
    assert metrics["response_tokens"] == pytest.approx(sum(r["response_tokens"] for r in rows) / len(rows))
    cut = [sum(f == "length" for f in r["finish_reasons"]) / max(1, len(r["finish_reasons"])) for r in rows]
    assert metrics["truncated_turn_rate"] == pytest.approx(sum(cut) / len(rows))
    for r in rows:
        assert [m["role"] for m in r["messages"]][:2] == ["system", "user"]
        assert len(r["states"]) == len(r["turns"]) + 1  # true states s_0..s_T
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["eval"]["levels"] == levels and config["eval"]["samples"] == samples
    return metrics, rows


@pytest.mark.slow
def test_spa_eval_with_the_default_model(tmp_path, default_model_dir):
    out = tmp_path / "eval"
    res = subprocess.run([sys.executable, "-m", "spa_rl.cli", "eval", "--env", "sokoban", "--model", "default",
                          "--episode.mode", "world-model", "--eval.levels", "2", "--eval.samples", "2",
                          "--episode.max-turns", "2", "--sampling.max-new-tokens", "48", "--out", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    metrics, rows = check_outputs(out, 2, 2)
    assert "pass@2" in metrics and metrics["generated_tokens_per_second"] > 0
    assert "metric" in res.stderr  # the summary table


def test_eval_tiny_model_in_process(tmp_path):
    cfg = load_config(eval_recipe.Config, {"env": "frozenlake", "model": "tiny", "eval": {"levels": 3, "samples": 4},
                                           "episode": {"max_turns": 2}, "sampling": {"max_new_tokens": 12},
                                           "out": str(tmp_path)})
    assert eval_recipe.main(cfg) == 0
    metrics, _ = check_outputs(tmp_path, 3, 4)
    assert {"pass@1", "pass@2", "pass@4"} <= set(metrics)


def test_bad_options_are_one_line_errors(tmp_path):
    res = subprocess.run([sys.executable, "-m", "spa_rl.cli", "eval", "--eval.levels", "0", "--out", str(tmp_path)],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.startswith("spa: error:") and "eval.levels" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run([sys.executable, "-m", "spa_rl.cli", "eval", "--model", str(tmp_path / "nope"),
                          "--eval.levels", "1", "--eval.samples", "1", "--out", str(tmp_path / "o")],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "nope" in res.stderr


def test_help_lists_every_field_with_its_default():
    from spa_rl.config import field_names

    res = subprocess.run([sys.executable, "-m", "spa_rl.cli", "eval", "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    flat = " ".join(res.stdout.split())
    for name in field_names(eval_recipe.Config):
        assert "--" + name.replace("_", "-") in flat, name
    assert "--sampling.temperature TEMPERATURE sampling temperature (0 = greedy) (default: 1.0)" in flat
    assert "--env ENV" in flat or "--env NAME" in flat  # the section's short form


def test_eval_temperature_overrides_the_sampler_greedy_samples_agree(tmp_path):
    """eval.temperature 0 decodes greedily whatever sampling.temperature says: the samples of a
    level are then the same episode; at the sampling section's temperature 1 they differ."""
    def transcripts(out, **eval_fields):
        cfg = load_config(eval_recipe.Config, {"env": "frozenlake", "model": "tiny", "episode": {"max_turns": 1},
                                               "eval": {"levels": 2, "samples": 3, **eval_fields},
                                               "sampling": {"max_new_tokens": 12, "temperature": 1.0},
                                               "out": str(out)})
        assert eval_recipe.main(cfg) == 0
        rows = [json.loads(x) for x in (out / "trajectories.jsonl").read_text().splitlines()]
        by_level = {}
        for r in rows:
            by_level.setdefault(r["level_seed"], []).append(r["messages"][-1]["content"])
        return by_level

    greedy = transcripts(tmp_path / "greedy", temperature=0.0)
    assert all(len(set(v)) == 1 for v in greedy.values())
    sampled = transcripts(tmp_path / "sampled")
    assert any(len(set(v)) > 1 for v in sampled.values())
    res = subprocess.run([sys.executable, "-m", "spa_rl.cli", "eval", "--eval.temperature", "-1", "--out",
                          str(tmp_path / "bad")], capture_output=True, text=True)
    assert res.returncode == 2 and "eval.temperature" in res.stderr and "Traceback" not in res.stderr
