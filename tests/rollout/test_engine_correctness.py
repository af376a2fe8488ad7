"""The rollout engine computes what the model computes, and samples what it says it samples.

- Log-probs: every sampled token's log-prob equals a teacher-forced forward of the same model
  over the sequence's final context, across turns that reuse the KV cache, shared prompt
  segments (a group's identical prompts; the instructions that different prompts share), slots
  refilled as sequences end, and a next context that leaves the cached prefix. Tolerance: 1e-4
  absolute in fp32 (the engine and the HF forward add the same numbers in different orders);
  in bf16 against the bf16 HF forward, at most 5e-2 for any token and 1e-2 on average.
- Sampling: at temperature T and top-p p, first tokens drawn through the engine follow
  softmax(logits / T) restricted to the smallest set of tokens covering p, renormalised (a
  chi-square test over 4,096 draws at a 1e-4 false-alarm rate), and each token's recorded
  log-prob is its log-prob under softmax(logits / T) before truncation, the distribution the
  trainer recomputes (docs/ppo.md).

The tiny model (random weights) is the subject: its architecture is the one the engine runs for
SmolLM2, and it is small enough for thousands of draws.
"""

import math

import pytest
import torch

from spa_rl.models.tiny import build_byte_tokenizer, build_tiny_model
from spa_rl import kernels
from spa_rl.rollout import kvcache
from spa_rl.rollout.backend import HFBackend, SamplingParams

SYSTEM = "<|im_start|>system\nYou are a careful agent that plays grid games turn by turn.<|im_end|>\n"


@pytest.fixture(scope="module")
def tiny():
    tok = build_byte_tokenizer()
    model = build_tiny_model(tok, seed=0).eval()
    # Random weights give a near-uniform next-token distribution (logit std 0.26), in which a
    # wrong temperature would go unnoticed; scaling the final norm by 3 scales the logits (std
    # 0.77, the most likely token 0.23, ~200 tokens above 1/1000) without touching the tied
    # embeddings.
    with torch.no_grad():
        model.model.norm.weight.mul_(3.0)
    return model, tok


def encode(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def teacher_forced_logprobs(model, ids, temperature=1.0):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits / temperature, dim=-1)


def run_episodes(backend, tok, prompts, params, turns=3, diverge_key=None):
    """Drive `turns` turns per prompt through `generate_episodes`; each next context appends the
    sampled ids and a user turn. For `diverge_key`, the second context rewrites the system
    prompt, so the cached prefix no longer applies. Returns per key a list of turns, each
    (the turn's context followed by its sampled ids, [(position, token, log-prob)]), and the
    number of ids of the final contexts."""
    contexts = {k: list(p) for k, p in enumerate(prompts)}
    record = {k: [] for k in contexts}

    def next_prompt(key, gen):
        ctx = contexts[key]
        samples = [(len(ctx) + i, t, lp) for i, (t, lp) in enumerate(zip(gen.token_ids, gen.logprobs))]
        ctx = ctx + list(gen.token_ids)
        record[key].append((ctx, samples))
        if len(record[key]) == turns:
            return None
        ctx = ctx + encode(tok, f"<|im_end|>\n<|im_start|>user\nturn {len(record[key]) + 1}<|im_end|>\n"
                                "<|im_start|>assistant\n")
        if key == diverge_key and len(record[key]) == 1:
            ctx = encode(tok, SYSTEM.replace("careful", "CAREFUL")) + ctx[len(encode(tok, SYSTEM)):]
        contexts[key] = ctx
        return ctx

    backend.generate_episodes(prompts, params, next_prompt)
    return record, sum(len(turns_[-1][0]) for turns_ in record.values())


def assert_logprobs_match(model, record, temperature=1.0, tol=1e-4):
    """Every sampled token's log-prob against a teacher-forced forward of its turn's ids;
    returns the number of tokens checked."""
    checked = 0
    for key, turns_ in record.items():
        for ids, samples in turns_:
            ref = teacher_forced_logprobs(model, ids, temperature)
            assert samples, f"sequence {key} sampled nothing in a turn"
            for pos, t, lp in samples:
                assert ids[pos] == t
                assert lp == pytest.approx(ref[pos - 1, t].item(), abs=tol), (key, pos)
                checked += 1
    return checked


def level_prompts(tok):
    """Two groups of 3 identical prompts (one level each) and 3 single prompts; all share SYSTEM."""
    def prompt(level):
        return encode(tok, SYSTEM + f"<|im_start|>user\nlevel {level}: #..O_X#<|im_end|>\n<|im_start|>assistant\n")
    return [prompt("a")] * 3 + [prompt("b")] * 3 + [prompt(c) for c in "xyz"]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_multi_turn_logprobs_equal_teacher_forcing(tiny, temperature):
    model, tok = tiny
    prompts = level_prompts(tok)
    backend = HFBackend(model, tok, max_batch_size=4, seed=1)  # 9 sequences through 4 slots
    assert backend.uses_engine
    params = SamplingParams(max_new_tokens=12, temperature=temperature, stop_strings=())
    record, final_ids = run_episodes(backend, tok, prompts, params, turns=3, diverge_key=7)
    assert all(len(turns_) == 3 for turns_ in record.values())
    assert assert_logprobs_match(model, record, temperature) >= 9 * 3
    stats = backend.last_stats
    # The cache was reused: every id of every final context went through the model at most once
    # (prefill or decode; the diverged sequence's first context twice), and the shared segments
    # saved more. Re-sending each context every turn (drive_turns) would prefill about three
    # times as many.
    assert stats["segments"] >= 2
    assert stats["prefill_tokens"] + stats["decode_rows"] <= final_ids + len(record[7][0][0])


