"""Rollout engine throughput against plain `model.generate` loops, measured in the same run.

    python benchmarks/rollout.py [--model default] [--batch 16] [--batches 1] [--max-new-tokens 128]
    python benchmarks/rollout.py --multi-turn [--groups 2] [--group-size 8] [--turns 3]

Single turn (default): both sides get the same model weights, the same first-turn Sokoban prompts
(world-model mode, so responses are long; one level per prompt), the same batch size, the same
token cap and the same stop rule (`</answer>` or the end-of-turn token), sampling at T = 1.
- baseline: fp32 model, `model.generate(do_sample=True, stop_strings=...)` batch by batch;
- engine: `HFBackend.generate` (bf16 where the CPU has it, shared prompt prefixes, KV buffers).

Multi-turn (`--multi-turn`, the RL workload): `groups` Sokoban levels x `group-size` samples each,
world-model prompts, up to `turns` turns of up to `max-new-tokens` tokens, played to the end by
`run_rollouts` on each side:
- baseline: a backend whose `generate` is `model.generate` (fp32), driven turn by turn: every
  turn it re-sends each running episode's whole context, as a plain implementation does (it
  returns no log-probs, which saves it work);
- engine: `HFBackend` through `run_rollouts`' fast path (KV kept across turns, one prefill per
  group, continuous batching).

Tokens counted are generated tokens up to and including each row's stop. Both modes print the
decode roofline of this machine beside the engine's measured time per decode step: the larger of
the bytes one decode step reads (bf16 weights plus the K/V the step attends over, each shared
prefix once) over the memory bandwidth measured in this run, and its arithmetic over the bf16
matrix-product rate measured in this run (at 16 rows a SmolLM2 step is about as much arithmetic
as reading: both bounds matter); and the load average (the machine is
shared: figures taken under load are worse).
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def load_average() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def memory_bandwidth_gbs() -> float:
    """Read bandwidth: best of 3 sums over a 512 MB tensor (far larger than the caches)."""
    x = torch.ones(128 * 2 ** 20)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * x.element_size() / best / 1e9


def decoder_weight_bytes(decoder) -> int:
    """Bytes of weights one decode step reads (every matrix and norm; embedding rows excluded)."""
    n = decoder.final_norm.numel()
    linears = [decoder.head] + [m for layer in decoder.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    n += sum(lin.numel for lin in linears)
    n += sum(layer.ln1.numel() + layer.ln2.numel() for layer in decoder.layers)
    return n * torch.finfo(decoder.dtype).bits // 8


def matmul_peak_gflops(dtype: torch.dtype) -> float:
    """Best of 5 products at a SmolLM2 MLP shape with many rows ((2048, 576) x (576, 3072)):
    the arithmetic rate this processor sustains in the engine's compute dtype."""
    x = torch.randn(2048, 576).to(dtype)
    w = torch.randn(3072, 576).to(dtype)
    torch.nn.functional.linear(x, w)
    best = min(_timed(lambda: torch.nn.functional.linear(x, w)) for _ in range(5))
    return 2 * 2048 * 576 * 3072 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def roofline(backend, bandwidth: float, peak_gflops: float) -> str:
    """The engine's decode steps against the two bounds of this machine: the bytes a step reads
    (weights + K/V) over `bandwidth`, and its arithmetic (2 flops per weight per row, plus the
    attention's 4 * head_dim per query head per key) at `peak_gflops`."""
    st, dec = backend.last_stats, backend.decoder()
    steps = max(st["decode_steps"], 1)
    kv_token_bytes = 2 * dec.n_layers * dec.n_kv_heads * dec.head_dim * torch.finfo(dec.dtype).bits // 8
    w = decoder_weight_bytes(dec)
    kv = st["kv_tokens_read"] / steps * kv_token_bytes
    rows = st["decode_rows"] / steps
    memory_ms = (w + kv) / (bandwidth * 1e9) * 1e3
    weights = w // (torch.finfo(dec.dtype).bits // 8)
    # keys each row attends over: every row reads its whole context (shared prefixes included)
    keys_per_row = st["kv_tokens_attended"] / max(st["decode_rows"], 1)
    flops = rows * (2 * weights + 4 * dec.head_dim * dec.n_heads * dec.n_layers * keys_per_row)
    compute_ms = flops / (peak_gflops * 1e9) * 1e3
    bound_ms = max(memory_ms, compute_ms)
    measured_ms = st["decode_s"] / steps * 1e3
    return (f"decode roofline: {w / 1e6:.0f} MB weights + {kv / 1e6:.0f} MB K/V per step at {bandwidth:.1f} GB/s "
            f"= {memory_ms:.1f} ms; {flops / 1e9:.1f} GFLOP per step at {peak_gflops:.0f} GFLOP/s = {compute_ms:.1f} ms; "
            f"bound {bound_ms:.1f} ms per step ({rows / bound_ms * 1e3:.0f} tokens/s at {rows:.1f} rows); "
            f"measured {measured_ms:.1f} ms per step ({rows / measured_ms * 1e3:.0f} tokens/s), "
            f"{measured_ms / bound_ms:.1f}x the bound; prefill {st['prefill_tokens']} tokens in {st['prefill_s']:.1f} s")


