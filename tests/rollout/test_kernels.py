"""The AVX-512 decode-attention kernel (spa_rl/kernels.py) computes what PyTorch's flash kernel
computes, on the shapes the engine gives it: strided views of the cache buffers, rows of
different lengths, a row with no keys, and any number of queries per KV head (more than 16
are split into chunks, each its own work item).

Tolerance: both compute fp32 scores of bf16 inputs (the kernel by bf16 dot products, exact
products summed in fp32, where the CPU has AVX512_BF16; by fp32 FMAs otherwise, a variant built
and checked in a subprocess below), both round the softmax weights to bf16 before the sum over
V (the kernel only where it has AVX512_BF16), and both round the output to bf16 once, summing in
different orders; outputs agree to 2^-6 (one bf16 step below magnitude 4; these outputs are averages of
standard-normal values, mostly below 1) and the log-sum-exps to 1e-4. The machine must have
AVX-512 (skipped elsewhere: the engine then uses the flash kernel, which these tests compare
against)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spa_rl import kernels
from spa_rl.rollout.kvcache import attention_with_lse

pytestmark = pytest.mark.skipif(not kernels._cpu_has_avx512() or not kernels.kernel_enabled(),
                                reason="the decode-attention kernel needs an AVX-512 CPU")


@pytest.fixture(scope="module")
def decode_attention():
    module = kernels.load_cpu_kernels()
    assert module is not None, "the kernel did not build on an AVX-512 machine"
    return module.decode_attention


@pytest.fixture(scope="module")
def decode_attention_with_prefix():
    return kernels.load_cpu_kernels().decode_attention_with_prefix


def reference(q, k, v, lens, scale):
    L = k.shape[2]
    mask = torch.where(torch.arange(L)[None] < lens[:, None], 0.0, float("-inf"))[:, None, None, :]
    return attention_with_lse(q, k, v, mask, scale)


@pytest.mark.parametrize("rows,heads,group,keys", [(16, 3, 3, 264), (5, 2, 1, 37), (2, 3, 16, 600), (1, 1, 7, 1), (2, 3, 24, 663),
                                                       (1, 3, 17, 100), (1, 2, 48, 524)])
def test_kernel_equals_the_flash_kernel(decode_attention, rows, heads, group, keys):
    g = torch.Generator().manual_seed(rows * 1000 + keys)
    scale = 64 ** -0.5
    q = torch.randn(rows, heads, group, 64, generator=g).to(torch.bfloat16)
    # views of larger buffers, as the engine passes its cache: (rows, heads, capacity, 64)
    k_buf = (2 * torch.randn(rows + 1, heads, keys + 64, 64, generator=g)).to(torch.bfloat16)
    v_buf = torch.randn(rows + 1, heads, keys + 64, 64, generator=g).to(torch.bfloat16)
    k, v = k_buf[:rows, :, :keys], v_buf[:rows, :, :keys]
    lens = torch.randint(1, keys + 1, (rows,), generator=g)
    lens[0] = keys
    out, lse = decode_attention(q, k_buf[:rows], v_buf[:rows], lens, scale)
    ref_out, ref_lse = reference(q, k, v, lens, scale)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert (out.float() - ref_out.float()).abs().max().item() <= 2 ** -6
    assert (lse - ref_lse).abs().max().item() < 1e-4


@pytest.mark.parametrize("group", [3, 24])
def test_prefix_and_private_keys_under_one_softmax(decode_attention_with_prefix, group):
    """Rows that read a shared segment (two segments, one row with none, one with no private
    keys, one whose segment is empty) get the attention over segment keys + private keys."""
    g = torch.Generator().manual_seed(group)
    rows, heads, scale = 6, 3, 64 ** -0.5
    q = torch.randn(rows, heads, group, 64, generator=g).to(torch.bfloat16)
    k = (2 * torch.randn(rows, heads, 96, 64, generator=g)).to(torch.bfloat16)
    v = torch.randn(rows, heads, 96, 64, generator=g).to(torch.bfloat16)
    seg_k = (2 * torch.randn(4, heads, 80, 64, generator=g)).to(torch.bfloat16)
    seg_v = torch.randn(4, heads, 80, 64, generator=g).to(torch.bfloat16)
    lens = torch.tensor([37, 0, 80, 1, 16, 5])
    seg = torch.tensor([0, 1, -1, 1, 0, 2])
    seg_lens = torch.tensor([33, 64, 0])  # segment 2 is empty; buffer entry 3 is unused
    out, lse = decode_attention_with_prefix(q, k, v, lens, seg_k, seg_v, seg, seg_lens, scale)
    for n in range(rows):
        keys, values = k[n, :, :lens[n]], v[n, :, :lens[n]]
        if seg[n] >= 0:
            m = seg_lens[seg[n]]
            keys, values = torch.cat([seg_k[seg[n], :, :m], keys], 1), torch.cat([seg_v[seg[n], :, :m], values], 1)
        ref_out, ref_lse = attention_with_lse(q[n:n + 1], keys[None], values[None], None, scale)
        assert (out[n].float() - ref_out[0].float()).abs().max().item() <= 2 ** -6
        assert (lse[n] - ref_lse[0]).abs().max().item() < 1e-4
    with pytest.raises(RuntimeError, match="segment index out of range"):
        decode_attention_with_prefix(q, k, v, lens, seg_k, seg_v, torch.tensor([0, 1, -1, 1, 0, 3]), seg_lens, scale)


def test_a_row_without_keys_gets_zeros(decode_attention):
    q = torch.randn(2, 1, 3, 64).to(torch.bfloat16)
    k = torch.randn(2, 1, 8, 64).to(torch.bfloat16)
    out, lse = decode_attention(q, k, k, torch.tensor([0, 8]), 0.125)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()
    assert torch.isfinite(lse[1]).all()


def test_bad_input_is_refused_with_a_message(decode_attention):
    q = torch.randn(1, 1, 3, 64).to(torch.bfloat16)
    k = torch.randn(1, 1, 8, 64).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="lens exceed the keys"):
        decode_attention(q, k, k, torch.tensor([9]), 0.125)
    with pytest.raises(RuntimeError, match="bfloat16"):
        decode_attention(q.float(), k, k, torch.tensor([8]), 0.125)


def test_the_engine_uses_the_kernel_only_where_it_applies():
    cpu = torch.device("cpu")
    assert kernels.decode_kernel_for(torch.bfloat16, 64, cpu) is not None
    assert kernels.decode_kernel_for(torch.float32, 64, cpu) is None
    assert kernels.decode_kernel_for(torch.bfloat16, 32, cpu) is None
    assert kernels.decode_kernel_for(torch.bfloat16, 64, torch.device("meta")) is None


def test_a_built_kernel_is_imported_from_the_cache(decode_attention):
    """Once built (by the fixture, in this process or an earlier one), a new process imports the
    library from its cache folder instead of building again, and no scratch folder is left."""
    code = "from spa_rl import kernels; print(kernels.load_cpu_kernels().__file__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert Path(done.stdout.strip()).parent == kernels._cache_dir()
    assert not list(kernels._cache_dir().parent.glob(kernels._cache_dir().name + ".building-*"))


def test_the_kernel_can_be_switched_off():
    code = "from spa_rl import kernels; print(kernels.load_cpu_kernels())"
    env = {**os.environ, "SPA_RL_CPU_KERNELS": "0"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, timeout=120)
    assert done.stdout.strip() == "None"


def test_the_variant_without_bf16_dot_products_agrees():
    """CPUs with AVX-512 but without AVX512_BF16 (Skylake-X, Ice Lake) get the kernel's fp32
    score loop; build that variant in a subprocess and check it against the flash kernel."""
    code = """
import torch
from spa_rl import kernels
from spa_rl.rollout.kvcache import attention_with_lse
assert "-mavx512bf16" not in kernels._cflags()
module = kernels.load_cpu_kernels()
g = torch.Generator().manual_seed(5)
q = torch.randn(6, 3, 7, 64, generator=g).bfloat16()  # 7 queries: score blocks of 4 and 3
k = torch.randn(6, 3, 300, 64, generator=g).bfloat16()
v = torch.randn(6, 3, 300, 64, generator=g).bfloat16()
lens = torch.tensor([300, 1, 17, 250, 299, 64])
mask = torch.where(torch.arange(300)[None] < lens[:, None], 0.0, float("-inf"))[:, None, None, :]
out, lse = module.decode_attention(q, k, v, lens, 0.125)
ref_out, ref_lse = attention_with_lse(q, k, v, mask, 0.125)
print((out.float() - ref_out.float()).abs().max().item(), (lse - ref_lse).abs().max().item())
"""
    env = {**os.environ, "SPA_RL_CPU_KERNELS": "avx512f"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out_gap, lse_gap = map(float, done.stdout.split())
    assert out_gap <= 2 ** -6 and lse_gap < 1e-4
