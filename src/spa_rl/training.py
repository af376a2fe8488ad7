"""Training helpers shared by the SFT and PPO recipes: packed rows, log-probs, the learning rate
schedule, random state (checkpoints: `spa_rl.artifacts`).

The training forward (`token_logprobs`, `packed_hidden_states`), in the order it runs:

1. Packing (`pack_rows`): the real tokens of a padded (B, T) batch are laid end to end in one
   row, with position ids restarting at 0 for every row and no attention mask. No compute is
   spent on pads, and micro-batches are bounded by tokens instead of rows x longest row. A
   prefix that rows share (the system prompt, a group's first prompt) is packed once and the
   rows that continue it attend to it (`pack_rows(share_prefixes=True)`, via `pack_for`).
2. Attention within rows only. transformers 5.x reads restarting position ids without a mask as
   packed sequences and builds a block-diagonal causal mask itself, which is correct but dense
   (N x N for N packed tokens) and turns off the fused causal kernels. `packed_forward` also
   passes the flash-attention style `cu_seq_lens_*` row offsets; a model on sdpa is switched to
   `_packed_sdpa_attention`, which runs causal attention row by row (`packed_causal_attention`)
   and is plain sdpa for everything else (generation, masks, caches). On CPU the rows go through
   query blocks (`_PackedCausalAttention`): two oneDNN products each, with the float32 softmax
   between them done by our CPU kernels (`spa_rl.kernels`) on AVX-512, or fused by
   torch.compile elsewhere. flash-attention models on a GPU read the same offsets natively.
3. The LM head only where a loss is taken. A causal LM's `forward` computes logits (B, T, V) for
   every position; with SmolLM2's 49,152-token vocabulary that tensor, its softmax and its
   gradient dominate training memory (MODELS.md), although only the positions whose next token
   is trained matter. The hidden states of those positions are gathered and the head runs on
   them in chunks (`head_logprobs`); for a plain linear head the chunk's log-softmax, entropy and
   their backward are one autograd function (`_LinearHeadLogprobs`) that keeps only the (n, H)
   hidden chunk and recomputes its (n, V) logits once in backward, so peak extra memory is one
   chunk of logits whatever the number of trained tokens.
4. `temperature` divides the logits before the softmax, as the sampler does
   (`rollout.backend.sample_next`): PPO must score its rollouts at the sampling temperature for
   the ratio to compare like with like.

Conventions: `positions_mask[b, i]` (like `TokenSequence.loss_mask`) marks token i as a
target, i.e. the log-prob returned at (b, i) is log p(input_ids[b, i] | input_ids[b, :i]).
Position 0 has no context and is never a target.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from spa_rl import kernels




# ---- batching --------------------------------------------------------------------------------


def pad_batch(ids: Sequence[Sequence[int]], masks: Sequence[Sequence[int]], pad_id: int):
    """Right-pad sequences into tensors: input_ids (B, T), attention_mask (B, T), loss_mask (B, T).

    Right padding keeps every row's positions 0..len-1, so no position ids are needed and a
    padded row computes exactly what it would alone (causal attention never looks right).
    """
    T = max(len(x) for x in ids)
    B = len(ids)
    input_ids = torch.full((B, T), int(pad_id), dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    loss_mask = torch.zeros((B, T), dtype=torch.bool)
    for b, (x, m) in enumerate(zip(ids, masks)):
        if len(x) != len(m):
            raise ValueError(f"row {b}: {len(x)} ids but {len(m)} mask entries")
        input_ids[b, :len(x)] = torch.tensor(list(x), dtype=torch.long)
        attention[b, :len(x)] = 1
        loss_mask[b, :len(x)] = torch.tensor(list(m), dtype=torch.bool)
    return input_ids, attention, loss_mask


# ---- log-probs -------------------------------------------------------------------------------


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant checkpoints).
    transformers 5.x renamed `gradient_checkpointing_enable` (now deprecated, with a warning on
    every call) to `activation_checkpointing_enable`; early 5.x releases only have the old name."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def backbone_and_head(model):
    """(backbone, lm_head) of a Hugging Face causal LM, also through a peft wrapper (whose
    attribute lookups reach the wrapped model; LoRA layers sit inside both parts)."""
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if backbone is None or head is None:
        raise TypeError(f"{type(model).__name__} has no decoder/output-embedding accessors; "
                        "token_logprobs needs a Hugging Face causal LM")
    return backbone, head


def _chunk_logprobs(head, softcap: float | None, temperature: float, want_entropy: bool,
                    hidden: torch.Tensor, targets: torch.Tensor):
    # The generic path (any head module, logit softcapping): autograd through the head, used
    # under activation checkpointing. hidden (n, H), targets (n,) -> logprobs (n,) [, entropy (n,)]
    logits = head(hidden).float()  # (n, V)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(1, targets[:, None])[:, 0] - lse
    if not want_entropy:
        return logprobs, None
    probs = torch.softmax(logits, dim=-1)
    entropy = lse - (probs * logits).sum(-1)
    return logprobs, entropy


def _compute_dtype(t: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's when it is on (as `F.linear` would)."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return weight.dtype


class _LinearHeadLogprobs(torch.autograd.Function):
    """log p(target) (and the entropy) of softmax(hidden @ W^T / temperature), with a hand-written
    backward. Autograd through `logsumexp` would keep or recompute the (n, V) float32 logits and
    run several V-sized passes (exp, sub, mul) in its backward; here the backward recomputes the
    logits once and forms dlogits = g * (onehot - p) (plus the entropy term) in place. Profiled
    on a SmolLM2 SFT step (616 trained tokens, 49,152-token vocabulary): 0.56 s for the whole
    head, matmuls included, where logsumexp's forward, recompute and backward alone took 1.4 s.
    Saved for backward: the (n, H) hidden chunk and one float per row."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature: float, want_entropy: bool, dtype):
        logits = _scaled_logits(hidden, weight, temperature, dtype)  # (n, V) float32
        lse = torch.logsumexp(logits, dim=-1)
        logprobs = logits.gather(1, targets[:, None])[:, 0] - lse
        if want_entropy:
            probs = torch.exp(logits - lse[:, None])
            entropy = lse - (probs * logits).sum(-1)  # H = lse - sum_v p_v z_v
        else:
            entropy = lse.new_zeros(lse.shape)
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.temperature, ctx.want_entropy, ctx.dtype = temperature, want_entropy, dtype
        if not want_entropy:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        dtype, temperature = ctx.dtype, ctx.temperature
        with torch.autocast(hidden.device.type, enabled=False):
            z = _scaled_logits(hidden, weight, temperature, dtype)  # (n, V) float32, recomputed
            g = grad_logprobs.float() if grad_logprobs is not None else lse.new_zeros(lse.shape)
            if ctx.want_entropy and grad_entropy is not None:
                # dH/dz = -p (z - lse + H): coefficient c = g + g_H (z - lse + H), dz = onehot*g - p*c
                p = torch.exp(z - lse[:, None])
                z.sub_((lse - entropy)[:, None]).mul_(grad_entropy.float()[:, None]).add_(g[:, None])
                dz = p.mul_(z).neg_()
                del z
            else:
                dz = z.sub_(lse[:, None]).exp_().mul_(-g[:, None])  # -g p, in the logits' buffer
            dz.scatter_add_(1, targets[:, None], g[:, None])  # + g at the target
            if temperature != 1.0:
                dz.div_(temperature)
            dz = dz.to(dtype)
            grad_hidden = (dz @ weight.to(dtype)).to(hidden.dtype) if ctx.needs_input_grad[0] else None
            grad_weight = (dz.t() @ hidden.to(dtype)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None, None, None


def _scaled_logits(hidden, weight, temperature: float, dtype) -> torch.Tensor:
    logits = F.linear(hidden.to(dtype), weight.to(dtype)).float()
    return logits.div_(temperature) if temperature != 1.0 else logits


def head_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                  return_entropy: bool = False, chunk_size: int = 1024):
    """Log-probs of `targets` (n,) under the LM head applied to `hidden` (n, H), at `temperature`,
    in chunks of `chunk_size` rows; with `return_entropy`, also the entropy per row. Float32,
    differentiable. A plain bias-free linear head (Llama, Qwen, SmolLM2) takes the fused path
    (`_LinearHeadLogprobs`); other heads (LoRA-wrapped, biased, soft-capped) autograd through the
    head under activation checkpointing, so only one chunk of logits is alive in backward."""
    _, head = backbone_and_head(model)
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    fused = type(head) is torch.nn.Linear and head.bias is None and not softcap
    dtype = _compute_dtype(hidden, head.weight) if fused else None
    lps, ents = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if fused:
            lp, ent = _LinearHeadLogprobs.apply(h, head.weight, t, float(temperature), return_entropy, dtype)
        elif torch.is_grad_enabled():
            lp, ent = checkpoint(_chunk_logprobs, head, softcap, temperature, return_entropy, h, t, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(head, softcap, temperature, return_entropy, h, t)
        lps.append(lp)
        ents.append(ent)
    empty = hidden.new_zeros((0,), dtype=torch.float32)
    logprobs = torch.cat(lps) if lps else empty
    if not return_entropy:
        return logprobs
    return logprobs, (torch.cat(ents) if ents else empty)


# ---- packed rows -----------------------------------------------------------------------------


@dataclass
class PackedRows:
    """The real tokens of a (B, T) batch laid end to end in one row (no padding), each shared
    prefix once.

    input_ids, position_ids: (1, N) the packed tokens; position ids count from each row's start,
    so rotary embeddings see each row as if it were alone. cu_seqlens (R+1,) int32: packed row
    r's own tokens occupy [cu_seqlens[r], cu_seqlens[r+1]) (empty rows dropped). contexts: None,
    or per packed row the spans [start, end) of packed tokens that come before its own tokens
    (a prefix it shares with an earlier row, `pack_rows`); its queries attend to those keys,
    then causally to its own. rows, cols (M,): every real token of the dense (B, T) layout, row
    after row; index (M,): where each of them sits in the packed sequence (several real tokens
    map to one packed token when their rows share it); position (M,): its position in its row.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_length: int
    rows: torch.Tensor
    cols: torch.Tensor
    shape: tuple[int, int]
    index: torch.Tensor
    position: torch.Tensor
    contexts: tuple[tuple[tuple[int, int], ...], ...] | None = None


MIN_SHARED_PREFIX = 32
"""Shortest common prefix `pack_rows` shares: below it, the saved compute is smaller than the
per-row overhead of attending to a separate context."""


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, share_prefixes: bool = False,
              min_shared: int = MIN_SHARED_PREFIX) -> PackedRows:
    """Pack the tokens where `attention_mask` is 1, row after row (left, right or no padding; a
    hole in a row is dropped, so positions count the row's real tokens, as a mask would).

    With `share_prefixes`, a row whose first L >= `min_shared` tokens equal an earlier row's
    (the longest such match; RL groups share their prompt, every episode the system prompt)
    packs only its tokens from L on, and attends to the earlier row's packed copies of the
    first L (`PackedRows.contexts`). Causal attention makes the hidden states of a prefix the
    same in every row that has it, so this computes the same values with the prefix's layers
    run once, and autograd sums the prefix's gradient over the rows that read it. A row always
    keeps at least its last token as its own."""
    keep = attention_mask.bool()
    rows, cols = keep.nonzero(as_tuple=True)  # row-major: row 0's tokens, then row 1's, ...
    lengths = keep.sum(1)
    position = (keep.long().cumsum(1) - 1)[rows, cols]
    tokens = input_ids[rows, cols]
    shape = (input_ids.shape[0], input_ids.shape[1])
    if not share_prefixes or input_ids.shape[0] < 2:
        nonempty = lengths[lengths > 0]
        cu = F.pad(nonempty.cumsum(0), (1, 0)).to(torch.int32)
        return PackedRows(input_ids=tokens[None], position_ids=position[None], cu_seqlens=cu,
                          max_length=int(nonempty.max()) if len(nonempty) else 0, rows=rows, cols=cols, shape=shape,
                          index=torch.arange(len(tokens), device=tokens.device), position=position)
    return _pack_sharing_prefixes(tokens, rows, cols, position, lengths, shape, min_shared)


def _truncate_spans(spans: list[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    """The leading `length` tokens of a path of packed spans."""
    out = []
    for a, b in spans:
        if length <= 0:
            break
        out.append((a, min(b, a + length)))
        length -= b - a
    return out


def _pack_sharing_prefixes(tokens, rows, cols, position, lengths, shape, min_shared: int) -> PackedRows:
    device = tokens.device
    B = len(lengths)
    lens = lengths.tolist()
    longest = max(lens)
    aligned = torch.full((B, longest), -1, dtype=tokens.dtype, device=device)  # real tokens, left-aligned
    aligned[rows, position] = tokens
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    paths: list[list[tuple[int, int]]] = []  # per row: the packed spans that spell its tokens, in order
    contexts, own_lengths, packed_parts, index_parts = [], [], [], []
    packed = 0
    for r, n in enumerate(lens):
        if n == 0:
            paths.append([])
            continue
        shared, context = 0, []
        if r > 0:
            same = (aligned[:r, :n] == aligned[r, :n]).long().cumprod(1).sum(1)  # common prefix with each earlier row
            best = int(same.argmax())
            shared = min(int(same[best]), n - 1)
            if shared >= min_shared:
                context = _truncate_spans(paths[best], shared)
            else:
                shared = 0
        own = (packed, packed + n - shared)
        paths.append(context + [own])
        contexts.append(tuple(context))
        own_lengths.append(n - shared)
        packed_parts.append(torch.arange(starts[r] + shared, starts[r] + n, device=device))
        index_parts.extend(torch.arange(a, b, device=device) for a, b in context)
        index_parts.append(torch.arange(*own, device=device))
        packed = own[1]
    chosen = torch.cat(packed_parts)
    cu = F.pad(torch.tensor(own_lengths, device=device).cumsum(0), (1, 0)).to(torch.int32)
    return PackedRows(input_ids=tokens[chosen][None], position_ids=position[chosen][None], cu_seqlens=cu,
                      max_length=max(lens), rows=rows, cols=cols, shape=shape, index=torch.cat(index_parts),
                      position=position, contexts=tuple(contexts) if any(contexts) else None)


PACKED_ATTENTION = "spa_packed_sdpa"
ROW_CONTEXTS = "spa_row_contexts"  # the keyword that carries PackedRows.contexts to the attention function
ATTENTION_BLOCK = 256  # query rows per block of the CPU attention kernel


def _attention_block_forward(q, k, v, scale: float):
    """One block of causal attention for queries start..start+L of one row.

    q (Hkv, G, L, D): the G query heads that share each key/value head; k, v (Hkv, E, D): the
    row's keys and values up to the block's last query (E = start + L). Returns the output
    (Hkv, G, L, D) and the log-sum-exp of the scores (Hkv, G, L), float32, for the backward.
    Scores, softmax and its statistics are float32; the two matmuls run in the input dtype.
    The softmax is normalised after the product with V, on the (L, D) output instead of the
    (L, E) weights: one exp per score instead of two (`logsumexp`, then the weights), and one
    pass over the scores fewer. The causal mask is built inside (`_future_mask`: index
    comparisons that inductor fuses into the softmax loop); passed in as a bool tensor, it
    had made that loop 2.1x slower (3.86 vs 1.82 ms for a 256-query block over 1,200 keys).
    """
    Hkv, G, L, D = q.shape
    E = k.shape[1]
    scores = torch.bmm(q.reshape(Hkv, G * L, D), k.transpose(1, 2)).float().view(Hkv, G, L, E) * scale
    scores = scores.masked_fill(_future_mask(L, E, q.device), float("-inf"))
    peak = scores.amax(dim=-1, keepdim=True)  # every query sees its own key: finite
    weights = torch.exp(scores - peak)
    total = weights.sum(dim=-1)
    out = torch.bmm(weights.to(q.dtype).view(Hkv, G * L, E), v).view(Hkv, G, L, D)
    return (out.float() / total[..., None]).to(q.dtype), peak[..., 0] + torch.log(total)


def _attention_block_backward(q, k, v, grad_out, lse, delta, scale: float):
    """Gradients of one block (see `_attention_block_forward`): recompute the probabilities
    from the saved log-sum-exp, then dV = P^T dO, dS = P (dO V^T - delta), dQ = dS K, dK = dS^T Q
    (delta = rowsum(dO * O), the softmax backward's correction)."""
    Hkv, G, L, D = q.shape
    E = k.shape[1]
    q2, do2 = q.reshape(Hkv, G * L, D), grad_out.reshape(Hkv, G * L, D)
    scores = torch.bmm(q2, k.transpose(1, 2)).float().view(Hkv, G, L, E) * scale
    probs = torch.exp(scores - lse[..., None]).masked_fill(_future_mask(L, E, q.device), 0.0)
    grad_v = torch.bmm(probs.to(q.dtype).view(Hkv, G * L, E).transpose(1, 2), do2)
    grad_p = torch.bmm(do2, v.transpose(1, 2)).float().view(Hkv, G, L, E)
    grad_s = ((grad_p - delta[..., None]) * probs * scale).to(q.dtype).view(Hkv, G * L, E)
    grad_q = torch.bmm(grad_s, k).view(Hkv, G, L, D)
    grad_k = torch.bmm(grad_s.transpose(1, 2), q2)
    return grad_q, grad_k, grad_v


def _attention_block_forward_cpu(ops, q, k, v, scale: float):
    """`_attention_block_forward` with the softmax between the two products done by the CPU
    kernels' `causal_softmax_` in place on the bf16 scores (`kernels.causal_block_attention`):
    the same steps and roundings, each score read and written once. Compiled by inductor, that
    softmax loop had taken longer than the block's two products."""
    Hkv, G, L, D = q.shape
    out, lse = kernels.causal_block_attention(ops, q.reshape(Hkv, G * L, D), k, v, L, scale)
    return out.view(Hkv, G, L, D), lse.view(Hkv, G, L)


def _attention_block_backward_cpu(ops, q, k, v, grad_out, lse, delta, scale: float):
    """`_attention_block_backward` with its elementwise part (probabilities from the saved
    log-sum-exp, masked; the scores' gradient) done by `causal_softmax_backward_` in place."""
    Hkv, G, L, D = q.shape
    q2, do2 = q.reshape(Hkv, G * L, D), grad_out.reshape(Hkv, G * L, D)
    probs = torch.bmm(q2, k.transpose(1, 2))  # the scores until the kernel turns them into P
    grad_s = torch.bmm(do2, v.transpose(1, 2))  # dP until the kernel turns it into dS
    ops.causal_softmax_backward_(probs, grad_s, lse.reshape(Hkv, G * L).contiguous(),
                                 delta.reshape(Hkv, G * L).contiguous(), L, scale)
    grad_v = torch.bmm(probs.transpose(1, 2), do2)
    grad_q = torch.bmm(grad_s, k).view(Hkv, G, L, D)
    grad_k = torch.bmm(grad_s.transpose(1, 2), q2)
    return grad_q, grad_k, grad_v


def _block_functions(dtype: torch.dtype, device: torch.device):
    """The forward and backward of one query block for products in `dtype` on `device`: the
    CPU kernels' passes where they apply (bf16 on an AVX-512 CPU), else the torch.compile'd
    blocks (`_kernel`)."""
    ops = kernels.training_attention_ops(dtype, device)
    if ops is None:
        return _kernel(_attention_block_forward), _kernel(_attention_block_backward)
    return (lambda *a: _attention_block_forward_cpu(ops, *a)), (lambda *a: _attention_block_backward_cpu(ops, *a))


def _future_mask(length: int, keys: int, device) -> torch.Tensor:
    """(length, keys) bool: True where key j comes after query i of a block whose queries are
    the last `length` of `keys` positions."""
    start = keys - length
    return torch.arange(keys, device=device)[None, :] > torch.arange(start, keys, device=device)[:, None]


_COMPILED: dict[str, Any] = {}


def _kernel(fn):
    """`fn` compiled by torch.compile (dynamic shapes: one graph for every row and block
    length), or `fn` itself where compiling is off (SPA_RL_COMPILE=0) or fails (no C++
    compiler, an unsupported platform): then the same math runs eagerly, correct but slower.

    Why compile: eagerly, the float32 score block makes about ten memory passes between the two
    matmuls (cast, scale, mask, max, exp, sum, cast...), and this block attention is no faster
    than PyTorch's CPU flash kernel; inductor fuses those passes, and the compiled blocks run a
    SmolLM2-shaped row (1,450 tokens, 9 query / 3 KV heads, bf16) 2.2x faster than the flash
    kernel, forward plus backward (28 vs 62 ms per layer). Compiling takes about 25 s once per
    process on 2 cores (less with inductor's on-disk cache)."""
    name = fn.__name__
    if name not in _COMPILED:
        _COMPILED[name] = fn
        if os.environ.get("SPA_RL_COMPILE", "1") != "0":
            _COMPILED[name] = torch.compile(fn, dynamic=True)
    compiled = _COMPILED[name]

    def run(*args):
        if compiled is fn or args[0].shape[2] == 1:
            # a one-query block (a row of 256k + 1 tokens) would get a graph of its own (sizes
            # 0 and 1 are specialised) for a negligible amount of work
            return fn(*args)
        try:
            return compiled(*args)
        except Exception as exc:  # a platform inductor cannot build for: run eagerly from now on
            import warnings

            warnings.warn(f"torch.compile of {name} failed ({type(exc).__name__}: {exc}); running it eagerly")
            _COMPILED[name] = fn
            return fn(*args)

    return run


def _query_blocks(k, v, bounds: tuple[int, ...], contexts):
    """The query blocks of `_PackedCausalAttention`, for its forward and its backward alike:
    (key spans, block start s, block end e, the block's keys, its values). A
    block's keys are those of its key spans laid end to end: the row's context spans, then the
    row's own tokens from its start a up to e."""
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        spans = contexts[i] if contexts else ()
        for s in range(a, b, ATTENTION_BLOCK):
            e = min(b, s + ATTENTION_BLOCK)
            key_spans = spans + ((a, e),)
            keys = torch.cat([k[:, c0:c1] for c0, c1 in key_spans], dim=1) if spans else k[:, a:e]
            values = torch.cat([v[:, c0:c1] for c0, c1 in key_spans], dim=1) if spans else v[:, a:e]
            yield key_spans, s, e, keys, values


class _PackedCausalAttention(torch.autograd.Function):
    """Causal attention within each row of a packed sequence, in query blocks of
    `ATTENTION_BLOCK`, flash-attention style: the forward keeps only the output and the
    log-sum-exp per query, the backward recomputes each block's probabilities. A block's keys
    stop at its last query, so (apart from the diagonal blocks) no score above the diagonal is
    computed, and no key of another row ever is, except a shared prefix's.

    q (Hkv, G, N, D), k, v (Hkv, N, D); bounds: the rows' [start, end) offsets in N; contexts:
    None or per row the spans of earlier packed tokens (a shared prefix, `pack_rows`) that
    precede the row's own tokens: its queries attend to them before their own causal keys, and
    their keys and values receive the row's gradient."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float, bounds: tuple[int, ...], contexts=None):
        # One compute dtype for the matmuls, here and in the backward (which runs outside any
        # autocast region): under autocast, rotary embeddings leave q and k float32 while v
        # is bfloat16, and autocast would have run the products in bfloat16.
        dtype = torch.get_autocast_dtype(q.device.type) if torch.is_autocast_enabled(q.device.type) else q.dtype
        ctx.in_dtypes = (q.dtype, k.dtype, v.dtype)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        block = _block_functions(dtype, q.device)[0]
        with torch.autocast(q.device.type, enabled=False):
            for _, s, e, keys, values in _query_blocks(k, v, bounds, contexts):
                out[:, :, s:e], lse[:, :, s:e] = block(q[:, :, s:e], keys, values, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.bounds, ctx.contexts = scale, bounds, contexts
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        grad_out = grad_out.to(q.dtype).contiguous()
        delta = (grad_out.float() * out.float()).sum(-1)  # (Hkv, G, N)
        grad_q = torch.empty_like(q)
        grad_k = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        grad_v = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        block = _block_functions(q.dtype, q.device)[1]
        for key_spans, s, e, keys, values in _query_blocks(k, v, ctx.bounds, ctx.contexts):
            gq, gk, gv = block(q[:, :, s:e], keys, values, grad_out[:, :, s:e], lse[:, :, s:e], delta[:, :, s:e],
                               ctx.scale)
            grad_q[:, :, s:e] = gq
            at = 0
            for c0, c1 in key_spans:  # a shared prefix's keys and values get every reading row's share
                grad_k[:, c0:c1] += gk[:, at:at + c1 - c0]
                grad_v[:, c0:c1] += gv[:, at:at + c1 - c0]
                at += c1 - c0
        dq, dk, dv = ctx.in_dtypes
        return grad_q.to(dq), grad_k.to(dk), grad_v.to(dv), None, None, None


def packed_causal_attention(query, key, value, cu_seqlens, scale: float, contexts=None) -> torch.Tensor:
    """Causal attention of each packed row with itself (after its context spans, when
    `contexts` gives them: `PackedRows.contexts`). query (1, H, N, D), key/value (1, Hkv, N, D)
    (grouped-query heads: query head h reads key/value head h // (H / Hkv)), cu_seqlens (R+1,)
    row offsets. Returns (1, H, N, D).

    CPU in bf16/fp16 (autocast or half inputs): `_PackedCausalAttention` (query blocks; with
    torch.compile'd softmax passes 1.1-2.2x faster than the CPU flash kernel, forward plus
    backward, on SmolLM2 and tiny-model rows, and faster again with the CPU kernels' passes in
    bf16: docs/performance.md). Otherwise `scaled_dot_product_attention` on each row: the fused causal
    kernel (in float32 the CPU flash kernel was the faster one, 1.3-1.9x, and a GPU's flash
    kernels are fast), or, for a row with a context, an explicit mask that lets every query see
    the whole context."""
    bounds = tuple(int(x) for x in cu_seqlens.tolist())
    H, N, D = query.shape[1:]
    Hkv = key.shape[1]
    device = query.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    if device == "cpu" and dtype in (torch.bfloat16, torch.float16):
        q = query[0].reshape(Hkv, H // Hkv, N, D)
        out = _PackedCausalAttention.apply(q, key[0], value[0], float(scale), bounds, contexts)
        return out.reshape(1, H, N, D)
    outs = []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        spans = contexts[i] if contexts else ()
        if not spans:
            outs.append(F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], scale=scale,
                                                       is_causal=True, enable_gqa=H != Hkv))
            continue
        keys = torch.cat([key[:, :, c0:c1] for c0, c1 in spans] + [key[:, :, a:b]], dim=2)
        values = torch.cat([value[:, :, c0:c1] for c0, c1 in spans] + [value[:, :, a:b]], dim=2)
        visible = ~_future_mask(b - a, keys.shape[2], query.device)
        outs.append(F.scaled_dot_product_attention(query[:, :, a:b], keys, values, attn_mask=visible, scale=scale,
                                                   enable_gqa=H != Hkv))
    return torch.cat(outs, dim=2)


def _packed_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention function: exact sdpa, plus a varlen path for packed rows.

    With `cu_seq_lens_q` (passed by `packed_forward`), each row of the packed sequence attends
    causally to itself only (`packed_causal_attention`) and `attention_mask` (a placeholder,
    see `packed_forward`) is not read. Anything else (generation, padding masks, caches) goes to
    transformers' sdpa function unchanged, so a model switched to this implementation computes
    what it did before.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if dropout:
        raise NotImplementedError("attention dropout is not supported with packed rows")
    if query.shape[0] != 1 or query.shape[2] != key.shape[2] or query.shape[2] != int(cu[-1]):
        raise ValueError(f"packed rows need one sequence of {int(cu[-1])} tokens and no cache, got query "
                         f"{tuple(query.shape)} and key {tuple(key.shape)}")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = packed_causal_attention(query, key, value, cu, scale, kwargs.get(ROW_CONTEXTS))
    return out.transpose(1, 2).contiguous(), None


def _use_packed_attention(backbone) -> bool:
    """Switch a model that uses sdpa to `_packed_sdpa_attention` (registered once); True when the
    model now runs on it. Models on other implementations keep them: flash-attention reads the
    same `cu_seq_lens_*` arguments natively, and eager/flex get transformers' block-diagonal mask
    from the packed position ids. Models with sliding-window layers keep sdpa too (the row-by-row
    kernel is full causal attention)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = getattr(backbone, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == PACKED_ATTENTION:
        return True
    if current != "sdpa" or any(getattr(m, "sliding_window", None) for m in backbone.modules()):
        return False
    if PACKED_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(PACKED_ATTENTION, _packed_sdpa_attention)
        AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
    if hasattr(backbone, "set_attn_implementation"):
        backbone.set_attn_implementation(PACKED_ATTENTION)
    else:
        config._attn_implementation = PACKED_ATTENTION
    return config._attn_implementation == PACKED_ATTENTION


def share_prefixes_enabled() -> bool:
    """Whether training forwards pack shared prefixes once (`pack_rows`): on unless the
    environment sets SPA_RL_SHARE_PREFIXES=0 (to measure what sharing saves, or to rule it out)."""
    return os.environ.get("SPA_RL_SHARE_PREFIXES", "1") != "0"


def pack_for(backbone, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PackedRows:
    """`pack_rows` for this backbone: prefixes shared where its attention reads `contexts`
    (`_packed_sdpa_attention`); other implementations (flash-attention, eager) know only rows."""
    share = share_prefixes_enabled() and _use_packed_attention(backbone)
    return pack_rows(input_ids, attention_mask, share_prefixes=share)


def packed_forward(backbone, packed: PackedRows) -> torch.Tensor:
    """Last hidden states (N, H) of the packed tokens: each row computes what it would alone.

    Rows are told apart by their restarting position ids with no attention mask, which is what
    transformers 5.x reads as packed sequences (it then builds a block-diagonal causal mask), and
    by the flash-attention style `cu_seq_lens_*` arguments, which `_packed_sdpa_attention` and
    flash-attention use to run causal attention row by row. On `_packed_sdpa_attention` a
    (1, 1, 1, 1) placeholder stands in for the mask: transformers passes a 4-D mask through as
    it is, so it skips building the dense (N, N) block mask (144 MB and a noticeable part of a
    step for 12,000 packed tokens) that the row-by-row kernel would not read. Shared prefixes
    (`packed.contexts`) reach it as the `spa_row_contexts` keyword, which transformers passes
    through to the attention function."""
    own_kernel = _use_packed_attention(backbone)
    if packed.contexts is not None and not own_kernel:
        raise ValueError("rows packed with shared prefixes need the spa_packed_sdpa attention; pack with pack_for")
    cu = packed.cu_seqlens.to(packed.input_ids.device)
    mask = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=cu.device) if own_kernel else None
    extra = {ROW_CONTEXTS: packed.contexts} if packed.contexts is not None else {}
    out = backbone(input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=mask,
                   use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=packed.max_length,
                   max_length_k=packed.max_length, **extra)
    return out.last_hidden_state[0]


def packed_hidden_states(backbone, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states (B, T, H) of a padded batch, computed packed (no compute on pads, each
    shared prefix once); zeros at the pads. For heads other than the LM head (the critic's value
    head)."""
    packed = pack_for(backbone, input_ids, attention_mask)
    hidden = packed_forward(backbone, packed)
    B, T = packed.shape
    dense = hidden.new_zeros((B, T, hidden.shape[-1]))
    return dense.index_put((packed.rows, packed.cols), hidden[packed.index])


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions_mask: torch.Tensor,
                   chunk_size: int = 1024, temperature: float = 1.0, return_entropy: bool = False):
    """Log-probs of the target tokens marked by `positions_mask`, as a dense (B, T) float32
    tensor (0.0 elsewhere); with `return_entropy`, also the (B, T) entropy of the predictive
    distribution at those positions. Differentiable; see the module docstring.

    input_ids, attention_mask, positions_mask: (B, T), any padding side. The rows are packed
    (`pack_for`), so pads cost nothing and shared prefixes are computed once; a token is a
    target when `positions_mask` marks it and it is not its row's first real token.
    `temperature` divides the logits: pass the sampling temperature to score a rollout under
    the distribution it was sampled from (the sampler's log-probs are temperature-scaled;
    `rollout.backend.sample_next`).
    """
    backbone, _ = backbone_and_head(model)
    packed = pack_for(backbone, input_ids, attention_mask)
    hidden = packed_forward(backbone, packed)  # (N, H)
    is_target = positions_mask.bool()[packed.rows, packed.cols] & (packed.position > 0)
    m = is_target.nonzero()[:, 0]  # each target among the real tokens; its context ends at the real token m - 1
    result = head_logprobs(model, hidden[packed.index[m - 1]], input_ids[packed.rows[m], packed.cols[m]],
                           temperature, return_entropy, chunk_size)
    where = (packed.rows[m], packed.cols[m])
    B, T = packed.shape

    def dense(flat):
        return hidden.new_zeros((B, T), dtype=torch.float32).index_put(where, flat)

    if not return_entropy:
        return dense(result)
    return dense(result[0]), dense(result[1])


def masked_nll_sum(model, input_ids, attention_mask, loss_mask, chunk_size: int = 1024) -> tuple[torch.Tensor, int]:
    """(sum of -log p over the target tokens of `loss_mask`, number of such tokens)."""
    lp = token_logprobs(model, input_ids, attention_mask, loss_mask, chunk_size=chunk_size)
    real = attention_mask.bool()
    position = real.long().cumsum(1) - 1
    count = int((loss_mask.bool() & real & (position > 0)).sum())  # the targets token_logprobs scores
    return -lp.sum(), count


# ---- optimisation ----------------------------------------------------------------------------


def cosine_multiplier(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Learning-rate factor after `step` optimizer steps: linear warmup from 0 to 1 over
    `warmup_steps`, then half a cosine from 1 down to `min_ratio` at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_schedule(optimizer, total_steps: int, warmup_steps: int, min_ratio: float = 0.0):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_multiplier(step, total_steps, warmup_steps, min_ratio))


def adamw(model, lr: float, betas=(0.9, 0.95), weight_decay: float = 0.01, eps: float = 1e-8):
    """AdamW over the trainable parameters; no weight decay on biases and norm weights (1-D)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel (one pass over each tensor instead of a dozen elementwise operations per
    # parameter): 0.05 s instead of 0.33 s per step for SmolLM2's 135M fp32 weights on 2 cores
    # (docs/performance.md). The same update up to float rounding.
    params = decay + no_decay
    fused = bool(params) and all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(betas), eps=eps,
                             fused=fused or None)


def optimizer_and_schedule(model, optim, total_steps: int):
    """AdamW and its learning-rate schedule from an `OptimSection`: linear warmup over
    `warmup_ratio` of `total_steps`, then cosine decay to 0 or a constant rate."""
    optimizer = adamw(model, optim.lr, (optim.beta1, optim.beta2), optim.weight_decay)
    warmup = round(optim.warmup_ratio * total_steps)
    if optim.schedule == "constant":
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: (step + 1) / (warmup + 1) if step < warmup else 1.0)
    else:
        schedule = cosine_schedule(optimizer, total_steps, warmup)
    return optimizer, schedule


# ---- random state ----------------------------------------------------------------------------


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
