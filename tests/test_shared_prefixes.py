"""Training forwards that pack a shared prefix once (`training.pack_rows(share_prefixes=True)`):
the packed layout spells every row, and log-probs, entropies and gradients equal those of the
same rows packed without sharing (tiny model; float32 tightly, bf16 within rounding)."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from spa_rl.models.tiny import build_byte_tokenizer, build_tiny_model
from spa_rl.training import (
    _PackedCausalAttention,
    pack_rows,
    packed_causal_attention,
    packed_hidden_states,
    pad_batch,
    token_logprobs,
)


@pytest.fixture(scope="module")
def tiny():
    tok = build_byte_tokenizer()
    return build_tiny_model(tok, seed=4).float(), tok


def _tree_rows(seed=0):
    """Rows as an RL mini-batch has them: a common system prompt (40 tokens), two levels whose
    prompts extend it, samples per level that continue differently, two identical samples, a row
    that is a strict prefix of another, and an unrelated row."""
    g = torch.Generator().manual_seed(seed)

    def rand(n):
        return torch.randint(0, 256, (n,), generator=g).tolist()

    system = rand(40)
    level_a, level_b = system + rand(25), system + rand(30)
    sample = rand(12)
    return [
        level_a + rand(10),
        level_a + sample,
        level_b + rand(20),
        level_a + sample,          # identical to row 1: its trained tokens lie in the shared part
        level_b + rand(7) + rand(40),
        rand(50),                  # shares nothing
        level_a + sample + rand(9),  # row 1 is a prefix of it
        system + rand(3),
    ]


def test_pack_rows_layout_with_shared_prefixes():
    rows = [[1] * 40 + [2, 3], [1] * 40 + [4], [9, 9], [1] * 40 + [2, 3, 5]]
    ids, attn, _ = pad_batch(rows, [[1] * len(r) for r in rows], pad_id=0)
    p = pack_rows(ids, attn, share_prefixes=True)
    # row 0 whole, row 1's last token, row 2 whole (nothing shared), row 3's last token
    assert p.input_ids[0].tolist() == [1] * 40 + [2, 3] + [4] + [9, 9] + [5]
    assert p.position_ids[0].tolist() == list(range(42)) + [40] + [0, 1] + [42]
    assert p.cu_seqlens.tolist() == [0, 42, 43, 45, 46]
    assert p.contexts == ((), ((0, 40),), (), ((0, 42),))
    spelled = p.input_ids[0, p.index]
    assert torch.equal(spelled, ids[p.rows, p.cols])
    plain = pack_rows(ids, attn)
    assert plain.contexts is None and torch.equal(plain.index, torch.arange(len(plain.rows)))


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_packed_spans_spell_every_row(data):
    # Random rows built from a few shared stems, some left-padded: following each packed row's
    # context spans then its own span gives back exactly its tokens and positions.
    stems = [data.draw(st.lists(st.integers(1, 5), min_size=0, max_size=40)) for _ in range(3)]
    rows = []
    for _ in range(data.draw(st.integers(1, 7))):
        stem = stems[data.draw(st.integers(0, 2))]
        rows.append(stem + data.draw(st.lists(st.integers(1, 5), min_size=1 if not stem else 0, max_size=20)))
    min_shared = data.draw(st.integers(1, 8))
    T = max(map(len, rows))
    ids = torch.zeros((len(rows), T), dtype=torch.long)
    attn = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        start = T - len(r) if data.draw(st.booleans()) else 0  # left or right padding
        ids[b, start:start + len(r)] = torch.tensor(r, dtype=torch.long)
        attn[b, start:start + len(r)] = 1
    p = pack_rows(ids, attn, share_prefixes=True, min_shared=min_shared)
    assert torch.equal(p.input_ids[0, p.index], ids[p.rows, p.cols])
    assert torch.equal(p.position_ids[0, p.index], p.position)
    bounds = p.cu_seqlens.tolist()
    contexts = p.contexts or ((),) * (len(bounds) - 1)
    nonempty = [r for r in rows if r]
    assert len(contexts) == len(nonempty) == len(bounds) - 1
    for r, spans, a, b in zip(nonempty, contexts, bounds[:-1], bounds[1:]):
        spelled = [t for c0, c1 in spans for t in p.input_ids[0, c0:c1].tolist()] + p.input_ids[0, a:b].tolist()
        assert spelled == r
        assert all(c1 <= a for _, c1 in spans)  # a row reads only tokens packed before its own
        shared = sum(c1 - c0 for c0, c1 in spans)
        assert shared == 0 or min_shared <= shared < len(r)
    assert p.input_ids.shape[1] <= sum(map(len, rows))


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("autocast,checkpointing", [(False, False), (True, False), (False, True)])
def test_shared_prefix_logprobs_and_gradients_equal_unshared(tiny, monkeypatch, autocast, checkpointing):
    # The whole training objective's ingredients (log-probs at T = 0.7, entropies, a critic's
    # hidden states) with the prefixes shared and without: equal values and equal gradients,
    # also with activation checkpointing (the contexts pass through the checkpointed layers).
    import copy

    from spa_rl.training import enable_activation_checkpointing

    model = tiny[0]
    if checkpointing:
        model = copy.deepcopy(model)
        enable_activation_checkpointing(model)
        model.train()
    rows = _tree_rows()
    ids, attn, mask = pad_batch(rows, [[0] * 30 + [1] * (len(r) - 30) for r in rows], pad_id=256)
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(1))

    def run(share: bool):
        monkeypatch.setenv("SPA_RL_SHARE_PREFIXES", "1" if share else "0")
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            lp, ent = token_logprobs(model, ids, attn, mask, chunk_size=64, temperature=0.7, return_entropy=True)
            hidden = packed_hidden_states(model.get_decoder(), ids, attn)
            loss = (lp * weights).sum() + 0.1 * ent.sum() + hidden.float().pow(2).mean()
        loss.backward()
        return lp.detach(), ent.detach(), hidden.detach().float(), _grads(model)

    packed = pack_rows(ids, attn, share_prefixes=True)
    assert packed.contexts is not None and packed.input_ids.shape[1] < 0.6 * attn.sum()  # sharing happened
    shared, plain = run(True), run(False)
    assert (shared[0] != 0).sum() == mask[:, 1:].sum()  # every target scored
    if autocast:
        # bf16: a row's prefix runs in a different packed batch, so matmul rounding differs a little
        assert torch.allclose(shared[0], plain[0], atol=5e-2)
        assert torch.allclose(shared[2], plain[2], atol=5e-2)
        assert torch.nn.functional.cosine_similarity(shared[3], plain[3], dim=0) > 0.999
    else:
        for got, want in zip(shared, plain):
            assert torch.allclose(got, want, atol=2e-5, rtol=1e-4), (got - want).abs().max()


@pytest.mark.parametrize("path", ["blocks-fp32", "sdpa-fp32", "blocks-bf16"])
def test_attention_with_contexts_equals_causal_attention_on_spelled_rows(path):
    # Three packed rows, the second and third reading context spans (the third's own span is
    # longer than one query block): outputs and gradients equal plain causal attention over each
    # row spelled out in full, whose shared keys receive the sum of the rows' gradients.
    g = torch.Generator().manual_seed(0)
    N = 100 + 50 + 300
    bounds = (0, 100, 150, 450)
    contexts = ((), ((0, 60),), ((0, 60), (100, 120)))
    dtype = torch.bfloat16 if path == "blocks-bf16" else torch.float32
    q = torch.randn(1, 4, N, 32, generator=g).to(dtype).requires_grad_()
    k = torch.randn(1, 2, N, 32, generator=g).to(dtype).requires_grad_()
    v = torch.randn(1, 2, N, 32, generator=g).to(dtype).requires_grad_()
    grad_out = torch.randn(1, 4, N, 32, generator=g).to(dtype)
    if path == "blocks-fp32":
        out = _PackedCausalAttention.apply(q[0].reshape(2, 2, N, 32), k[0], v[0], 0.2, bounds,
                                           contexts).reshape(1, 4, N, 32)
    else:
        out = packed_causal_attention(q, k, v, torch.tensor(bounds, dtype=torch.int32), 0.2, contexts)
    out.backward(grad_out)
    leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
    outs = []
    for spans, a, b in zip(contexts, bounds[:-1], bounds[1:]):
        idx = torch.tensor([t for c0, c1 in spans for t in range(c0, c1)] + list(range(a, b)), dtype=torch.long)
        full = torch.nn.functional.scaled_dot_product_attention(
            leaves[0][:, :, idx], leaves[1][:, :, idx], leaves[2][:, :, idx], scale=0.2, is_causal=True, enable_gqa=True)
        outs.append(full[:, :, len(idx) - (b - a):])  # the row's own queries
    ref = torch.cat(outs, dim=2)
    ref.backward(grad_out.float())
    atol = 1e-5 if dtype == torch.float32 else 3e-2
    assert torch.allclose(out.float(), ref, atol=atol)
    for got, want in zip((q, k, v), leaves):
        assert torch.allclose(got.grad.float(), want.grad, atol=atol * 4), (got.grad.float() - want.grad).abs().max()
