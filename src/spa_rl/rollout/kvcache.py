"""KV cache of the rollout engine: shared prompt prefixes plus one private tail per sequence.

Layout. Every sequence ("slot") has a private K/V buffer; a sequence may also point to one
shared, read-only "segment" (a prompt prefix that several sequences start with: a group's level
prompt, or the game instructions common to every level). The sequence's context is
segment tokens + private tokens. Both kinds live in preallocated tensors

    seg_k, seg_v:   (layers, segments, kv_heads, segment_capacity, head_dim)
    slot_k, slot_v: (layers, slots,    kv_heads, slot_capacity,    head_dim)

that grow (by copying) only when a longer context arrives, and that are kept compact: slots in
use are 0..B-1 and segments in use are 0..S-1, so a decode step attends over plain views of the
buffers without gathering them.

Why segments: decoding is bound by memory reads. At batch 16 and a 730-token context, the
private K/V of 16 rows is 270 MB per step, as much as SmolLM2's weights; a group's 8 samples (or
16 different levels that share 524 tokens of instructions) read the shared part once.

A decode step attends over both parts in one call of the AVX-512 kernel (`kernels.py`): each
(row, KV head) reads its segment's keys, then its private keys, under one softmax; the segment's
K/V, read by several rows in turn, comes from the processor's cache after the first. Where the
kernel does not run (other devices or dtypes, no AVX-512), the two parts are attended separately
with PyTorch's flash kernel and merged with their log-sum-exps (softmax over a concatenation =
weighted sum of the two partial softmaxes): the segment part runs the queries of all rows that
share a segment against that segment's keys in one product.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from spa_rl.kernels import causal_block_attention, decode_kernel_for

GROW_ROUND = 128  # capacities are rounded up to this many tokens
NEG_INF = float("-inf")


def _round_up(n: int, k: int = GROW_ROUND) -> int:
    return -(-n // k) * k


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention without causal structure, returning (out, logsumexp).

    q: (N, h, m, d), k/v: (N, h, L, d), mask: additive, broadcastable to (N, h, m, L).
    Returns out (N, h, m, d) in q's dtype and lse (N, h, m) in fp32.
    On CPU this is one fused kernel (the flash-attention op behind SDPA, which also returns the
    log-sum-exp); elsewhere the plain formula.
    """
    if q.device.type == "cpu":
        if mask is not None:
            mask = mask.to(q.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=mask, scale=scale)
        return out, lse
    s = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if mask is not None:
        s = s + mask
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).to(v.dtype)
    return torch.matmul(p, v), lse


def merge_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """Attention over the union of two key sets from the attention over each and its
    log-sum-exp (softmax over a concatenation = the two partial softmaxes weighted by their
    shares of the total), computed in fp32 and returned in out_a's dtype."""
    total = torch.logaddexp(lse_a, lse_b)
    return (out_a.float() * torch.exp(lse_a - total)[..., None]
            + out_b.float() * torch.exp(lse_b - total)[..., None]).to(out_a.dtype)


PREFILL_BLOCK = 512  # queries per block of `KVCache._prefill_job` (scores: 3 x 3 x 512 x keys bf16)


def grouped_causal_mask(n: int, ctx: int, group: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Additive mask (group * n, ctx) for `grouped_causal_attention`: query i of the n new
    tokens (absolute row ctx - n + i) sees keys 0 .. ctx - n + i, repeated for each of the
    `group` query heads folded into one KV head's queries."""
    visible = torch.ones(n, ctx, dtype=torch.bool, device=device).tril(ctx - n)
    mask = torch.zeros(n, ctx, dtype=dtype, device=device).masked_fill_(~visible, NEG_INF)
    return mask.repeat(group, 1)


def grouped_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                             scale: float) -> torch.Tensor:
    """Prefill attention of one sequence's new tokens with grouped-query heads.

    q: (n, H, d); k, v: (KV, ctx, d); mask: `grouped_causal_mask(n, ctx, H // KV, ...)`.
    Returns (n, H, d). The g = H / KV query heads that read one KV head are folded into that
    head's queries, so the attention is one (KV, g * n) x (KV, ctx) product with K and V read as
    they are. Why: SDPA with `enable_gqa=True` ran 2.6x slower on CPU at prefill shapes (141
    queries, 665 keys, SmolLM2's 9/3 heads: 5.7 vs 2.2 ms), and expanding K and V to every query
    head 1.3x slower.
    """
    n, H, d = q.shape
    KV = k.shape[0]
    g = H // KV
    qf = q.view(n, KV, g, d).permute(1, 2, 0, 3).reshape(KV, g * n, d)  # head h = kv * g + j
    out, _ = attention_with_lse(qf[None], k[None], v[None], mask[None, None], scale)
    return out[0].view(KV, g, n, d).permute(2, 0, 1, 3).reshape(n, H, d)