class GenerateBaseline:
    """`generate(prompts, params)` by `model.generate`, left-padded batches: what a plain
    implementation runs every turn."""

    def __init__(self, model, tokenizer, batch: int):
        self.model, self.tok, self.batch = model, tokenizer, batch
        self.stops = {tokenizer.eos_token_id}

    def generate(self, prompts, params):
        from spa_rl.rollout.backend import Generation

        pad, out_gens = self.tok.pad_token_id, []
        for s in range(0, len(prompts), self.batch):
            chunk = [list(p) for p in prompts[s:s + self.batch]]
            L = max(map(len, chunk))
            ids = torch.tensor([[pad] * (L - len(p)) + p for p in chunk])
            att = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in chunk])
            with torch.inference_mode():
                out = self.model.generate(input_ids=ids, attention_mask=att, do_sample=True, temperature=1.0,
                                          top_p=1.0, top_k=0, max_new_tokens=params.max_new_tokens,
                                          stop_strings=list(params.stop_strings), tokenizer=self.tok,
                                          pad_token_id=pad)
            for row in out[:, L:].tolist():
                out_gens.append(self._trim(row, params))
        return out_gens

    def _trim(self, row, params):
        """The row up to its stop (rows that stopped early are padded after it)."""
        from spa_rl.rollout.backend import Generation

        text = ""
        for i, t in enumerate(row):
            if t in self.stops:
                return Generation(row[:i + 1], [0.0] * (i + 1), "eos")
            text += self.tok.decode([t])
            if any(s in text[-40:] for s in params.stop_strings):
                return Generation(row[:i + 1], [0.0] * (i + 1), "stop")
        return Generation(row, [0.0] * len(row), "length")


def single_turn(args, model32, model_fast, tok, chat, bandwidth, peak):
    from spa_rl.agent import EpisodeConfig
    from spa_rl.models import resolve_dtype
    from spa_rl.rollout.backend import HFBackend, SamplingParams
    from spa_rl.rollout.engine import make_episodes

    n = args.batch * args.batches
    eps = make_episodes("sokoban", "val", 0, n, 1, EpisodeConfig(mode="world-model"))
    prompts = [chat.prompt_ids(ep.messages) for _, ep in eps]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0)
    print(f"single turn: batch={args.batch} batches={args.batches} max_new_tokens={args.max_new_tokens} "
          f"prompt tokens mean={sum(map(len, prompts)) / n:.0f} threads={torch.get_num_threads()}")

    torch.manual_seed(0)
    t0 = time.perf_counter()
    base = GenerateBaseline(model32, tok, args.batch).generate(prompts, params)
    base_s = time.perf_counter() - t0
    base_tokens = sum(len(g.token_ids) for g in base)

    backend = HFBackend(model_fast, tok, max_batch_size=args.batch, seed=0, dtype=resolve_dtype(args.dtype))
    backend.generate(prompts[:2], SamplingParams(max_new_tokens=4))  # warm-up (first-call allocations)
    t0 = time.perf_counter()
    gens = backend.generate(prompts, params)
    eng_s = time.perf_counter() - t0
    eng_tokens = sum(len(g.token_ids) for g in gens)

    base_tps, eng_tps = base_tokens / base_s, eng_tokens / eng_s
    print(f"baseline model.generate fp32: {base_tokens} tokens in {base_s:.1f} s = {base_tps:.1f} tokens/s")
    print(f"engine HFBackend {backend.compute_dtype()}: {eng_tokens} tokens in {eng_s:.1f} s = {eng_tps:.1f} tokens/s")
    print(roofline(backend, bandwidth, peak))
    print(load_average())
    print(f"ratio engine/baseline: {eng_tps / base_tps:.2f}x")


