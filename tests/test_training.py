"""spa_rl.training: chunked log-probs equal the full-logits computation (values and gradients),
and the schedule's shape (checkpoints: tests/test_artifacts.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from spa_rl.models.tiny import build_byte_tokenizer, build_tiny_model
from spa_rl.training import (
    adamw,
    cosine_multiplier,
    cosine_schedule,
    masked_nll_sum,
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