def test_engine_matches_the_hf_forward_path(tiny):
    """The same seed through the engine and through the HF fallback draws the same tokens
    (both sample from the same distribution with the same generator calls, one row at a time)."""
    model, tok = tiny
    prompt = level_prompts(tok)[6]
    params = SamplingParams(max_new_tokens=16, temperature=0.7, top_p=0.9, stop_strings=())
    fast = HFBackend(model, tok, seed=4).generate([prompt], params)[0]
    slow = HFBackend(model, tok, seed=4, engine="hf").generate([prompt], params)[0]
    assert fast.token_ids == slow.token_ids
    assert fast.logprobs == pytest.approx(slow.logprobs, abs=1e-4)


@pytest.mark.parametrize("heads", ["head_dim 32", "head_dim 64", "head_dim 64, prefill blocks of 8"])
def test_bf16_engine_logprobs_equal_the_bf16_forward(tiny, heads, monkeypatch):
    """head_dim 32: attention by PyTorch's flash kernel; head_dim 64 with 3 query heads per KV
    head (SmolLM2's layout): by the CPU kernels where the CPU has AVX-512 (kernels.py), decode
    and prefill; "prefill blocks of 8": a prefill job split into query blocks, as jobs of more
    than `kvcache.PREFILL_BLOCK` tokens are."""
    model, tok = tiny
    if "blocks" in heads:
        monkeypatch.setattr(kvcache, "PREFILL_BLOCK", 8)
    if heads == "head_dim 32":
        bf16 = build_tiny_model(tok, seed=0).eval()
        bf16.load_state_dict(model.state_dict())
    else:
        bf16 = build_tiny_model(tok, seed=0, hidden=192, heads=3, kv_heads=1).eval()
        with torch.no_grad():
            bf16.model.norm.weight.mul_(3.0)
    bf16 = bf16.to(torch.bfloat16)
    used = []
    real = kvcache.decode_kernel_for
    monkeypatch.setattr(kvcache, "decode_kernel_for", lambda *a: used.append(real(*a)) or used[-1])
    # two identical prompts (a shared group segment) and two other levels
    prompts = level_prompts(tok)[:3] + level_prompts(tok)[:1]
    backend = HFBackend(bf16, tok, max_batch_size=4, seed=2)
    assert backend.compute_dtype() == torch.bfloat16
    record, _ = run_episodes(backend, tok, prompts, SamplingParams(max_new_tokens=10, stop_strings=()), turns=2)
    expect_kernel = heads != "head_dim 32" and kernels._cpu_has_avx512() and kernels.kernel_enabled()
    assert used and all((f is not None) == expect_kernel for f in used)
    gaps = []
    for turns_ in record.values():
        for ids, samples in turns_:
            ref = teacher_forced_logprobs(bf16, ids)
            gaps += [abs(lp - ref[pos - 1, t].item()) for pos, t, lp in samples]
    # bf16 keeps 8 significant bits (relative rounding 2^-9 per operation); the two paths round
    # in different places, so logits of a few units differ by a few hundredths at most
    # (measured over 3 seeds: max 0.027, mean 0.003)
    assert max(gaps) < 5e-2 and sum(gaps) / len(gaps) < 1e-2, (max(gaps), sum(gaps) / len(gaps))


def chi_square_quantile(df: int, z: float) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at standard-normal quantile z."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8)])
def test_first_tokens_follow_the_stated_distribution(tiny, temperature, top_p):
    model, tok = tiny
    prompt = level_prompts(tok)[6]
    draws = 4096
    backend = HFBackend(model, tok, max_batch_size=512, seed=11)
    params = SamplingParams(max_new_tokens=1, temperature=temperature, top_p=top_p, stop_strings=())
    gens = backend.generate([prompt] * draws, params)
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].float()
    full = torch.softmax(logits / temperature, dim=-1)
    # the smallest set of most likely tokens whose mass reaches top_p
    order = full.argsort(descending=True)
    before = full[order].cumsum(0) - full[order]
    kept = order[before < top_p]
    target = torch.zeros_like(full)
    target[kept] = full[kept] / full[kept].sum()

    counts = torch.zeros_like(full)
    for g in gens:
        t = g.token_ids[0]
        counts[t] += 1
        # the recorded log-prob is the untruncated, temperature-scaled one
        assert g.logprobs[0] == pytest.approx(math.log(full[t].item()), abs=1e-4)
    assert counts[target == 0].sum() == 0, "a token outside the top-p set was drawn"
    # Chi-square goodness of fit; tokens expected fewer than 5 times are pooled into one cell.
    expected = target * draws
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big & (target > 0)].sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big & (target > 0)].sum().reshape(1)])
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = ((obs - exp) ** 2 / exp).sum().item()
    df = len(exp) - 1
    assert df >= 5, "the test needs a spread distribution"
    assert stat < chi_square_quantile(df, 3.719), f"chi2 {stat:.1f} on {df} df"
    # ... and the test has power: the same counts against the untempered distribution fail
    if temperature != 1.0:
        wrong = torch.softmax(logits, dim=-1) * draws
        stat_wrong = ((counts - wrong) ** 2 / wrong).sum().item()
        assert stat_wrong > chi_square_quantile(len(wrong) - 1, 3.719)
