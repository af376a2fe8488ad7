"""Continuous batching over the hand-written decoder: the rollout engine's fast path.

`ContinuousBatcher.run(prompts, params, next_prompt)` keeps up to `max_batch_size` sequences in
the batch at once. When a sequence finishes a turn (end-of-turn token, stop string or token
cap), `next_prompt(key, generation)` is called at once: it returns the sequence's next full
context (the same episode's next turn) or None (the episode is over). A next context extends the
previous one, so only its new tokens are prefilled into the cache the sequence already has; a
sequence that is over leaves the batch and a waiting prompt takes its place. The batch therefore
stays full across turns of different lengths, and no context is ever prefilled twice.

Prompts that share a prefix share its KV cache (one prefill, one read per decode step): see
`plan_segments` for which prefixes are shared, and `kvcache.py` for how.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from spa_rl.rollout.kvcache import KVCache, PrefillJob
from spa_rl.rollout.llama import LlamaDecoder

MIN_SHARED_TOKENS = 32  # a common prefix shorter than this is not worth a segment
PREFILL_TOKENS = 4096  # tokens per prefill forward (bounds activation memory)


@dataclass
class _Seq:
    key: int
    ids: list[int]  # context ids whose K/V are in the cache (segment ids, then private ids)
    todo: list[int]  # context ids still to prefill
    tokens: list[int] = field(default_factory=list)  # this turn's sampled ids
    logprobs: list[float] = field(default_factory=list)
    tail: str = ""  # end of this turn's text, for stop strings
    next_token: int | None = None  # sampled and not yet fed to the model


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if list(a[:n]) == list(b[:n]):
        return n
    lo, hi = 0, n  # binary search on prefix equality (list comparison runs in C)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if list(a[:mid]) == list(b[:mid]):
            lo = mid
        else:
            hi = mid - 1
    return lo


def plan_segments(prompts: Sequence[Sequence[int]], existing: Sequence[tuple[int, ...]]) -> list[tuple]:
    """Which shared prefix each newly admitted prompt reads first.

    Returns one entry per prompt: ("existing", i) for segment i of `existing`, ("new", ids)
    for a new segment (equal entries mean one shared segment), or ("none",).
    - Identical prompts (a group's samples of one level) share all of the prompt but its last
      token (the private prefill of that token yields each sequence's first logits).
    - The other prompts share the longest segment already in the cache that starts them, or,
      when at least two of them agree on MIN_SHARED_TOKENS or more, their common prefix
      (the game's instructions, the same for every level) if that is longer.
    """
    def best_existing(p):
        best = None
        for i, seg in enumerate(existing):
            if len(seg) < len(p) and tuple(p[:len(seg)]) == seg and (best is None or len(seg) > len(existing[best])):
                best = i
        return best

    counts: dict[tuple, int] = {}
    for p in prompts:
        counts[tuple(p)] = counts.get(tuple(p), 0) + 1
    singles = [tuple(p) for p in prompts if counts[tuple(p)] == 1]
    common: tuple | None = None
    if len(singles) >= 2:
        n = _common_prefix_len(singles[0], singles[1])
        for p in singles[2:]:
            n = _common_prefix_len(singles[0][:n], p)
        n = min(n, min(len(p) for p in singles) - 1)
        if n >= MIN_SHARED_TOKENS:
            common = singles[0][:n]
    plan = []
    for p in prompts:
        t = tuple(p)
        have = best_existing(t)
        have_len = len(existing[have]) if have is not None else 0
        if counts[t] >= 2 and len(t) - 1 > have_len:
            plan.append(("new", t[:-1]))
        elif counts[t] == 1 and common is not None and len(common) > have_len:
            plan.append(("new", common))
        elif have is not None:
            plan.append(("existing", have))
        else:
            plan.append(("none",))
    return plan


class ContinuousBatcher:
    def __init__(self, decoder: LlamaDecoder, max_batch_size: int, sample: Callable, eos_token_ids: Sequence[int],
                 piece: Callable[[int], str]):
        self.decoder = decoder
        self.max_batch_size = max_batch_size
        self.sample = sample  # (logits (n, V) fp32) -> (tokens (n,), logprobs (n,)) on the device
        self.eos = set(eos_token_ids)
        self.piece = piece  # token id -> its text, for stop strings
        self.stats = {"prefill_tokens": 0, "prefill_s": 0.0, "decode_steps": 0, "decode_rows": 0, "decode_s": 0.0,
                      "segments": 0, "segment_tokens": 0, "kv_tokens_read": 0,
                      "kv_tokens_attended": 0}

    # -- driver ----------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, prompts: Sequence[Sequence[int]], params, next_prompt: Callable) -> None:
        from spa_rl.rollout.backend import Generation

        self.params = params
        self.next_prompt = next_prompt
        self.Generation = Generation
        d = self.decoder
        self.cache = KVCache(d.n_layers, d.n_kv_heads, d.head_dim, d.dtype, d.device)
        self.seqs: list[_Seq] = []  # seqs[i] lives in cache slot i
        self._segment_jobs: list[int] = []  # new segments to prefill before their sequences
        self.stop_len = max((len(s) for s in params.stop_strings), default=0)
        pending = deque((i, list(p)) for i, p in enumerate(prompts))
        for _, p in pending:
            if not p:
                raise ValueError("cannot generate from an empty prompt")
        if params.max_new_tokens <= 0:
            for key, _ in pending:
                if next_prompt(key, Generation([], [], "length")) is not None:
                    raise ValueError("max_new_tokens <= 0 cannot continue a sequence")
            return
        self._admit(pending)
        self._prefill_all(pending)
        while self.seqs:
            self._decode_step(pending)
            self._prefill_all(pending)

    # -- admission -------------------------------------------------------------------------
    def _admit(self, pending: deque) -> None:
        free = self.max_batch_size - len(self.seqs)
        if free <= 0 or not pending:
            return
        cohort = [pending.popleft() for _ in range(min(free, len(pending)))]
        cache = self.cache
        plan = plan_segments([p for _, p in cohort], [s.ids for s in cache.segments])
        new_segments: dict[tuple, int] = {}
        for (key, prompt), choice in zip(cohort, plan):
            if choice[0] == "new":
                seg = new_segments.get(choice[1])
                if seg is None:
                    seg = new_segments[choice[1]] = cache.add_segment(choice[1])
                    self._segment_jobs.append(seg)
                    self.stats["segments"] += 1
                    self.stats["segment_tokens"] += len(choice[1])
            else:
                seg = choice[1] if choice[0] == "existing" else None
            cache.add_slot(seg)
            shared = 0 if seg is None else len(cache.segments[seg].ids)
            self.seqs.append(_Seq(key, prompt[:shared], prompt[shared:]))

    # -- prefill ---------------------------------------------------------------------------
    def _prefill_all(self, pending: deque) -> None:
        """Prefill every sequence with ids to prefill (and the new segments they read), sample
        their first token, and repeat while finished sequences bring new work."""
        while True:
            todo = [i for i, s in enumerate(self.seqs) if s.todo]
            if not todo and not self._segment_jobs:
                return
            t0 = time.perf_counter()
            logits = self._prefill(todo)
            self.stats["prefill_s"] += time.perf_counter() - t0
            self._sampled(todo, logits, pending)

    def _prefill(self, rows: list[int]) -> torch.Tensor:
        cache, d = self.cache, self.decoder
        # segments first: the slot jobs of the same forward read them
        pieces: list[tuple[PrefillJob, list[int], bool]] = []
        for seg in self._segment_jobs:
            ids = list(cache.segments[seg].ids)
            for a in range(0, len(ids), PREFILL_TOKENS):
                part = ids[a:a + PREFILL_TOKENS]
                pieces.append((PrefillJob("segment", seg, a, len(part)), part, False))
        self._segment_jobs = []
        for row in rows:
            s = self.seqs[row]
            seg = cache.slot_seg[row]
            start = cache.slot_len[row]
            cache.reserve_slots(cache.n_slots, start + len(s.todo))
            for a in range(0, len(s.todo), PREFILL_TOKENS):
                part = s.todo[a:a + PREFILL_TOKENS]
                last = a + PREFILL_TOKENS >= len(s.todo)
                pieces.append((PrefillJob("slot", row, start + a, len(part), segment=seg), part, last))
        last_hidden = []
        batch: list = []
        n_tokens = 0
        for piece in pieces + [None]:
            if piece is None or (batch and n_tokens + piece[0].n > PREFILL_TOKENS):
                last_hidden.extend(self._forward_pieces(batch))
                batch, n_tokens = [], 0
            if piece is not None:
                batch.append(piece)
                n_tokens += piece[0].n
        for row in rows:
            s = self.seqs[row]
            cache.slot_len[row] += len(s.todo)
            s.ids.extend(s.todo)
            s.todo = []
        self.stats["prefill_tokens"] += sum(p[0].n for p in pieces)
        return d.logits(torch.stack(last_hidden)) if last_hidden else torch.empty(0)

    def _forward_pieces(self, batch) -> list[torch.Tensor]:
        if not batch:
            return []
        cache, d = self.cache, self.decoder
        ids, pos, offset = [], [], 0
        for job, part, _ in batch:
            job.offset = offset
            offset += job.n
            ids.extend(part)
            base = job.start + (0 if job.segment is None else len(cache.segments[job.segment].ids))
            pos.extend(range(base, base + job.n))
        dev = d.device
        hidden = d.forward(torch.tensor(ids, device=dev), torch.tensor(pos, device=dev),
                           cache.prefill_attend([job for job, _, _ in batch], d.scale))
        return [hidden[job.offset + job.n - 1] for job, _, last in batch if last]

    # -- decode ----------------------------------------------------------------------------
    def _decode_step(self, pending: deque) -> None:
        t0 = time.perf_counter()
        cache, d = self.cache, self.decoder
        plan = cache.decode_plan(d.n_heads)
        # K/V positions the step's attention reads from memory (each shared segment once), and
        # the keys its rows attend over (each row its whole context)
        private = sum(cache.slot_len) + cache.n_slots
        shared = [cache.segment_len(i) for i in range(cache.n_slots)]
        self.stats["kv_tokens_read"] += private + sum(len(seg.ids) for seg in cache.segments)
        self.stats["kv_tokens_attended"] += private + sum(shared)
        ids = [s.next_token for s in self.seqs]
        pos = [cache.segment_len(i) + cache.slot_len[i] for i in range(len(self.seqs))]
        hidden = d.forward(torch.tensor(ids, device=d.device), torch.tensor(pos, device=d.device),
                           cache.decode_attend(plan, d.scale))
        for i, s in enumerate(self.seqs):
            cache.slot_len[i] += 1
            s.ids.append(s.next_token)
            s.next_token = None
        logits = d.logits(hidden)
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += len(ids)
        self.stats["decode_s"] += time.perf_counter() - t0
        self._sampled(list(range(len(self.seqs))), logits, pending)

    # -- after sampling --------------------------------------------------------------------
    def _sampled(self, rows: list[int], logits: torch.Tensor, pending: deque) -> None:
        """Record the tokens sampled for `rows`; finish turns; continue, retire and admit."""
        if not rows:
            return
        tokens, logprobs = self.sample(logits)
        tokens, logprobs = tokens.tolist(), logprobs.tolist()
        params, done = self.params, []
        for row, t, lp in zip(rows, tokens, logprobs):
            s = self.seqs[row]
            s.tokens.append(t)
            s.logprobs.append(lp)
            reason = None
            if t in self.eos:
                reason = "eos"
            elif self.stop_len:
                s.tail = (s.tail + self.piece(t))[-(self.stop_len + 16):]
                if any(stop in s.tail for stop in params.stop_strings):
                    reason = "stop"
            if reason is None and len(s.tokens) >= params.max_new_tokens:
                reason = "length"
            if reason is None:
                s.next_token = t
            elif not self._next_turn(row, reason):
                done.append(row)
        # retire finished sequences (highest slot first: removal moves the last slot down)
        for row in sorted(done, reverse=True):
            moved = self.cache.remove_slot(row)
            if moved is not None:
                self.seqs[row] = self.seqs[moved]
            self.seqs.pop()
        self._admit(pending)

    def _next_turn(self, row: int, reason: str) -> bool:
        """Ask for the sequence's next context; reuse the cached part of it. False when over."""
        s, cache = self.seqs[row], self.cache
        gen = self.Generation(s.tokens, s.logprobs, reason)
        new = self.next_prompt(s.key, gen)
        s.tokens, s.logprobs, s.tail = [], [], ""
        if new is None:
            return False
        new = list(new)
        if not new:
            raise ValueError("next_prompt returned an empty context")
        # the cache holds s.ids; keep what the new context repeats (at least one id must be
        # prefilled: its logits start the next turn)
        keep = min(_common_prefix_len(s.ids, new), len(new) - 1)
        shared = cache.segment_len(row)
        if keep < shared:  # the new context leaves the shared prefix: start over, private
            cache.detach_segment(row)
            keep = shared = 0
        cache.slot_len[row] = keep - shared
        s.ids, s.todo = new[:keep], new[keep:]
        return True
