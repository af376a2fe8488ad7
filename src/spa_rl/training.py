"""Training helpers shared by the SFT and PPO recipes: batching, chunked log-probs, the learning
rate schedule, random state (checkpoints: `spa_rl.artifacts`).

Log-probs without vocabulary-sized logits for every position. A causal LM's `forward` computes
logits (B, T, V) for every position; with SmolLM2's 49,152-token vocabulary that tensor, its
softmax and its gradient dominate training memory (MODELS.md), although only the positions
whose next token is trained matter. `token_logprobs` therefore runs the backbone alone, picks
the hidden states of those positions, and applies the LM head chunk by chunk. Each chunk is
wrapped in activation checkpointing, so the backward pass keeps only the (n, H) hidden chunk
and recomputes its (n, V) logits: peak extra memory is one chunk of logits, whatever the
number of trained tokens. The recompute costs one more LM-head product on the trained
positions only (a few percent of a step for SmolLM2).

Conventions: `positions_mask[b, i]` (like `TokenSequence.loss_mask`) marks token i as a
target, i.e. the log-prob returned at (b, i) is log p(input_ids[b, i] | input_ids[b, :i]).
Position 0 has no context and is never a target.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint




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
    # hidden (n, H), targets (n,) -> logprobs (n,) [, entropy (n,)], all float32
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


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions_mask: torch.Tensor,
                   chunk_size: int = 1024, temperature: float = 1.0, return_entropy: bool = False):
    """Log-probs of the target tokens marked by `positions_mask`, as a dense (B, T) float32
    tensor (0.0 elsewhere); with `return_entropy`, also the (B, T) entropy of the predictive
    distribution at those positions. Differentiable; see the module docstring for the layout
    and the memory argument.

    input_ids, attention_mask, positions_mask: (B, T). `temperature` divides the logits (use
    the sampling temperature to score a rollout's own distribution).
    """
    backbone, head = backbone_and_head(model)
    attention_mask = attention_mask.to(torch.long)
    if bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
        # Right padding (or none): causal attention alone already keeps every real token from
        # seeing the pads after it, so no mask is passed and attention takes its fast causal
        # path (about 1.7x faster steps on CPU for ~1,400-token rows); pad outputs are unused.
        hidden = backbone(input_ids=input_ids, use_cache=False).last_hidden_state
    else:  # left padding or holes: the mask, and positions counted from each row's first token
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state
    B, T, H = hidden.shape
    select = positions_mask[:, 1:].bool() & attention_mask[:, 1:].bool()  # (B, T-1): target t+1 from hidden t
    h = hidden[:, :-1][select]  # (N, H)
    targets = input_ids[:, 1:][select]  # (N,)
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    lps, ents = [], []
    for start in range(0, h.shape[0], chunk_size):
        args = (head, softcap, temperature, return_entropy, h[start:start + chunk_size], targets[start:start + chunk_size])
        if torch.is_grad_enabled():
            lp, ent = checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(*args)
        lps.append(lp)
        ents.append(ent)
    zeros = hidden.new_zeros((B, 1), dtype=torch.float32)

    def dense(parts):
        flat = torch.cat(parts) if parts else hidden.new_zeros((0,), dtype=torch.float32)
        body = hidden.new_zeros((B, T - 1), dtype=torch.float32).masked_scatter(select, flat)
        return torch.cat([zeros, body], dim=1)

    logprobs = dense(lps)
    return (logprobs, dense(ents)) if return_entropy else logprobs


def masked_nll_sum(model, input_ids, attention_mask, loss_mask, chunk_size: int = 1024) -> tuple[torch.Tensor, int]:
    """(sum of -log p over the target tokens of `loss_mask`, number of such tokens)."""
    lp = token_logprobs(model, input_ids, attention_mask, loss_mask, chunk_size=chunk_size)
    count = int((loss_mask[:, 1:].bool() & attention_mask[:, 1:].bool()).sum())
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
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(betas), eps=eps)


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
