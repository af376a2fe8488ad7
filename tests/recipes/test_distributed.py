"""Data parallelism under torchrun on gloo (2 CPU processes, tiny model, fp32): the README's exact
command form runs, records its world size, and ends with the weights of the 1-process run with
the same global batch, for SFT and for GRPO (whose logged step metrics match too)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

LAUNCH_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp") / "data"
    from spa_rl.cli import main as spa

    assert spa(["generate", "--env", "sokoban", "--policy", "solver", "--episodes", "8", "--group-size", "1",
                "--out", str(out)]) == 0
    return out


def run_one_and_two(args: list[str], tmp_path: Path) -> tuple[Path, Path]:
    """`spa ARGS` under `torchrun --standalone --nproc-per-node 2` (the README's form) into
    tmp_path/two, then in one plain process into tmp_path/one; both must exit 0, and the 2-process
    run records its world size and backend. Returns (one, two)."""
    spa = shutil.which("spa", path=str(Path(sys.executable).parent)) or shutil.which("spa")
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert spa and torchrun, "the spa and torchrun entry points are installed beside this python"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    launch([torchrun, "--standalone", "--nproc-per-node", "2", spa, *args, "--out", str(two)], env)
    launch([sys.executable, "-m", "spa_rl.cli", *args, "--out", str(one)], env)
    config = (two / "config.yaml").read_text()
    assert "world_size: 2" in config and "backend: gloo" in config
    return one, two


def launch(cmd: list[str], env: dict, timeout: float = LAUNCH_TIMEOUT_S) -> None:
    """Run `cmd` to its end, failing the test on a non-zero exit. Past `timeout` the launcher gets
    SIGTERM (torchrun forwards it to its workers, which live in their own sessions, and SIGKILLs
    them 30 s later), then SIGKILL if it is still alive: a hung collective leaves no worker behind."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        pytest.fail(f"{Path(cmd[0]).name} ran past {timeout:.0f} s and was stopped:\n{err[-3000:]}")
    assert proc.returncode == 0, f"{Path(cmd[0]).name} exited {proc.returncode}:\n{err[-3000:]}"


def weight_gap(one: Path, two: Path) -> tuple[float, float]:
    """(the largest |1-process - 2-process| final weight, the largest change of the 1-process
    run's weights from the tiny model it started from)."""
    from spa_rl.models.loading import ensure_tiny_model

    a = load_file(str(one / "final" / "model.safetensors"))
    b = load_file(str(two / "final" / "model.safetensors"))
    start = load_file(str(ensure_tiny_model() / "model.safetensors"))
    assert a.keys() == b.keys()
    moved = max((a[k] - start[k]).abs().max().item() for k in a if k in start)
    gap = max((a[k] - b[k]).abs().max().item() for k in a)
    assert torch.isfinite(torch.tensor([gap, moved])).all()
    return gap, moved


def test_two_process_sft_equals_one_process(data, tmp_path):
    one, two = run_one_and_two(["sft", "--data", str(data), "--model", "tiny", "--model.dtype", "fp32", "--epochs",
                                "1", "--batch", "8", "--micro-batch", "4", "--seed", "0"], tmp_path)
    gap, moved = weight_gap(one, two)
    assert moved > 1e-5  # the run trained
    assert gap < 1e-3 * moved, f"2-process weights differ by {gap:.2e} (the update moved them {moved:.2e})"


# Four 2x2 FrozenLake levels: prompts of one length, so one context budget sits at the edge of a
# third turn for all of them. The random tiny model never answers in format (-0.1 per turn), and
# whether a third turn fits depends on how soon the sampled text hit a stop string: scores are
# -0.2 or -0.3 within a group, so the group filter and the advantages have something to compare.
GRPO_LEVELS = "SF\nHG\n\nSH\nFG\n\nFS\nGH\n\nGF\nHS\n"
GRPO_STOPS = json.dumps(list("aeiou0123456789"))
# What differs between 1 and N processes by design: wall-clock times and throughput, the world size.
NOT_COMPARED = ("time/", "rollout/generated_tokens_per_s", "runtime/world_size", "val/seconds",
                "val/generated_tokens_per_second")


def test_two_process_grpo_equals_one_process(tmp_path):
    """GRPO over 2 gloo ranks replays the 1-process run: rollout_seeding=group gives every group
    the same episodes whichever rank plays it, the filter and advantages see all episodes, and
    the update's micro-batches (3 episodes, which do not divide the 8 kept ones) are split over
    ranks with gradients summed before clipping. Weights and logged metrics must match."""
    (tmp_path / "levels.txt").write_text(GRPO_LEVELS)
    args = ["train", "--model", "tiny", "--model.dtype", "fp32", "--algo", "grpo", "--steps", "2",
            "--groups", "4", "--group-size", "4", "--keep-ratio", "0.5", "--micro-batch", "3",
            "--rollout-seeding", "group", "--env", "frozenlake", "--env.level-file", str(tmp_path / "levels.txt"),
            "--env.options", "{is_slippery: false}", "--episode.max-turns", "3",
            "--episode.max-context-tokens", "1545", "--sampling.max-new-tokens", "32",
            "--sampling.stop-strings", GRPO_STOPS, "--eval.levels", "2", "--eval.samples", "2",
            "--eval-every", "0", "--optim.lr", "1e-3", "--seed", "0"]
    one, two = run_one_and_two(args, tmp_path / "runs")
    gap, moved = weight_gap(one, two)
    assert moved > 1e-5  # the run trained
    assert gap < 1e-2 * moved, f"2-process weights differ by {gap:.2e} (the update moved them {moved:.2e})"

    rows = {}
    for name, run in (("one", one), ("two", two)):
        rows[name] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows["one"]] == [r["step"] for r in rows["two"]] == [0, 1, 2, 2]
    steps = [r for r in rows["one"] if "rollout/score_mean" in r]
    assert all(r["rollout/chosen_in_group_std_min"] > 0 for r in steps), "scores must differ within kept groups"
    assert all(r["rollout/trained_tokens"] > 0 for r in steps)
    for a, b in zip(rows["one"], rows["two"]):
        assert a.keys() == b.keys()
        assert b.get("runtime/world_size", 2) == 2
        keys = [k for k in a if not k.startswith(NOT_COMPARED) and not isinstance(a[k], list)]
        # the per-level validation counts: the same levels in the same order, exactly
        assert all(a[k] == b[k] for k in a if isinstance(a[k], list))
        # rel 1e-4; abs 1e-6 for the means that are zero up to rounding (the first pg_loss)
        assert {k: b[k] for k in keys} == pytest.approx({k: a[k] for k in keys}, rel=1e-4, abs=1e-6), \
            f"step {a['step']}: 2-process metrics differ from the 1-process run's"
