"""Decode attention: the engine's AVX-512 kernel against PyTorch's CPU flash kernel, same run.

    python benchmarks/attention.py

Shapes are those of a SmolLM2 decode step (3 KV heads, 3 query heads each, head size 64, bf16
K/V as views of larger cache buffers, rows of different lengths): batch 16 at 264 and 840 cached
tokens (single turn, third turn), batch 64 at 1,024 (an evaluation batch), and a group segment
(12 queries over 576 tokens). Each line prints both times per call, the memory-read bound (K and
V read once at the bandwidth measured in this run) and the ratio flash/kernel.

    python benchmarks/attention.py --training [--rows 1100,1175,1250,1175] [--rounds 8]

The training attention (`training.packed_causal_attention`, forward and backward) of one
SmolLM2 layer (9 query heads on 3 KV heads, head size 64, bf16) over packed rows, with the
softmax passes of the CPU kernels against the torch.compile'd blocks they replace (the baseline,
and what runs where the kernels cannot), alternating, medians of `rounds`; last line
`ratio compiled/kernels (forward + backward): N.NNx`.
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from spa_rl import kernels  # noqa: E402
from spa_rl.rollout.kvcache import attention_with_lse  # noqa: E402

SHAPES = [(16, 3, 3, 264), (16, 3, 3, 840), (64, 3, 3, 1024), (1, 3, 12, 576), (2, 3, 24, 663), (1, 3, 48, 524)]


def per_call_us(fn, calls: int = 100) -> float:
    for _ in range(5):
        fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def bandwidth_gbs() -> float:
    x = torch.ones(128 * 2 ** 20)
    best = min(_timed(x.sum) for _ in range(3))
    return x.numel() * x.element_size() / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def training(rows: list[int], rounds: int) -> None:
    from spa_rl.training import packed_causal_attention

    ops = kernels.training_attention_ops(torch.bfloat16, "cpu")
    if ops is None:
        sys.exit("the CPU kernels are not available here (needs an AVX-512 CPU, g++ and ninja)")
    g = torch.Generator().manual_seed(0)
    n = sum(rows)
    cu = torch.tensor([0] + [sum(rows[:i + 1]) for i in range(len(rows))])
    q = torch.randn(1, 9, n, 64, generator=g).to(torch.bfloat16).requires_grad_()
    k = torch.randn(1, 3, n, 64, generator=g).to(torch.bfloat16).requires_grad_()
    v = torch.randn(1, 3, n, 64, generator=g).to(torch.bfloat16).requires_grad_()
    grad_out = torch.randn(1, 9, n, 64, generator=g).to(torch.bfloat16)
    real = kernels.training_attention_ops
    sides = {"compiled": lambda *a: None, "kernels": real}  # what training.py asks for the ops

    def one_pass():
        t0 = time.perf_counter()
        out = packed_causal_attention(q, k, v, cu, 0.125)
        t1 = time.perf_counter()
        out.backward(grad_out)
        return t1 - t0, time.perf_counter() - t1

    times = {name: [] for name in sides}
    try:
        for r in range(rounds + 2):  # two untimed rounds: compiling, first allocations
            for name, ops_for in sides.items():
                kernels.training_attention_ops = ops_for
                q.grad = k.grad = v.grad = None
                fwd_bwd = one_pass()
                if r >= 2:
                    times[name].append(fwd_bwd)
    finally:
        kernels.training_attention_ops = real
    print(f"training attention, one layer (9 query / 3 KV heads, head size 64, bf16), rows {rows} "
          f"({n} tokens), medians of {rounds} alternating rounds:")
    total = {}
    for name, xs in times.items():
        fwd = sorted(x[0] for x in xs)[len(xs) // 2]
        bwd = sorted(x[1] for x in xs)[len(xs) // 2]
        total[name] = fwd + bwd
        print(f"  {name:8s} forward {fwd * 1e3:6.1f} ms  backward {bwd * 1e3:6.1f} ms")
    print("load average " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(f"ratio compiled/kernels (forward + backward): {total['compiled'] / total['kernels']:.2f}x")


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--training", action="store_true", help="the training attention instead of decode")
    ap.add_argument("--rows", default="1100,1175,1250,1175", help="--training: packed row lengths")
    ap.add_argument("--rounds", type=int, default=8, help="--training: timed rounds per side")
    args = ap.parse_args()
    print("load average " + " ".join(f"{x:.2f}" for x in os.getloadavg()) + f"; threads={torch.get_num_threads()}")
    if args.training:
        training([int(x) for x in args.rows.split(",")], args.rounds)
        return
    module = kernels.load_cpu_kernels()
    if module is None:
        sys.exit("the decode-attention kernel is not available here (needs an AVX-512 CPU, g++ and ninja)")
    gbs = bandwidth_gbs()
    print(f"memory read bandwidth: {gbs:.1f} GB/s")
    scale = 64 ** -0.5
    ratios = []
    for rows, heads, group, keys in SHAPES:
        g = torch.Generator().manual_seed(keys)
        q = torch.randn(rows, heads, group, 64, generator=g).to(torch.bfloat16)
        k_buf = torch.randn(rows, heads, keys + 128, 64, generator=g).to(torch.bfloat16)
        v_buf = torch.randn(rows, heads, keys + 128, 64, generator=g).to(torch.bfloat16)
        lens = torch.tensor([keys - (b % 10) for b in range(rows)])
        mask = torch.where(torch.arange(keys)[None] < lens[:, None], 0.0, float("-inf"))[:, None, None, :]
        k, v = k_buf[:, :, :keys], v_buf[:, :, :keys]
        flash_us = per_call_us(lambda: attention_with_lse(q, k, v, mask, scale))
        kernel_us = per_call_us(lambda: module.decode_attention(q, k_buf, v_buf, lens, scale))
        bound_us = 2 * int(lens.sum()) * heads * 64 * 2 / (gbs * 1e9) * 1e6
        ratios.append(flash_us / kernel_us)
        print(f"rows {rows:3d} x {heads} KV heads x {group:2d} queries, {keys:4d} keys: flash {flash_us:7.0f} us, "
              f"kernel {kernel_us:7.0f} us, read bound {bound_us:6.0f} us; ratio flash/kernel {ratios[-1]:.2f}x")
    print("load average " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(f"ratio flash/kernel (geometric mean over shapes): {torch.tensor(ratios).log().mean().exp():.2f}x")


if __name__ == "__main__":
    main()
