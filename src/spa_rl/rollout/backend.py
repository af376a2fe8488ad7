"""Generation backends: token ids in, token ids and log-probs out.

The rollout loop needs only `generate(prompts, params) -> list[Generation]` from a backend
(`GenerationBackend`), so a vLLM backend for GPU users plugs in beside `HFBackend`. A backend
may also offer `generate_episodes(prompts, params, next_prompt)`, the multi-turn fast path
(`run_rollouts` uses it when present): it keeps each sequence's KV cache between turns.
`drive_turns` gives the same contract on top of a plain `generate`.

`HFBackend` runs a Hugging Face causal LM:
- for Llama-family models (Llama, Qwen2, Mistral; `llama.unsupported_reason`) through the
  rollout engine: a hand-written decoder over the model's weights (bf16 where the processor
  computes it natively), a preallocated KV cache with shared prompt prefixes, and continuous
  batching across turns (`scheduler.py`);
- for any other model through the model's own forward with a `DynamicCache`, one call per
  turn, prompts left-padded with position ids counted from each row's first real token;
- in both, a row stops at an end-of-turn token, at a stop string (e.g. `</answer>`) or at the
  token cap, and the log-prob of each sampled token is taken under the temperature-scaled
  distribution before top-k/top-p truncation, which is the distribution a trainer recomputes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

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


# next_prompt(key, generation) -> the sequence's next full context (it extends the previous
# context), or None when the sequence is over. `key` is the prompt's index.
NextPrompt = Callable[[int, Generation], "Sequence[int] | None"]


def drive_turns(generate: Callable[[list, SamplingParams], list[Generation]], prompts: Sequence[Sequence[int]],
                params: SamplingParams, next_prompt: NextPrompt,
                on_batch: Callable[[int, int], None] | None = None) -> None:
    """`generate_episodes` on top of a stateless `generate`: every turn, all sequences still
    running are sent together, whole (each call re-prefills every context)."""
    active = [(i, list(p)) for i, p in enumerate(prompts)]
    turn = 0
    while active:
        turn += 1
        if on_batch is not None:
            on_batch(turn, len(active))
        gens = generate([p for _, p in active], params)
        nxt = []
        for (key, _), gen in zip(active, gens):
            new = next_prompt(key, gen)
            if new is not None:
                nxt.append((key, list(new)))
        active = nxt


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None):
    """Sample one token per row. logits: (B, V) float32. Returns (tokens (B,), logprobs (B,)),
    on the logits' device (the generator must live there too)."""
    if params.temperature <= 0:
        tokens = logits.argmax(dim=-1)
        logprobs = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None])[:, 0]
        return tokens, logprobs
    scaled = logits / params.temperature if params.temperature != 1.0 else logits
    logprobs_all = torch.log_softmax(scaled, dim=-1)
    truncated = (params.top_k and params.top_k < scaled.shape[-1]) or params.top_p < 1.0
    if not truncated:
        probs = logprobs_all.exp()
    else:
        filtered = scaled
        if params.top_k and params.top_k < filtered.shape[-1]:
            kth = torch.topk(filtered, params.top_k, dim=-1).values[:, -1:]
            filtered = filtered.masked_fill(filtered < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_logits, order = torch.sort(filtered, dim=-1, descending=True)
            sorted_probs = torch.softmax(sorted_logits, dim=-1)
            # drop a token when the tokens before it already cover top_p (the first always stays)
            drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= params.top_p
            drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
            filtered = filtered.masked_fill(drop, float("-inf"))
        probs = torch.softmax(filtered, dim=-1)
    tokens = sample_categorical(probs, generator)
    return tokens, logprobs_all.gather(1, tokens[:, None])[:, 0]


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of the (unnormalised) categorical `probs` (B, V), by inverting its CDF
    at a uniform point: the first index whose cumulative mass exceeds u * total.

    Exact like `torch.multinomial`, which on CPU drew an exponential per vocabulary entry and
    cost 11.6 ms per decode step at batch 16 x 49,152 here (a quarter of the step); this is one
    cumsum and B uniforms. Zero-probability entries are never drawn (their cumulative mass
    equals their predecessor's, and the search returns the first entry strictly above u).
    """
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=probs.shape[-1] - 1)


def _weights_version(model) -> tuple:
    """Changes whenever a parameter is replaced or updated in place (optimizer steps and
    `load_state_dict` bump tensors' version counters), so a cached weight snapshot is reused
    only while it is current."""
    try:
        return tuple((p.data_ptr(), p._version) for p in model.parameters())
    except RuntimeError:  # inference tensors keep no version counter: never reuse a snapshot
        return (object(),)


@dataclass
class HFBackend:
    model: torch.nn.Module
    tokenizer: object
    max_batch_size: int = 32
    seed: int = 0
    eos_token_ids: tuple[int, ...] = field(default=())
    # compute dtype of the engine: "auto" = the model's dtype, so that an fp32 model samples
    # with the log-probs its fp32 training forward computes (the recipes pass a bf16 model, or
    # a bf16 rollout copy, where bf16 is wanted); "bf16"/"fp32" force one
    dtype: str | torch.dtype = "auto"
    # "auto": the rollout engine where the architecture is supported, else the HF forward;
    # "hf": always the HF forward (reference and fallback)
    engine: str = "auto"

    def __post_init__(self):
        from spa_rl.rollout.llama import unsupported_reason

        ids = set(self.eos_token_ids)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is not None:
            ids.add(int(eos))
        self.eos_token_ids = tuple(sorted(ids))
        self.pad_token_id = getattr(self.tokenizer, "pad_token_id", None)
        if self.pad_token_id is None:
            self.pad_token_id = self.eos_token_ids[0]
        self.device = next(self.model.parameters()).device
        # Sampling happens where the logits are: a CPU generator cannot drive CUDA sampling.
        self.generator = torch.Generator(device=self.device).manual_seed(self.seed)
        # Per-token text, for stop strings: decoding one id at a time is exact for ASCII stop
        # strings under byte-level BPE, and cached because the same ids recur constantly.
        self._piece_cache: dict[int, str] = {}
        if self.engine not in ("auto", "hf"):
            raise ValueError(f"engine must be 'auto' or 'hf', not {self.engine!r}")
        self.fallback_reason = "engine='hf'" if self.engine == "hf" else unsupported_reason(self.model)
        self._decoder = None
        self._decoder_version = None
        self.last_stats: dict = {}

    def _piece(self, token_id: int) -> str:
        piece = self._piece_cache.get(token_id)
        if piece is None:
            piece = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._piece_cache[token_id] = piece
        return piece

    @property
    def uses_engine(self) -> bool:
        return self.fallback_reason is None

    def compute_dtype(self) -> torch.dtype:
        from spa_rl.models import resolve_dtype

        if self.dtype != "auto":
            return resolve_dtype(self.dtype, self.device)
        return next(self.model.parameters()).dtype

    def decoder(self):
        """The engine's weight snapshot, rebuilt when the model's weights have changed."""
        from spa_rl.rollout.llama import LlamaDecoder

        version = _weights_version(self.model)
        if self._decoder is None or version != self._decoder_version:
            self._decoder = None  # free the old snapshot before building the new one
            self._decoder = LlamaDecoder(self.model, self.compute_dtype(), batch_hint=self.max_batch_size)
            self._decoder_version = version
        return self._decoder

    # -- the two entry points ------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
        if not self.uses_engine:
            return self._generate_hf(prompts, params)
        results: dict[int, Generation] = {}

        def keep(key: int, gen: Generation):
            results[key] = gen
            return None

        self.generate_episodes(prompts, params, keep)
        return [results[i] for i in range(len(prompts))]

    def generate_episodes(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                          next_prompt: NextPrompt) -> None:
        """Generate a turn for every prompt; after each, `next_prompt(key, generation)` gives
        that sequence's next context (or None). With the engine, a sequence keeps its KV cache
        between turns and the batch is refilled as sequences end."""
        if not self.uses_engine:
            drive_turns(self._generate_hf, prompts, params, next_prompt)
            return
        from spa_rl.rollout.scheduler import ContinuousBatcher

        batcher = ContinuousBatcher(self.decoder(), self.max_batch_size,
                                    lambda logits: sample_next(logits, params, self.generator),
                                    self.eos_token_ids, self._piece)
        batcher.run(prompts, params, next_prompt)
        self.last_stats = batcher.stats

    # -- fallback: the HF forward ----------------------------------------------------------
    def _generate_hf(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
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
                for i, gen in zip(chunk, self._generate_batch_hf([prompts[i] for i in chunk], params)):
                    results[i] = gen
        finally:
            self.model.train(was_training)
        return [results[i] for i in range(len(prompts))]

    @torch.inference_mode()
    def _generate_batch_hf(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
        from transformers import DynamicCache

        device = self.device
        B = len(prompts)
        T = max(len(p) for p in prompts)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((B, T), dtype=torch.long)
        for b, p in enumerate(prompts):
            input_ids[b, T - len(p):] = torch.tensor(list(p), dtype=torch.long)
            attention[b, T - len(p):] = 1
        position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
        input_ids, attention, position_ids = input_ids.to(device), attention.to(device), position_ids.to(device)

        # `cache=` is transformers' current name for the KV cache argument (`past_key_values`
        # is deprecated and warns on every forward).
        cache = DynamicCache()
        logits = self.model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids,
                            cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1, :]
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
                                cache=cache, use_cache=True).logits[:, -1, :]
            next_pos = next_pos + 1
        return [Generation(tokens_out[b], logprobs_out[b], finish[b]) for b in range(B)]