@dataclass
class Segment:
    ids: tuple[int, ...]
    refs: int = 0  # slots pointing at it


@dataclass
class DecodePlan:
    """Index tensors for one decode step over slots 0..B-1 (rebuilt every step: lengths change).
    The `seg_*` grid fields serve the flash path only (None when the kernel runs)."""

    write_rows: torch.Tensor  # (B * kv_heads,) row of each new key in a layer's slot buffer viewed as (-1, d)
    slot_len: int  # private keys to read (max over rows, after the write), rounded up
    slot_mask: torch.Tensor | None  # (B, 1, 1, slot_len) additive
    slot_keys: torch.Tensor  # (B,) int64: private keys each row reads (after the write)
    n_seg: int
    seg_len: int
    seg_keys: torch.Tensor | None  # (S,) int64: tokens of each segment
    row_seg: torch.Tensor | None  # (B,) int64: each row's segment, -1 for none
    seg_mask: torch.Tensor | None = None  # (S, 1, 1, seg_len)
    seg_rows: torch.Tensor | None = None  # (S * R,) row feeding each (segment, rank) place; B = padding
    seg_back: torch.Tensor | None = None  # (B,) place of each row in the (S * R) grid
    group: int = 0  # R: most rows sharing one segment
    has_seg: torch.Tensor | None = None  # (B, 1, 1) bool


@dataclass
class PrefillJob:
    """New tokens for one buffer: `kind` "segment" or "slot", `index` into that buffer kind,
    written at private offset `start` (after the segment, for slots)."""

    kind: str
    index: int
    start: int
    n: int
    offset: int = 0  # where its tokens sit in the packed prefill batch
    segment: int | None = None  # for slots: the segment they read first


