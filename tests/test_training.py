"""spa_rl.training: chunked log-probs equal the full-logits computation (values and gradients),
and the schedule's shape (checkpoints: tests/test_artifacts.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from spa_rl import kernels
from spa_rl.models.tiny import build_byte_tokenizer, build_tiny_model
from spa_rl.training import (
    adamw,
    cosine_multiplier,
    cosine_schedule,
    masked_nll_sum,
    pack_rows,
    packed_causal_attention,
    packed_hidden_states,
    pad_batch,
    rng_state,
    set_rng_state,
    token_logprobs,
)


@pytest.fixture(scope="module")
def tiny():
    tok = build_byte_tokenizer()
    return build_tiny_model(tok, seed=1).float(), tok


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (9, 14, 5)]
    masks = [[0] * 3 + [1] * (len(x) - 3) for x in ids]
    masks[1][7] = 0  # a hole inside the trained region
    return pad_batch(ids, masks, pad_id=256)


def _reference_logprobs(model, input_ids, attention, temperature=1.0):
    logits = model(input_ids=input_ids, attention_mask=attention).logits.float() / temperature
    lp = torch.log_softmax(logits[:, :-1], -1).gather(2, input_ids[:, 1:, None])[..., 0]
    return torch.cat([torch.zeros(lp.shape[0], 1), lp], 1), logits


def test_pad_batch_layout():
    input_ids, attention, mask = pad_batch([[5, 6, 7], [8]], [[0, 1, 1], [1]], pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert attention.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert mask.tolist() == [[False, True, True], [True, False, False]]


@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_token_logprobs_match_full_logits(tiny, chunk):
    model, _ = tiny
    input_ids, attention, mask = _batch()
    ref, _ = _reference_logprobs(model, input_ids, attention, temperature=0.7)
    got = token_logprobs(model, input_ids, attention, mask, chunk_size=chunk, temperature=0.7)
    sel = mask.clone()
    sel[:, 0] = False
    sel &= attention.bool()
    assert torch.allclose(got[sel], ref[sel], atol=1e-5)
    assert (got[~sel] == 0).all()


def test_token_logprobs_left_padding_equals_unpadded(tiny):
    # Left-padded rows (as a generation batch has them) get the mask and shifted positions.
    model, _ = tiny
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (7, 12)]
    T = 12
    ids = torch.full((2, T), 256)
    attn = torch.zeros((2, T), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = torch.tensor(r)
        attn[b, T - len(r):] = 1
    got = token_logprobs(model, ids, attn, attn.bool())
    for b, r in enumerate(rows):
        alone = token_logprobs(model, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long),
                               torch.ones(1, len(r), dtype=torch.bool))
        assert torch.allclose(got[b, T - len(r) + 1:], alone[0, 1:], atol=1e-5)


def test_token_logprobs_entropy(tiny):
    model, _ = tiny
    input_ids, attention, mask = _batch()
    _, logits = _reference_logprobs(model, input_ids, attention)
    p = torch.softmax(logits[:, :-1], -1)
    ent_ref = -(p * torch.log_softmax(logits[:, :-1], -1)).sum(-1)
    _, ent = token_logprobs(model, input_ids, attention, mask, chunk_size=3, return_entropy=True)
    sel = mask[:, 1:] & attention[:, 1:].bool()
    assert torch.allclose(ent[:, 1:][sel], ent_ref[sel], atol=1e-5)


def test_chunked_gradients_equal_full_gradients(tiny):
    model, _ = tiny
    input_ids, attention, mask = _batch()
    model.zero_grad()
    ref, _ = _reference_logprobs(model, input_ids, attention)
    sel = mask.clone()
    sel[:, 0] = False
    (-ref[sel].sum()).backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss, count = masked_nll_sum(model, input_ids, attention, mask, chunk_size=2)
    loss.backward()
    assert count == int(sel.sum())
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, ref_grads[n], atol=1e-5, rtol=1e-4), n


def _rows(seed=5, lengths=(23, 7, 31, 1, 16)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def _alone_logprobs(model, row, temperature=1.0):
    # The reference: one row, no padding, no packing, full logits, plain autograd.
    logits = model(input_ids=torch.tensor([row])).logits[0].float() / temperature
    return torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(row[1:])[:, None])[:, 0]


def test_pack_rows_layout():
    ids = torch.tensor([[5, 6, 7, 0], [0, 0, 8, 9], [0, 0, 0, 0], [1, 2, 3, 4]])
    attn = (ids != 0).long()
    p = pack_rows(ids, attn)
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4]]
    assert p.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]  # restart per row
    assert p.cu_seqlens.tolist() == [0, 3, 5, 9]  # the empty row is dropped
    assert p.max_length == 4
    assert list(zip(p.rows.tolist(), p.cols.tolist()))[3:5] == [(1, 2), (1, 3)]


def test_packed_logprobs_equal_per_row_unpadded(tiny):
    # Five rows of different lengths (one of a single token) packed into one sequence: every
    # log-prob equals the row's own unpadded forward, so no token attends across a boundary and
    # positions restart per row. fp32, tight tolerance.
    model, _ = tiny
    rows = _rows()
    ids, attn, mask = pad_batch(rows, [[1] * len(r) for r in rows], pad_id=256)
    got = token_logprobs(model, ids, attn, mask, chunk_size=8)
    assert model.config._attn_implementation == "spa_packed_sdpa"  # the row-by-row causal path ran
    for b, r in enumerate(rows):
        assert got[b, 0] == 0 and (got[b, len(r):] == 0).all()
        if len(r) > 1:
            assert torch.allclose(got[b, 1:len(r)], _alone_logprobs(model, r), atol=2e-6, rtol=1e-5), b


def test_transformers_packed_mask_agrees_with_row_by_row_attention(tiny):
    # The same packed sequence through transformers' own handling (eager attention, which builds
    # a block-diagonal causal mask from the restarting position ids when no mask is given) and
    # through the row-by-row sdpa path: the same hidden states.
    import copy

    model, _ = tiny
    rows = _rows(seed=6)
    ids, attn, _ = pad_batch(rows, [[1] * len(r) for r in rows], pad_id=256)
    fast = packed_hidden_states(model.get_decoder(), ids, attn)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    slow = packed_hidden_states(eager.get_decoder(), ids, attn)
    assert eager.config._attn_implementation == "eager"
    assert torch.allclose(fast, slow, atol=2e-5)
    for b, r in enumerate(rows):
        alone = model.get_decoder()(input_ids=torch.tensor([r])).last_hidden_state[0]
        assert torch.allclose(fast[b, :len(r)], alone, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, "blocks-fp32", torch.bfloat16, "autocast", "bf16-compiled"])
def test_packed_causal_attention_equals_sdpa_per_row(dtype, monkeypatch):
    # Rows longer than one query block (256), a one-token row, grouped-query heads (4 query heads
    # on 2 key/value heads); outputs and gradients against PyTorch's causal sdpa on each row
    # alone, in float32 (bf16 inputs are compared with bf16-level tolerances).
    g = torch.Generator().manual_seed(0)
    lengths = [300, 1, 530]
    N = sum(lengths)
    # "autocast": what a Llama layer hands over under bf16 autocast (q, k float32 after the
    # rotary embedding, v bfloat16), with the backward outside the autocast region
    # "blocks-fp32": the CPU block kernel (used for bf16) run in float32, to check its math
    # tightly; plain float32 goes through sdpa row by row. bf16 runs the CPU kernels' softmax
    # passes where the CPU has AVX-512; "bf16-compiled" the torch.compile'd blocks that serve
    # elsewhere.
    if dtype == "bf16-compiled":
        monkeypatch.setattr(kernels, "training_attention_ops", lambda *a: None)
        dtype = torch.bfloat16
    dq, dv = {"autocast": (torch.float32, torch.bfloat16), "blocks-fp32": (torch.float32, torch.float32)}.get(
        dtype, (dtype, dtype))
    q = torch.randn(1, 4, N, 64, generator=g).to(dq).requires_grad_()
    k = torch.randn(1, 2, N, 64, generator=g).to(dq).requires_grad_()
    v = torch.randn(1, 2, N, 64, generator=g).to(dv).requires_grad_()
    grad_out = torch.randn(1, 4, N, 64, generator=g).to(dv)
    cu = torch.tensor([0, 300, 301, 831], dtype=torch.int32)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "autocast"):
        if dtype == "blocks-fp32":
            from spa_rl.training import _PackedCausalAttention

            out = _PackedCausalAttention.apply(q[0].reshape(2, 2, N, 64), k[0], v[0], 0.125,
                                               (0, 300, 301, 831)).reshape(1, 4, N, 64)
        else:
            out = packed_causal_attention(q, k, v, cu, 0.125)
    out.backward(grad_out)
    assert q.grad.dtype == q.dtype and v.grad.dtype == v.dtype
    leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        leaves[0][:, :, a:b], leaves[1][:, :, a:b], leaves[2][:, :, a:b], scale=0.125, is_causal=True, enable_gqa=True)
        for a, b in [(0, 300), (300, 301), (301, 831)]], dim=2)
    ref.backward(grad_out.float())
    atol = 1e-5 if dtype in (torch.float32, "blocks-fp32") else 3e-2
    assert torch.allclose(out.float(), ref, atol=atol)
    for got, want in zip((q, k, v), leaves):
        assert torch.allclose(got.grad.float(), want.grad, atol=atol * 4), (got.shape, (got.grad.float() - want.grad).abs().max())


needs_cpu_kernels = pytest.mark.skipif(not kernels.training_attention_ops(torch.bfloat16, "cpu"),
                                       reason="the CPU kernels need an AVX-512 CPU")


@needs_cpu_kernels
@pytest.mark.parametrize("queries,keys", [(1, 1), (37, 37), (256, 256), (151, 1175), (256, 1200), (5, 300)])
def test_cpu_kernel_blocks_compute_what_the_block_functions_compute(queries, keys):
    """A query block (the last `queries` of `keys` positions) by the CPU kernels' passes
    against the same block functions run eagerly, in bf16: the same steps and roundings, so
    they differ only where fp32 sums run in another order or exp differs in its last bit, which
    can move a bf16 result by one step (2^-8 relative)."""
    from spa_rl.training import (
        _attention_block_backward,
        _attention_block_backward_cpu,
        _attention_block_forward,
        _attention_block_forward_cpu,
    )

    ops = kernels.training_attention_ops(torch.bfloat16, "cpu")
    g = torch.Generator().manual_seed(queries * 7 + keys)
    q = torch.randn(3, 3, queries, 64, generator=g).bfloat16()
    k = (2 * torch.randn(3, keys, 64, generator=g)).bfloat16()  # larger scores: a peaked softmax
    v = torch.randn(3, keys, 64, generator=g).bfloat16()
    grad_out = torch.randn(3, 3, queries, 64, generator=g).bfloat16()
    out, lse = _attention_block_forward_cpu(ops, q, k, v, 0.125)
    want_out, want_lse = _attention_block_forward(q, k, v, 0.125)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert torch.allclose(lse, want_lse, atol=1e-5, rtol=1e-6)
    assert torch.allclose(out.float(), want_out.float(), atol=2 ** -8, rtol=2 ** -7)
    delta = (grad_out.float() * want_out.float()).sum(-1)
    got = _attention_block_backward_cpu(ops, q, k, v, grad_out, want_lse, delta, 0.125)
    want = _attention_block_backward(q, k, v, grad_out, want_lse, delta, 0.125)
    for name, a, b in zip(("q", "k", "v"), got, want):
        scale = b.float().abs().max()
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert (a.float() - b.float()).abs().max() <= 2 ** -7 * scale, (name, (a.float() - b.float()).abs().max(), scale)


@needs_cpu_kernels
def test_cpu_kernel_blocks_refuse_bad_input():
    ops = kernels.training_attention_ops(torch.bfloat16, "cpu")
    with pytest.raises(RuntimeError, match="bfloat16"):
        ops.causal_softmax_(torch.zeros(1, 4, 4), 4, 1.0)
    with pytest.raises(RuntimeError, match="a block of 3 queries cannot have 4 rows"):
        ops.causal_softmax_(torch.zeros(1, 4, 4, dtype=torch.bfloat16), 3, 1.0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_head_gradients_with_entropy_equal_autograd(tiny, temperature):
    # The hand-written backward of the LM head (log-prob and entropy terms, temperature) against
    # plain autograd through full logits, packed rows against one row at a time.
    model, _ = tiny
    rows = _rows(seed=7, lengths=(12, 20, 5))
    ids, attn, mask = pad_batch(rows, [[0] * 2 + [1] * (len(r) - 2) for r in rows], pad_id=256)
    w_lp = torch.randn(ids.shape, generator=torch.Generator().manual_seed(1))
    w_ent = torch.randn(ids.shape, generator=torch.Generator().manual_seed(2))
    model.zero_grad()
    ref_loss = 0.0
    for b, r in enumerate(rows):
        logits = model(input_ids=torch.tensor([r])).logits[0, :-1].float() / temperature
        lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(r[1:])[:, None])[:, 0]
        ent = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
        sel = mask[b, 1:len(r)].float()
        ref_loss = ref_loss + (w_lp[b, 1:len(r)] * lp * sel).sum() + (w_ent[b, 1:len(r)] * ent * sel).sum()
    ref_loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    lp, ent = token_logprobs(model, ids, attn, mask, chunk_size=5, temperature=temperature, return_entropy=True)
    loss = (w_lp * lp).sum() + (w_ent * ent).sum()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    loss.backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, ref[n], atol=1e-5, rtol=1e-4), n


def test_training_logprobs_at_the_sampling_temperature_equal_the_samplers():
    # The sampler's log-probs are those of softmax(logits / T). Scoring the sampled tokens with
    # token_logprobs(temperature=T) gives the same numbers, so with old_logprobs taken from the
    # rollout the first PPO ratio is exp(0) = 1. At temperature 1 they differ.
    from spa_rl.rollout.backend import HFBackend, SamplingParams
    from spa_rl.tokens import ChatTokenizer

    tok = build_byte_tokenizer()
    model = build_tiny_model(tok, seed=4).float().eval()
    chat = ChatTokenizer(tok)
    prompts = [chat.prompt_ids([{"role": "user", "content": text}]) for text in ("Go left.", "Which way now?")]
    params = SamplingParams(max_new_tokens=24, temperature=0.7, stop_strings=())
    gens = HFBackend(model, tok, max_batch_size=2, seed=3).generate(prompts, params)
    seqs = [list(p) + g.token_ids for p, g in zip(prompts, gens)]
    masks = [[0] * len(p) + [1] * len(g.token_ids) for p, g in zip(prompts, gens)]
    ids, attn, mask = pad_batch(seqs, masks, pad_id=tok.pad_token_id)
    sampled = torch.zeros(ids.shape)
    for b, (p, g) in enumerate(zip(prompts, gens)):
        sampled[b, len(p):len(p) + len(g.token_ids)] = torch.tensor(g.logprobs)
    with torch.no_grad():
        at_t = token_logprobs(model, ids, attn, mask, temperature=0.7)
        at_1 = token_logprobs(model, ids, attn, mask)
    sel = mask.bool()
    assert torch.allclose(at_t[sel], sampled[sel], atol=1e-4)
    ratio = torch.exp(at_t[sel] - sampled[sel])
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-4)
    assert (at_1[sel] - sampled[sel]).abs().max() > 1e-2


def test_cosine_schedule_shape():
    total, warm = 100, 10
    f = [cosine_multiplier(s, total, warm) for s in range(total + 1)]
    assert f[0] == pytest.approx(1 / 11)  # the first update already moves the weights
    assert all(a < b for a, b in zip(f[:warm], f[1:warm + 1]))  # linear warmup up to 1.0
    assert f[warm] == pytest.approx(1.0)
    assert f[warm + 45] == pytest.approx(0.5)  # half way down the cosine
    assert f[total] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(f[warm:], f[warm + 1:]))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = cosine_schedule(opt, total, warm)
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * f[0])
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * f[1])


def test_adamw_skips_decay_on_1d_params(tiny):
    model, _ = tiny
    opt = adamw(model, lr=1e-3, weight_decay=0.1)
    by_decay = {g["weight_decay"]: g["params"] for g in opt.param_groups}
    assert all(p.ndim >= 2 for p in by_decay[0.1]) and all(p.ndim == 1 for p in by_decay[0.0])


def test_rng_state_roundtrip():
    import random

    import numpy as np

    state = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_ppo_gradient_does_not_depend_on_the_micro_batch_split(loss_agg):
    # One PPO mini-batch of 5 episodes of different lengths: the actor's objective (clipped
    # surrogate, entropy bonus, KL to a reference) and a critic's clipped value loss, summed over
    # micro-batches of 2 + 1 + 2 episodes with the mini-batch's denominator, give the gradient of
    # the whole mini-batch in one piece. Averaging micro-batch means does not.
    from spa_rl.algorithms import actor_loss, loss_denominator, value_loss

    tok = build_byte_tokenizer()
    actor = build_tiny_model(tok, seed=2).float()
    critic_backbone = build_tiny_model(tok, seed=3).float().get_decoder()
    value_head = torch.nn.Linear(critic_backbone.config.hidden_size, 1)
    params = list(actor.parameters()) + list(critic_backbone.parameters()) + list(value_head.parameters())
    rows = _rows(seed=9, lengths=(30, 9, 22, 14, 40))
    ids, attn, mask = pad_batch(rows, [[0] * 4 + [1] * (len(r) - 4) for r in rows], pad_id=256)
    mask = mask.float()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        old = token_logprobs(actor, ids, attn, mask) + 0.05 * torch.randn(ids.shape, generator=g) * mask
        ref = old + 0.1 * torch.randn(ids.shape, generator=g) * mask
    adv = torch.randn(ids.shape, generator=g) * mask
    old_values = torch.randn(ids.shape, generator=g) * mask
    returns = torch.randn(ids.shape, generator=g) * mask

    def loss_of(idx, denominator):
        lp, ent = token_logprobs(actor, ids[idx], attn[idx], mask[idx], temperature=0.7, return_entropy=True)
        a, _ = actor_loss(lp, old[idx], adv[idx], mask[idx], entropy=ent, entropy_coef=0.01, ref_logprobs=ref[idx],
                          kl_coef=0.1, loss_agg=loss_agg, denominator=denominator)
        values = value_head(packed_hidden_states(critic_backbone, ids[idx], attn[idx])).squeeze(-1)
        v, _ = value_loss(values, old_values[idx], returns[idx], mask[idx], clip=0.2, loss_agg=loss_agg,
                          denominator=denominator)
        return a + v

    def grads(splits, shared_denominator: bool):
        for p in params:
            p.grad = None
        denominator = loss_denominator(mask, loss_agg) if shared_denominator else None
        for idx in splits:
            loss = loss_of(torch.tensor(idx), denominator)
            (loss if shared_denominator else loss / len(splits)).backward()
        return torch.cat([p.grad.flatten() for p in params])

    whole = grads([[0, 1, 2, 3, 4]], True)
    accumulated = grads([[3, 0], [4], [1, 2]], True)
    assert whole.abs().max() > 1e-2
    assert torch.allclose(accumulated, whole, atol=1e-6, rtol=1e-4)
    averaged = grads([[3, 0], [4], [1, 2]], False)
    assert (averaged - whole).abs().max() > 1e-3


def test_switched_model_computes_what_sdpa_does_without_packing(tiny):
    # After token_logprobs a model runs on the packed attention function; without packing
    # arguments (generation: left padding, a mask, a KV cache) it must compute exactly what sdpa
    # does, and the switch is not written into saved checkpoints.
    import copy

    model, _ = tiny
    fresh = copy.deepcopy(model)
    fresh.set_attn_implementation("sdpa")
    ids = torch.tensor([[256, 256, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6]])
    attn = (ids != 256).long()
    token_logprobs(model, ids, attn, attn.bool())
    assert model.config._attn_implementation == "spa_packed_sdpa"
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=attn, position_ids=position_ids).logits
        want = fresh(input_ids=ids, attention_mask=attn, position_ids=position_ids).logits
    assert torch.equal(got, want)
    assert "spa_packed" not in model.config.to_json_string()
