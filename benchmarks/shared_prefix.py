"""Training forward + backward with shared prefixes packed once, against the same rows packed
whole, in the same run.

    python benchmarks/shared_prefix.py [--env frozenlake] [--mode base] [--groups 2] [--group-size 4]

Rows are built as an RL micro-batch has them: `groups` levels, each with `group_size` samples;
a row is the level's real first prompt (system message + the level's first user message,
rendered by the chat template of the default model) followed by `--rest` tokens that differ per
sample (responses and later turns; random ids here, which costs the same as text). The step is
what the PPO actor's update does per micro-batch: `token_logprobs` over the non-prompt tokens
under bf16 autocast, then backward. Baseline: the same step with SPA_RL_SHARE_PREFIXES=0. The
two sides alternate for `--repeats` rounds after one untimed warm-up each (torch.compile), and
each side's best round counts. The log-probs of the two sides are compared too.
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def build_rows(args, tokenizer):
    from spa_rl import envs
    from spa_rl.agent.episode import Episode, EpisodeConfig
    from spa_rl.tokens import ChatTokenizer

    chat = ChatTokenizer(tokenizer)
    options = {"is_slippery": False} if args.env == "frozenlake" else {}
    g = torch.Generator().manual_seed(0)
    rows, prompt_lengths = [], []
    for level in range(args.groups):
        episode = Episode(envs.make(args.env, **options), level, EpisodeConfig(mode=args.mode, render_mode="grid+coords"))
        prompt = chat.prompt_ids(episode.messages)
        for _ in range(args.group_size):
            rows.append(prompt + torch.randint(0, tokenizer.vocab_size, (args.rest,), generator=g).tolist())
            prompt_lengths.append(len(prompt))
    return rows, prompt_lengths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", default="frozenlake")
    ap.add_argument("--mode", default="base", choices=["base", "world-model"])
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--rest", type=int, default=200, help="tokens after the prompt, different per sample")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from spa_rl.models.loading import load_model_and_tokenizer
    from spa_rl.training import pack_rows, pad_batch, token_logprobs

    model, tokenizer = load_model_and_tokenizer("default", dtype=torch.float32)
    rows, prompt_lengths = build_rows(args, tokenizer)
    ids, attn, mask = pad_batch(rows, [[0] * p + [1] * (len(r) - p) for r, p in zip(rows, prompt_lengths)],
                                pad_id=tokenizer.pad_token_id)
    packed = pack_rows(ids, attn, share_prefixes=True)
    print(f"{len(rows)} rows ({args.groups} levels x {args.group_size} samples, {args.env} {args.mode} prompts of "
          f"{min(prompt_lengths)}-{max(prompt_lengths)} tokens + {args.rest}): {int(attn.sum())} tokens, "
          f"{packed.input_ids.shape[1]} packed with prefixes shared; torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f}")

    def step(share: bool):
        os.environ["SPA_RL_SHARE_PREFIXES"] = "1" if share else "0"
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp = token_logprobs(model, ids, attn, mask)
        (-lp.sum()).backward()
        return time.perf_counter() - start, lp.detach()

    sides = {"shared": True, "whole": False}
    best = {}
    results = {}
    for name, share in sides.items():
        _, results[name] = step(share)  # warm-up: compile
    for _ in range(args.repeats):
        for name, share in sides.items():
            seconds, _ = step(share)
            best[name] = min(best.get(name, float("inf")), seconds)
    tokens = int(attn.sum())
    for name in sides:
        print(f"{name:>6}: {best[name]:.2f} s per forward+backward, {tokens / best[name]:.0f} row tokens/s")
    diff = (results["shared"] - results["whole"]).abs()
    print(f"log-probs, shared vs whole: max |difference| {diff.max():.4f}, mean {diff[mask].mean():.5f} (bf16)")
    print(f"ratio shared/whole speed: {best['whole'] / best['shared']:.2f}x")


if __name__ == "__main__":
    main()