@dataclass
class KVCache:
    n_layers: int
    n_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    segments: list[Segment] = field(default_factory=list)  # in use, compact
    slot_len: list[int] = field(default_factory=list)  # private tokens per slot in use
    slot_seg: list[int | None] = field(default_factory=list)  # segment index per slot

    def __post_init__(self):
        shape = (self.n_layers, 0, self.n_kv_heads, 0, self.head_dim)
        self.seg_k = self.seg_v = self.slot_k = self.slot_v = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.seg_k, self.seg_v = self.seg_k.clone(), self.seg_v.clone()
        self.slot_k, self.slot_v = self.slot_k.clone(), self.slot_v.clone()

    # -- capacity --------------------------------------------------------------------------
    @staticmethod
    def _grow(buf: torch.Tensor, count: int, length: int) -> torch.Tensor:
        _, c0, _, l0, _ = buf.shape
        if count <= c0 and length <= l0:
            return buf
        count, length = max(count, c0), max(_round_up(length), l0)
        if length > l0 and l0:
            length = max(length, _round_up(int(l0 * 1.5)))  # fewer re-allocations as contexts grow
        new = buf.new_zeros(buf.shape[0], count, buf.shape[2], length, buf.shape[4])
        new[:, :c0, :, :l0] = buf
        return new

    def reserve_slots(self, count: int, length: int) -> None:
        self.slot_k = self._grow(self.slot_k, count, length)
        self.slot_v = self._grow(self.slot_v, count, length)

    def reserve_segments(self, count: int, length: int) -> None:
        self.seg_k = self._grow(self.seg_k, count, length)
        self.seg_v = self._grow(self.seg_v, count, length)

    @property
    def n_slots(self) -> int:
        return len(self.slot_len)

    def bytes_allocated(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.seg_k, self.seg_v, self.slot_k, self.slot_v))

    # -- bookkeeping -----------------------------------------------------------------------
    def add_segment(self, ids) -> int:
        self.segments.append(Segment(tuple(ids)))
        self.reserve_segments(len(self.segments), len(ids))
        return len(self.segments) - 1

    def find_segment(self, ids) -> int | None:
        """The longest segment in use that is a proper prefix of `ids` (the sequence keeps at
        least one private token: its logits come from the private prefill)."""
        best, best_len = None, 0
        for i, seg in enumerate(self.segments):
            n = len(seg.ids)
            if best_len < n < len(ids) and tuple(ids[:n]) == seg.ids:
                best, best_len = i, n
        return best

    def add_slot(self, segment: int | None) -> int:
        self.slot_len.append(0)
        self.slot_seg.append(segment)
        if segment is not None:
            self.segments[segment].refs += 1
        return len(self.slot_len) - 1

    def segment_len(self, slot: int) -> int:
        seg = self.slot_seg[slot]
        return 0 if seg is None else len(self.segments[seg].ids)

    def detach_segment(self, slot: int) -> None:
        seg = self.slot_seg[slot]
        if seg is None:
            return
        self.slot_seg[slot] = None
        self.segments[seg].refs -= 1
        if self.segments[seg].refs == 0:
            self._remove_segment(seg)

    def _remove_segment(self, seg: int) -> None:
        last = len(self.segments) - 1
        if seg != last:  # move the last segment into the hole: segments in use stay 0..S-1
            self.seg_k[:, seg] = self.seg_k[:, last]
            self.seg_v[:, seg] = self.seg_v[:, last]
            self.segments[seg] = self.segments[last]
            self.slot_seg = [seg if s == last else s for s in self.slot_seg]
        self.segments.pop()

    def remove_slot(self, slot: int) -> int | None:
        """Free `slot`; the last slot moves into its place. Returns the old index of the moved
        slot (None when `slot` was the last)."""
        self.detach_segment(slot)
        last = self.n_slots - 1
        moved = None
        if slot != last:
            n = self.slot_len[last]
            self.slot_k[:, slot, :, :n] = self.slot_k[:, last, :, :n]
            self.slot_v[:, slot, :, :n] = self.slot_v[:, last, :, :n]
            self.slot_len[slot], self.slot_seg[slot] = n, self.slot_seg[last]
            moved = last
        self.slot_len.pop()
        self.slot_seg.pop()
        return moved

    # -- prefill ---------------------------------------------------------------------------
    def prefill_attend(self, jobs: list[PrefillJob], scale: float):
        """`attend` for a packed prefill of `jobs` (tokens of job j at [offset, offset + n)).

        Each job's tokens attend causally to themselves after their context: for a segment
        job its earlier tokens; for a slot job its segment and its earlier private tokens.
        Where the CPU kernels run, a job is one block of the training attention's kind
        (`_prefill_job`); elsewhere one masked flash call over the context and the new tokens.
        """
        kernel = self.decode_kernel()
        masks: dict[int, torch.Tensor] = {}  # per job: the same in every layer, built at the first

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out = torch.empty_like(q)
            g = q.shape[1] // k.shape[1]
            for j, job in enumerate(jobs):
                a, b = job.offset, job.offset + job.n
                kbuf, vbuf = (self.seg_k, self.seg_v) if job.kind == "segment" else (self.slot_k, self.slot_v)
                end = job.start + job.n
                kbuf[layer, job.index, :, job.start:end] = k[a:b].transpose(0, 1)
                vbuf[layer, job.index, :, job.start:end] = v[a:b].transpose(0, 1)
                if kernel is not None:
                    out[a:b] = self._prefill_job(kernel, layer, job, q[a:b], kbuf, vbuf, scale)
                    continue
                keys, values = kbuf[layer, job.index, :, :end], vbuf[layer, job.index, :, :end]
                if job.segment is not None:
                    n_seg = len(self.segments[job.segment].ids)
                    keys = torch.cat([self.seg_k[layer, job.segment, :, :n_seg], keys], dim=1)
                    values = torch.cat([self.seg_v[layer, job.segment, :, :n_seg], values], dim=1)
                if j not in masks:
                    masks[j] = grouped_causal_mask(job.n, keys.shape[1], g, q.dtype, q.device)
                out[a:b] = grouped_causal_attention(q[a:b], keys, values, masks[j], scale)
            return out
        return attend

    def _prefill_job(self, kernel, layer: int, job: PrefillJob, q: torch.Tensor, kbuf: torch.Tensor,
                     vbuf: torch.Tensor, scale: float) -> torch.Tensor:
        """One job's prefill attention as one block of the training attention's kind: its keys
        (the segment, the private tokens before `job.start`, then its own) laid end to end, the
        scores by one oneDNN product, the causal softmax by the CPU kernels' `causal_softmax_`
        (the new tokens are the last n of the keys) and the product with V; q (n, H, d).

        It replaced a kernel call for the context, a flash call for the new tokens' causal part
        and the merge of the two (about 1.9 ms per layer for 166 new tokens after ~1,000): the
        multi-turn benchmark's prefill went 6.9 -> 5.6-5.9 s (docs/performance.md). The scores
        are rounded to bf16 by the product, as in the training forward's blocks, where the
        decode kernel keeps them in fp32."""
        n, H, d = q.shape
        KV = kbuf.shape[2]
        g = H // KV
        qf = q.view(n, KV, g, d).permute(1, 2, 0, 3).reshape(KV, g * n, d)  # head h = kv * g + j
        end = job.start + job.n
        keys, values = kbuf[layer, job.index, :, :end], vbuf[layer, job.index, :, :end]
        if job.segment is not None:
            n_seg = len(self.segments[job.segment].ids)
            keys = torch.cat([self.seg_k[layer, job.segment, :, :n_seg], keys], dim=1)
            values = torch.cat([self.seg_v[layer, job.segment, :, :n_seg], values], dim=1)
        ctx = keys.shape[1] - n
        if n <= PREFILL_BLOCK:
            out = causal_block_attention(kernel, qf, keys, values, n, scale)[0]
        else:  # query blocks, each with the keys up to its last query: bounded score memory
            qb = qf.view(KV, g, n, d)
            out = torch.empty(KV, g, n, d, dtype=q.dtype, device=q.device)
            for a in range(0, n, PREFILL_BLOCK):
                b = min(n, a + PREFILL_BLOCK)
                out[:, :, a:b] = causal_block_attention(kernel, qb[:, :, a:b].reshape(KV, g * (b - a), d),
                                                        keys[:, :ctx + b], values[:, :ctx + b], b - a,
                                                        scale)[0].view(KV, g, b - a, d)
        return out.view(KV, g, n, d).permute(2, 0, 1, 3).reshape(n, H, d)

    # -- decode ----------------------------------------------------------------------------
    def decode_kernel(self):
        """The AVX-512 decode-attention extension when it serves this cache, else None."""
        return decode_kernel_for(self.dtype, self.head_dim, self.device)

    def decode_plan(self, n_heads: int) -> DecodePlan:
        """Index tensors for a decode step in which every slot in use appends one token."""
        B, dev = self.n_slots, self.device
        kernel = self.decode_kernel()
        lens = torch.tensor(self.slot_len, device=dev)
        read = _round_up(max(self.slot_len) + 1, 64)  # rounded: fewer distinct shapes
        self.reserve_slots(B, read)
        # new key of (row b, head h) goes to flat row ((b * KV) + h) * capacity + len_b
        cap, KV = self.slot_k.shape[3], self.n_kv_heads
        heads = torch.arange(KV, device=dev)
        write_rows = ((torch.arange(B, device=dev)[:, None] * KV + heads) * cap + lens[:, None]).reshape(-1)
        plan = DecodePlan(write_rows=write_rows, slot_len=read, slot_mask=None, slot_keys=lens + 1,
                          n_seg=len(self.segments), seg_len=0, seg_keys=None, row_seg=None)
        if self.segments:
            seg_lens = [len(s.ids) for s in self.segments]
            plan.seg_len = max(seg_lens)
            plan.seg_keys = torch.tensor(seg_lens, device=dev)
            plan.row_seg = torch.tensor([-1 if s is None else s for s in self.slot_seg], device=dev)
        if kernel is None:
            self._flash_plan(plan)
        return plan

    def _flash_plan(self, plan: DecodePlan) -> None:
        """Masks and the (segment, rank) grid of the flash path: the rows sharing a segment
        become one query block against its keys."""
        B, dev = self.n_slots, self.device
        lens = plan.slot_keys - 1
        plan.slot_mask = torch.where(torch.arange(plan.slot_len, device=dev)[None] <= lens[:, None], 0.0,
                                     NEG_INF)[:, None, None, :]
        if not self.segments:
            return
        members: list[list[int]] = [[] for _ in self.segments]
        for row, seg in enumerate(self.slot_seg):
            if seg is not None:
                members[seg].append(row)
        R = max(len(m) for m in members)
        places, back = [], [0] * B
        for s, m in enumerate(members):
            for r, row in enumerate(m):
                back[row] = s * R + r
            places.extend(m + [B] * (R - len(m)))
        plan.seg_mask = torch.where(torch.arange(plan.seg_len, device=dev)[None] < plan.seg_keys[:, None],
                                    0.0, NEG_INF)[:, None, None, :]
        plan.seg_rows = torch.tensor(places, device=dev)
        plan.seg_back = torch.tensor(back, device=dev)
        plan.group = R
        plan.has_seg = (plan.row_seg >= 0)[:, None, None]

    def decode_attend(self, plan: DecodePlan, scale: float):
        """`attend` for one token per slot: writes its K/V at the slot's next position, then
        attends over the slot's segment and its private tokens."""
        kernel = self.decode_kernel()

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            B, H, d = q.shape
            KV = k.shape[1]
            g = H // KV
            # index_copy_ on the flat view: advanced-index assignment took 0.3 ms per call here
            self.slot_k[layer].view(-1, d).index_copy_(0, plan.write_rows, k.reshape(B * KV, d))
            self.slot_v[layer].view(-1, d).index_copy_(0, plan.write_rows, v.reshape(B * KV, d))
            # GQA: the g query heads of one KV head act as g queries of that head
            qg = q.view(B, KV, g, d)
            if kernel is not None:  # one call: segment and private keys under one softmax
                if plan.n_seg:
                    out, _ = kernel.decode_attention_with_prefix(
                        qg.contiguous(), self.slot_k[layer, :B], self.slot_v[layer, :B], plan.slot_keys,
                        self.seg_k[layer], self.seg_v[layer], plan.row_seg, plan.seg_keys, scale)
                else:
                    out, _ = kernel.decode_attention(qg.contiguous(), self.slot_k[layer, :B], self.slot_v[layer, :B],
                                                     plan.slot_keys, scale)
                return out.reshape(B, H, d)
            out, lse = attention_with_lse(qg, self.slot_k[layer, :B, :, :plan.slot_len],
                                          self.slot_v[layer, :B, :, :plan.slot_len], plan.slot_mask, scale)
            if plan.n_seg:
                # rows sharing a segment become one query block: (S, KV, R * g, d), attended
                # separately and merged with the private part by their log-sum-exps
                S, R = plan.n_seg, plan.group
                padded = torch.cat([qg, qg.new_zeros(1, KV, g, d)])[plan.seg_rows]
                qs = padded.view(S, R, KV, g, d).transpose(1, 2).reshape(S, KV, R * g, d)
                out_s, lse_s = attention_with_lse(qs, self.seg_k[layer, :S, :, :plan.seg_len],
                                                  self.seg_v[layer, :S, :, :plan.seg_len], plan.seg_mask, scale)
                out_s = out_s.view(S, KV, R, g, d).transpose(1, 2).reshape(S * R, KV, g, d)[plan.seg_back]
                lse_s = lse_s.view(S, KV, R, g).transpose(1, 2).reshape(S * R, KV, g)[plan.seg_back]
                lse_s = lse_s.masked_fill(~plan.has_seg, NEG_INF)
                out = merge_attention(out, lse, out_s, lse_s)
            return out.reshape(B, H, d)
        return attend
