"""CPU kernels of our own for x86 processors with AVX-512, built at first use: the rollout
engine's decode attention and fused layer operations, and the training attention's softmax
passes. One C++ extension (`csrc/`), used by `spa_rl.rollout` (decoding) and `spa_rl.training`
(the packed causal attention of SFT and PPO updates).

Decode attention (`csrc/decode_attention.cpp`). A decode step attends each sequence's 3 query
heads per KV head (SmolLM2's GQA) to its cached keys. PyTorch's CPU flash-attention kernel
(`_scaled_dot_product_flash_attention_for_cpu`) is built for many queries per block and ran
these shapes at 3-5x their memory-read bound here; torch.compile of the same math (inductor
C++) reached 1.3-1.8x the flash kernel, the plain matmul formula less. The kernel reads each
key and value once per (row, KV head), the row's shared prompt prefix and then its private keys
under one softmax (no separate prefix attention and merge), with bf16 dot products where the
CPU has AVX512_BF16 (scores summed in fp32; the weighted sum of V over weights rounded to bf16,
as the flash kernel rounds them) and fp32 FMAs elsewhere, and ran 2.5-8.7x faster than the
flash kernel on the engine's shapes (docs/performance.md has the measurements;
`benchmarks/attention.py` reproduces them). `csrc/decoder_ops.cpp` fuses a decoder layer's
small operations (norms, rotary embedding, SiLU product).

Training attention (`csrc/training_attention.cpp`). The training forward's causal attention
runs in query blocks whose two products are oneDNN batched matmuls; between them lie the
block's softmax (forward) and its elementwise backward. Compiled by inductor those passes took
more time than the products (1.8 ms for a 256 x 1,200 block against 1.7 ms for its products);
written by hand, with the causal mask as a per-row count of visible keys, they take a fraction
of it (training.py, docs/performance.md).

It is compiled by `torch.utils.cpp_extension.load` (g++ and ninja, the same toolchain
torch.compile needs on CPU) the first time a process needs it on an AVX-512 CPU (about 40 s), in
a private temporary folder that is then renamed into torch's extension cache under a name that
hashes the source, the flags, the torch version and the Python version. Later processes import
the built library at once, and a build killed half-way leaves no lock behind (torch's own
shared build folder would make every later build wait on it). Where it cannot be built or run
(no AVX-512, no compiler, other head sizes, `SPA_RL_CPU_KERNELS=0`), the engine uses PyTorch's
flash kernel and training the torch.compile'd blocks, with one warning when a build was
attempted and failed. `SPA_RL_CPU_KERNELS=avx512f` builds the variant for CPUs without the bf16
dot-product instructions (for its test).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch

HEAD_DIM = 64
_CSRC = Path(__file__).parent / "csrc"
_SOURCES = [_CSRC / "decode_attention.cpp", _CSRC / "decoder_ops.cpp", _CSRC / "training_attention.cpp"]  # one extension
_HEADERS = [_CSRC / "avx512_math.h"]
_NAME = "spa_rl_cpu_kernels"


def _cflags() -> list[str]:
    """AVX-512F always; the bf16 dot-product instructions (AVX512_BF16, e.g. Zen 4, Sapphire
    Rapids) where the CPU has them: the kernel's scores then take a third of the instructions."""
    # -fopenmp: at::parallel_for splits work over torch's OpenMP threads only in code compiled
    # with it (without, it runs the whole range on the calling thread). The library then binds to
    # the libgomp.so.1 torch has already loaded (torch's Linux wheels ship GNU OpenMP under that
    # name); a torch built on another OpenMP would see a second runtime, correct but with its
    # own threads
    # (AVX512BW and VL for 16-bit masked loads and stores: ATen's AVX512 capability, which the
    # build requires, implies them)
    flags = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma"]
    try:
        if os.environ.get("SPA_RL_CPU_KERNELS") != "avx512f" and torch.cpu._is_avx512_bf16_supported():
            flags.append("-mavx512bf16")
    except AttributeError:
        pass
    return flags


