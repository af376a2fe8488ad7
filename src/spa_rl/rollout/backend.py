"""Generation backends: token ids in, token ids and log-probs out.

The rollout loop only sees `GenerationBackend.generate(prompts, params)`, so a vLLM backend for
GPU users can be added beside `HFBackend` without touching it.

`HFBackend` is a plain KV-cache sampling loop over a Hugging Face causal LM:
- prompts of different lengths are left-padded, with position ids counted from each row's
  first real token, so a padded row computes exactly what it would alone;
- one prefill forward, then one forward per new token for the rows still running; rows that
  finished are dropped from the batch and from the cache (`batch_select_indices`), so short
  answers stop costing compute;
- a row stops at an end-of-turn token, at a stop string (e.g. `</answer>`), or at the token cap;
- the log-prob of each sampled token is taken under the temperature-scaled distribution before
  top-k/top-p truncation, which is the distribution a trainer recomputes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 400
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k
    stop_strings: tuple[str, ...] = ("</answer>",)


@dataclass
class Generation:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "eos" (end-of-turn token sampled, included), "stop" (stop string), "length"


class GenerationBackend(Protocol):
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
        ...


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None):
    """Sample one token per row. logits: (B, V) float32. Returns (tokens (B,), logprobs (B,))."""
    if params.temperature <= 0:
        tokens = logits.argmax(dim=-1)
        logprobs = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None])[:, 0]
        return tokens, logprobs
    scaled = logits / params.temperature
    logprobs_all = torch.log_softmax(scaled, dim=-1)
    filtered = scaled
    if params.top_k and params.top_k < filtered.shape[-1]:
        kth = torch.topk(filtered, params.top_k, dim=-1).values[:, -1:]
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(filtered, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already cover top_p (the first always stays)
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        filtered = filtered.masked_fill(drop, float("-inf"))
    probs = torch.softmax(filtered, dim=-1)
    tokens = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return tokens, logprobs_all.gather(1, tokens[:, None])[:, 0]


@dataclass
class HFBackend:
    model: torch.nn.Module
    tokenizer: object
    max_batch_size: int = 32
    seed: int = 0
    eos_token_ids: tuple[int, ...] = field(default=())

    def __post_init__(self):
        ids = set(self.eos_token_ids)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is not None:
            ids.add(int(eos))
        self.eos_token_ids = tuple(sorted(ids))
        self.pad_token_id = getattr(self.tokenizer, "pad_token_id", None)
        if self.pad_token_id is None:
            self.pad_token_id = self.eos_token_ids[0]
        self.generator = torch.Generator().manual_seed(self.seed)
        # Per-token text, for stop strings: decoding one id at a time is exact for ASCII stop
        # strings under byte-level BPE, and cached because the same ids recur constantly.
        self._piece_cache: dict[int, str] = {}

    def _piece(self, token_id: int) -> str:
        piece = self._piece_cache.get(token_id)
        if piece is None:
            piece = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._piece_cache[token_id] = piece
        return piece

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
        # Similar lengths together: less padding per chunk.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: dict[int, Generation] = {}
        # Eval mode for sampling: in train mode with gradient checkpointing, transformers turns
        # the KV cache off and every decoded token would lose its context.
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(order), self.max_batch_size):
                chunk = order[start:start + self.max_batch_size]
                for i, gen in zip(chunk, self._generate_batch([prompts[i] for i in chunk], params)):
                    results[i] = gen
        finally:
            self.model.train(was_training)
        return [results[i] for i in range(len(prompts))]

    @torch.inference_mode()
    def _generate_batch(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
        from transformers import DynamicCache

        device = next(self.model.parameters()).device
        B = len(prompts)
        T = max(len(p) for p in prompts)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((B, T), dtype=torch.long)
        for b, p in enumerate(prompts):
            input_ids[b, T - len(p):] = torch.tensor(list(p), dtype=torch.long)
            attention[b, T - len(p):] = 1
        position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
        input_ids, attention, position_ids = input_ids.to(device), attention.to(device), position_ids.to(device)

        cache = DynamicCache()
        logits = self.model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids,
                            past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1, :]
        next_pos = position_ids[:, -1] + 1  # (B,)

        tokens_out: list[list[int]] = [[] for _ in range(B)]
        logprobs_out: list[list[float]] = [[] for _ in range(B)]
        finish = ["length"] * B
        tails = [""] * B
        alive = list(range(B))  # row index in the original batch for each row still in the cache
        stop_len = max((len(s) for s in params.stop_strings), default=0)
        eos = set(self.eos_token_ids)

        for step in range(params.max_new_tokens):
            tok, lp = sample_next(logits.float(), params, self.generator)
            tok_list, lp_list = tok.tolist(), lp.tolist()
            keep = []
            for j, b in enumerate(alive):
                t = tok_list[j]
                tokens_out[b].append(t)
                logprobs_out[b].append(lp_list[j])
                if t in eos:
                    finish[b] = "eos"
                    continue
                if stop_len:
                    tails[b] = (tails[b] + self._piece(t))[-(stop_len + 16):]
                    if any(s in tails[b] for s in params.stop_strings):
                        finish[b] = "stop"
                        continue
                keep.append(j)
            if not keep or step == params.max_new_tokens - 1:
                break
            if len(keep) < len(alive):
                idx = torch.tensor(keep, device=device)
                cache.batch_select_indices(idx)
                attention = attention[idx]
                next_pos = next_pos[idx]
                tok = tok[idx]
                alive = [alive[j] for j in keep]
            attention = torch.cat([attention, attention.new_ones((len(alive), 1))], dim=1)
            logits = self.model(input_ids=tok[:, None], attention_mask=attention, position_ids=next_pos[:, None],
                                past_key_values=cache, use_cache=True).logits[:, -1, :]
            next_pos = next_pos + 1
        return [Generation(tokens_out[b], logprobs_out[b], finish[b]) for b in range(B)]
