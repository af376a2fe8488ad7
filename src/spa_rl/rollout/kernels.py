"""A decode-attention kernel of our own for x86 CPUs with AVX-512, built at first use.

Why: a decode step attends each sequence's 3 query heads per KV head (SmolLM2's GQA) to its
cached keys. PyTorch's CPU flash-attention kernel (`_scaled_dot_product_flash_attention_for_cpu`)
is built for many queries per block and ran these shapes at 3-5x their memory-read bound here;
torch.compile of the same math (inductor C++) reached 1.3-1.8x the flash kernel, the plain
matmul formula less. `csrc/decode_attention.cpp` reads each key and value once per (row, KV
head), in fp32 arithmetic from bf16, and ran 2-2.6x faster than the flash kernel on the engine's
shapes (docs/performance.md has the measurements; `benchmarks/attention.py` reproduces them).

It is compiled by `torch.utils.cpp_extension.load` (g++ and ninja, the same toolchain
torch.compile needs on CPU) into torch's extension cache the first time a process decodes on an
AVX-512 CPU (about 30 s, once per machine and source version). Where it cannot be built or run
(no AVX-512, no compiler, other head sizes, `SPA_RL_DECODE_KERNEL=0`), the engine uses the flash
kernel, with one warning when a build was attempted and failed.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

HEAD_DIM = 64
MAX_GROUP = 16  # queries per KV head the kernel handles at once
_SOURCE = Path(__file__).parent / "csrc" / "decode_attention.cpp"
_module = None  # the built extension, False once it is known to be unavailable


def _cpu_has_avx512() -> bool:
    try:
        return torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    except Exception:
        return False


def kernel_enabled() -> bool:
    return os.environ.get("SPA_RL_DECODE_KERNEL", "1") != "0"


def load_decode_attention():
    """The extension module (with `decode_attention`), or None where it is unavailable."""
    global _module
    if _module is None:
        _module = False
        if kernel_enabled() and _cpu_has_avx512():
            try:
                from torch.utils.cpp_extension import load

                _module = load("spa_rl_decode_attention", [str(_SOURCE)],
                               extra_cflags=["-O3", "-mavx512f", "-mfma"], verbose=False)
            except Exception as exc:  # no compiler or ninja, or the build failed
                warnings.warn(f"the AVX-512 decode-attention kernel could not be built ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); using PyTorch's flash kernel")
    return _module or None


def decode_attention_for(q: torch.Tensor, group: int):
    """The kernel's entry point when it applies to queries like `q` with `group` queries per KV
    head (CPU, bf16, head size 64), else None."""
    if q.device.type != "cpu" or q.dtype != torch.bfloat16 or q.shape[-1] != HEAD_DIM or group > MAX_GROUP:
        return None
    module = load_decode_attention()
    return module.decode_attention if module else None