_module = None  # the built extension, False once it is known to be unavailable


def _cpu_has_avx512() -> bool:
    try:
        return torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    except Exception:
        return False


def kernel_enabled() -> bool:
    return os.environ.get("SPA_RL_CPU_KERNELS", "1") != "0"


def load_cpu_kernels():
    """The extension module, or None where it is unavailable."""
    global _module
    if _module is None:
        _module = False
        if kernel_enabled() and _cpu_has_avx512():
            try:
                _module = _build_or_import()
            except Exception as exc:  # no compiler or ninja, or the build failed
                warnings.warn(f"the AVX-512 CPU kernels could not be built ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); using PyTorch's kernels")
    return _module or None


def _cache_dir() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    # the library links against this torch and this Python's ABI
    code = b"".join(p.read_bytes() for p in _SOURCES + _HEADERS)
    tag = hashlib.sha256(code + " ".join(_cflags()).encode() + torch.__version__.encode() + sys.version.encode())
    return Path(root) / f"{_NAME}-{tag.hexdigest()[:16]}"


def _build_or_import():
    target = _cache_dir()
    library = target / f"{_NAME}.so"
    if library.exists():
        spec = importlib.util.spec_from_file_location(_NAME, library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    from torch.utils.cpp_extension import load

    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"{target.name}.building-", dir=target.parent))
    try:
        module = load(_NAME, [str(p) for p in _SOURCES], extra_cflags=_cflags(), extra_ldflags=["-fopenmp"], build_directory=str(scratch), verbose=False)
        try:
            os.replace(scratch, target)  # atomic; another process may have finished first
        except OSError:
            pass
        return module  # the loaded library stays mapped whatever happens to its folder
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def decoder_ops_for(dtype: torch.dtype, device: torch.device, widths: tuple[int, ...], head_dim: int):
    """The built extension's fused layer operations (`rms_norm`, `add_rms_norm`, `rope_split`,
    `silu_mul`) when they apply: CPU, bf16, row widths that are multiples of 16 and a head size
    that is a multiple of 32. Else None (the decoder then runs the PyTorch operations)."""
    if (torch.device(device).type != "cpu" or dtype != torch.bfloat16 or any(w % 16 for w in widths)
            or head_dim % 32):
        return None
    return load_cpu_kernels()


def decode_kernel_for(dtype: torch.dtype, head_dim: int, device: torch.device):
    """The built extension (`decode_attention`, `decode_attention_with_prefix`) when it applies
    to attention in `dtype` with heads of `head_dim` on `device` (CPU, bf16, 64), else None."""
    if torch.device(device).type != "cpu" or dtype != torch.bfloat16 or head_dim != HEAD_DIM:
        return None
    return load_cpu_kernels()


def causal_block_attention(ops, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, queries: int,
                           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of one block whose queries are the last `queries` of its keys, with the
    extension `ops`: q (B, R, D) bf16, R = G * queries rows (row r is query r % queries), k, v
    (B, E, D). One oneDNN product for the scores (bf16), `causal_softmax_` in place on them, the
    product with V, the normalisation. Returns out (B, R, D) in q's dtype and the log-sum-exp
    (B, R) fp32. Used by the training attention's query blocks (`training`) and the rollout
    engine's prefill jobs (`rollout.kvcache`)."""
    scores = torch.bmm(q, k.transpose(1, 2))
    total, lse = ops.causal_softmax_(scores, queries, scale)  # scores now hold the unnormalised weights
    out = torch.bmm(scores, v)
    return (out.float() / total[..., None]).to(q.dtype), lse


def training_attention_ops(dtype: torch.dtype, device: torch.device):
    """The built extension's training-attention passes (`causal_softmax_`,
    `causal_softmax_backward_`) for block products in `dtype` on `device` (CPU, bf16), else None
    (training then runs the torch.compile'd blocks)."""
    if torch.device(device).type != "cpu" or dtype != torch.bfloat16:
        return None
    return load_cpu_kernels()
