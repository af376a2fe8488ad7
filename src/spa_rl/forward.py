"""Forward passes that only pay for the vocabulary where a loss needs it.

A causal LM's logits are (tokens x vocabulary): for SmolLM2 that is 49,152 floats per token, most
of a training step's memory (MODELS.md). The trainers here need log-probs (and entropies) only
at trained positions, so the backbone runs on the whole sequence and the LM head runs on the
selected hidden states, in chunks.

Position convention (shared with `spa_rl.tokens.TokenSequence`): `target_mask[b, i] == 1` means
token i is trained, predicted from the hidden state at position i-1. Outputs are (B, T) tensors
aligned with the tokens, zero where `target_mask` is 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.utils.checkpoint

from spa_rl.algorithms import entropy_from_logits, logprobs_from_logits


def pad_batch(sequences: list[list[int]], pad_id: int, *extra: list[list]) -> tuple[torch.Tensor, ...]:
    """Right-pad id lists into (B, T) tensors; also pads parallel per-token lists with zeros.
    Returns (input_ids, attention_mask, *extra_tensors)."""
    T = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(sequences), T), dtype=torch.long)
    outs = []
    for b, s in enumerate(sequences):
        ids[b, :len(s)] = torch.tensor(s, dtype=torch.long)
        att[b, :len(s)] = 1
    for lists in extra:
        is_float = any(isinstance(x, float) for row in lists for x in row[:1])
        t = torch.zeros((len(sequences), T), dtype=torch.float32 if is_float else torch.long)
        for b, row in enumerate(lists):
            t[b, :len(row)] = torch.tensor(row, dtype=t.dtype)
        outs.append(t)
    return (ids, att, *outs)


def backbone_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states (B, T, H) of a `*ForCausalLM` (right-padded batch)."""
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=False).last_hidden_state


@dataclass
class TokenStats:
    logprobs: torch.Tensor  # (B, T) log p(token_i | tokens_<i) at target positions, else 0
    entropy: torch.Tensor | None  # (B, T) entropy of the predictive distribution, else 0
    hidden: torch.Tensor  # (B, T, H) backbone output (for value heads sharing the forward)


def token_stats(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_mask: torch.Tensor,
                with_entropy: bool = False, chunk: int = 1024) -> TokenStats:
    """Log-probs (and entropies) of the target tokens; differentiable unless under no_grad."""
    hidden = backbone_hidden(model, input_ids, attention_mask)  # (B, T, H)
    lm_head = model.get_output_embeddings()
    B, T = input_ids.shape
    sel = target_mask.bool().clone()
    sel[:, 0] = False  # token 0 has no prediction
    b_idx, t_idx = sel.nonzero(as_tuple=True)  # (N,), (N,)
    h = hidden[b_idx, t_idx - 1]  # (N, H): the state that predicts token t
    labels = input_ids[b_idx, t_idx]  # (N,)
    def head_chunk(h_chunk, labels_chunk):
        logits = lm_head(h_chunk).float()  # (n, V)
        lp = logprobs_from_logits(logits, labels_chunk)
        return (lp, entropy_from_logits(logits)) if with_entropy else (lp, lp)

    lps, ents = [], []
    for s in range(0, h.shape[0], chunk):
        if torch.is_grad_enabled():
            # Recompute the chunk's logits in backward instead of keeping (n, V) floats alive.
            lp, ent = torch.utils.checkpoint.checkpoint(head_chunk, h[s:s + chunk], labels[s:s + chunk],
                                                        use_reentrant=False)
        else:
            lp, ent = head_chunk(h[s:s + chunk], labels[s:s + chunk])
        lps.append(lp)
        ents.append(ent)
    logprobs = hidden.new_zeros((B, T), dtype=torch.float32)
    logprobs = logprobs.index_put((b_idx, t_idx), torch.cat(lps) if lps else logprobs.new_zeros(0))
    entropy = None
    if with_entropy:
        entropy = hidden.new_zeros((B, T), dtype=torch.float32)
        entropy = entropy.index_put((b_idx, t_idx), torch.cat(ents) if ents else entropy.new_zeros(0))
    return TokenStats(logprobs, entropy, hidden)
