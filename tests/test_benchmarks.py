"""The benchmark scripts still run against the recipes they call (a signature change in a recipe
once broke `benchmarks/sft.py` without any test noticing). Tiny model, a step or two: these check
that the scripts work end to end, not their figures."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_sft_benchmark_runs_the_sft_step():
    out = run_script("benchmarks/sft.py", "--model", "tiny", "--steps", "2", "--batch", "2", "--repeats", "1",
                     "--sides", "spa")
    assert "tokens/s" in out and "\nspa " in out


def test_ppo_benchmark_runs_a_step_and_the_update_baselines():
    out = run_script("benchmarks/ppo.py", "--model", "tiny", "--groups", "2", "--group-size", "2", "--steps", "1",
                     "--max-new-tokens", "8", "--max-turns", "1", "--no-baseline", "--update-baseline",
                     "--attention-baseline")
    assert "engine step:" in out and "ratio update-baseline/engine update time:" in out
    assert "ratio attention-baseline/engine update time:" in out


def test_training_attention_benchmark_times_both_sides():
    from spa_rl import kernels

    if kernels.training_attention_ops(torch.bfloat16, "cpu") is None:
        pytest.skip("the CPU kernels need an AVX-512 CPU")
    out = run_script("benchmarks/attention.py", "--training", "--rows", "40,300", "--rounds", "1")
    assert "compiled forward" in out and "kernels  forward" in out and "ratio compiled/kernels" in out
