"""Rollout engine throughput against a plain `model.generate` loop, measured in the same run.

    python benchmarks/rollout.py [--model default] [--batch 16] [--max-new-tokens 128]

Both sides get the same model weights, the same first-turn Sokoban prompts (world-model mode,
so responses are long), the same batch size, the same token cap and the same stop rule
(`</answer>` or the end-of-turn token), with sampling at temperature 1.
- baseline: fp32 model, `model.generate(do_sample=True, stop_strings=...)` batch by batch;
- engine: `HFBackend` (KV cache, finished rows dropped) on the dtype `--dtype` selects (auto = bf16 here).
Tokens counted are generated tokens up to and including each row's stop; padding is not counted.
Prints tokens/s for each and the ratio.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batches", type=int, default=2, help="batches timed on each side")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from spa_rl.agent import EpisodeConfig
    from spa_rl.models import load_model_and_tokenizer
    from spa_rl.rollout.backend import HFBackend, SamplingParams
    from spa_rl.rollout.engine import make_episodes
    from spa_rl.tokens import ChatTokenizer

    model32, tok = load_model_and_tokenizer(args.model, dtype="fp32")
    model_fast, _ = load_model_and_tokenizer(args.model, dtype=args.dtype)
    chat = ChatTokenizer(tok)
    n = args.batch * args.batches
    eps = make_episodes("sokoban", "val", 0, n, 1, EpisodeConfig(mode="world-model"))
    prompts = [chat.prompt_ids(ep.messages) for _, ep in eps]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0)
    print(f"model={args.model} batch={args.batch} batches={args.batches} max_new_tokens={args.max_new_tokens} "
          f"prompt tokens mean={sum(map(len, prompts)) / n:.0f} threads={torch.get_num_threads()}")

    # -- baseline: model.generate, fp32 ------------------------------------------------------
    torch.manual_seed(0)
    base_tokens, t0 = 0, time.perf_counter()
    pad = tok.pad_token_id
    for s in range(0, n, args.batch):
        chunk = prompts[s:s + args.batch]
        L = max(map(len, chunk))
        ids = torch.tensor([[pad] * (L - len(p)) + p for p in chunk])
        att = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in chunk])
        with torch.inference_mode():
            out = model32.generate(input_ids=ids, attention_mask=att, do_sample=True, temperature=1.0, top_p=1.0,
                                   top_k=0, max_new_tokens=args.max_new_tokens, stop_strings=list(params.stop_strings),
                                   tokenizer=tok, pad_token_id=pad)
        stops = {pad, tok.eos_token_id}
        for row in out[:, L:].tolist():
            # up to and including the first end-of-turn/pad token (rows stopped by a stop string
            # are padded after it, so that counts one token more than they made: in the
            # baseline's favour)
            k = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
            base_tokens += k
    base_s = time.perf_counter() - t0

    # -- engine ------------------------------------------------------------------------------
    backend = HFBackend(model_fast, tok, max_batch_size=args.batch, seed=0)
    backend.generate(prompts[:2], SamplingParams(max_new_tokens=4))  # warm-up (first-call allocations)
    t0 = time.perf_counter()
    gens = backend.generate(prompts, params)
    eng_s = time.perf_counter() - t0
    eng_tokens = sum(len(g.token_ids) for g in gens)

    base_tps, eng_tps = base_tokens / base_s, eng_tokens / eng_s
    print(f"baseline model.generate fp32: {base_tokens} tokens in {base_s:.1f} s = {base_tps:.1f} tokens/s")
    print(f"engine HFBackend {str(next(model_fast.parameters()).dtype)}: {eng_tokens} tokens in {eng_s:.1f} s = "
          f"{eng_tps:.1f} tokens/s")
    print(f"ratio engine/baseline: {eng_tps / base_tps:.2f}x")


if __name__ == "__main__":
    main()