def multi_turn(args, model32, model_fast, tok, chat, bandwidth, peak):
    from spa_rl.agent import EpisodeConfig
    from spa_rl.models import resolve_dtype
    from spa_rl.rollout.backend import HFBackend, SamplingParams
    from spa_rl.rollout.engine import make_episodes, run_rollouts

    cfg = EpisodeConfig(mode="world-model", max_turns=args.turns)
    n = args.groups * args.group_size
    batch = args.batch or n
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0)
    print(f"multi-turn: {args.groups} levels x {args.group_size} samples, up to {args.turns} turns of "
          f"{args.max_new_tokens} tokens, batch {batch}, threads={torch.get_num_threads()}")

    def play(backend):
        episodes = make_episodes("sokoban", "val", 0, args.groups, args.group_size, cfg)
        t0 = time.perf_counter()
        rollouts = run_rollouts(episodes, backend, chat, params)
        seconds = time.perf_counter() - t0
        tokens = sum(r.response_tokens for r in rollouts)
        turns = sum(len(r.turns) for r in rollouts)
        context = max(len(r.sequence) for r in rollouts)
        return tokens, seconds, turns, context

    torch.manual_seed(0)
    b_tokens, b_s, b_turns, b_ctx = play(GenerateBaseline(model32, tok, batch))
    backend = HFBackend(model_fast, tok, max_batch_size=batch, seed=0, dtype=resolve_dtype(args.dtype))
    backend.generate([chat.prompt_ids(make_episodes("sokoban", "val", 0, 1, 1, cfg)[0][1].messages)],
                     SamplingParams(max_new_tokens=4))  # warm-up
    e_tokens, e_s, e_turns, e_ctx = play(backend)
    b_tps, e_tps = b_tokens / b_s, e_tokens / e_s
    print(f"baseline model.generate fp32, turn by turn: {b_tokens} tokens ({b_turns} turns, longest context "
          f"{b_ctx}) in {b_s:.1f} s = {b_tps:.1f} tokens/s")
    print(f"engine HFBackend {backend.compute_dtype()}: {e_tokens} tokens ({e_turns} turns, longest context {e_ctx}) "
          f"in {e_s:.1f} s = {e_tps:.1f} tokens/s")
    print(roofline(backend, bandwidth, peak))
    print(load_average())
    print(f"multi-turn ratio engine/baseline: {e_tps / b_tps:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--multi-turn", action="store_true", help="the multi-turn RL workload instead of one turn")
    ap.add_argument("--batch", type=int, default=None, help="batch size (single turn: 16; multi-turn: all episodes)")
    ap.add_argument("--batches", type=int, default=1, help="single turn: batches timed on each side")
    ap.add_argument("--groups", type=int, default=2, help="multi-turn: levels")
    ap.add_argument("--group-size", type=int, default=8, help="multi-turn: samples per level")
    ap.add_argument("--turns", type=int, default=3, help="multi-turn: most turns per episode")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="auto", help="engine compute dtype")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from spa_rl.models import load_model_and_tokenizer, resolve_dtype
    from spa_rl.tokens import ChatTokenizer

    print(load_average())
    model32, tok = load_model_and_tokenizer(args.model, dtype="fp32")
    # the engine copies the weights into its compute dtype itself (HFBackend's dtype, resolved
    # here: bf16 where the processor computes it natively, the recipes' rollout dtype); give it
    # the same fp32 model
    model_fast = model32
    chat = ChatTokenizer(tok)
    bandwidth = memory_bandwidth_gbs()
    peak = matmul_peak_gflops(resolve_dtype(args.dtype))
    print(f"memory read bandwidth: {bandwidth:.1f} GB/s; {resolve_dtype(args.dtype)} matmul peak: {peak:.0f} GFLOP/s; "
          f"engine dtype {resolve_dtype(args.dtype)}")
    if args.multi_turn:
        multi_turn(args, model32, model_fast, tok, chat, bandwidth, peak)
    else:
        args.batch = args.batch or 16
        single_turn(args, model32, model_fast, tok, chat, bandwidth, peak)


if __name__ == "__main__":
    main()
