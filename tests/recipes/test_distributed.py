"""Data-parallel SFT under torchrun on gloo (2 CPU processes, tiny model): the README's exact
command form runs, records its world size, and ends with the weights of the 1-process run with
the same global batch (fp32)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp") / "data"
    from spa_rl.cli import main as spa

    assert spa(["generate", "--env", "sokoban", "--policy", "solver", "--episodes", "8", "--group-size", "1",
                "--out", str(out)]) == 0
    return out


def test_two_process_sft_equals_one_process(data, tmp_path):
    spa = shutil.which("spa", path=str(Path(sys.executable).parent)) or shutil.which("spa")
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert spa and torchrun, "the spa and torchrun entry points are installed beside this python"
    args = ["sft", "--data", str(data), "--model", "tiny", "--model.dtype", "fp32", "--epochs", "1", "--batch", "8",
            "--micro-batch", "4", "--seed", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", spa, *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "spa_rl.cli", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "world_size: 2" in (tmp_path / "two" / "config.yaml").read_text()
    assert "backend: gloo" in (tmp_path / "two" / "config.yaml").read_text()
    a = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    from spa_rl.models.loading import ensure_tiny_model
    start = load_file(str(ensure_tiny_model() / "model.safetensors"))
    moved = max((a[k] - start[k]).abs().max().item() for k in a if k in start)
    gap = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved > 1e-5  # the run trained
    assert gap < 1e-3 * moved, f"2-process weights differ by {gap:.2e} (the update moved them {moved:.2e})"
    assert torch.isfinite(torch.tensor(gap))
