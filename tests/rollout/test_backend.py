"""KV-cache backend: batched, left-padded generation computes what each prompt computes alone."""

import pytest
import torch

from spa_rl.models.tiny import build_byte_tokenizer, build_tiny_model
from spa_rl.rollout.backend import HFBackend, SamplingParams, sample_next


@pytest.fixture(scope="module")
def tiny():
    tok = build_byte_tokenizer()
    return build_tiny_model(tok, seed=0).eval(), tok


def prompts(tok):
    texts = ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
             "<|im_start|>user\na much longer prompt than the first one<|im_end|>\n<|im_start|>assistant\n",
             "<|im_start|>user\nmid size prompt<|im_end|>\n<|im_start|>assistant\n"]
    return [tok(t, add_special_tokens=False).input_ids for t in texts]


def test_greedy_batch_equals_each_prompt_alone(tiny):
    model, tok = tiny
    ps = prompts(tok)
    params = SamplingParams(max_new_tokens=12, temperature=0.0, stop_strings=())
    batched = HFBackend(model, tok, max_batch_size=8).generate(ps, params)
    for p, g in zip(ps, batched):
        alone = HFBackend(model, tok, max_batch_size=1).generate([p], params)[0]
        assert g.token_ids == alone.token_ids
        assert g.logprobs == pytest.approx(alone.logprobs, abs=1e-4)


def test_greedy_matches_transformers_generate(tiny):
    model, tok = tiny
    p = prompts(tok)[1]
    ours = HFBackend(model, tok).generate([p], SamplingParams(max_new_tokens=10, temperature=0.0, stop_strings=()))[0]
    ref = model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    expected = ref[0, len(p):].tolist()
    assert ours.token_ids == expected[:len(ours.token_ids)]


def test_logprobs_equal_a_full_forward(tiny):
    model, tok = tiny
    ps = prompts(tok)
    gens = HFBackend(model, tok, seed=3).generate(ps, SamplingParams(max_new_tokens=8, temperature=1.0, stop_strings=()))
    for p, g in zip(ps, gens):
        ids = torch.tensor([p + g.token_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        expected = [logp[len(p) - 1 + i, t].item() for i, t in enumerate(g.token_ids)]
        assert g.logprobs == pytest.approx(expected, abs=1e-4)


def test_sampling_is_seeded(tiny):
    model, tok = tiny
    params = SamplingParams(max_new_tokens=8, temperature=1.0, stop_strings=())
    a = HFBackend(model, tok, seed=5).generate(prompts(tok), params)
    b = HFBackend(model, tok, seed=5).generate(prompts(tok), params)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]


def test_stop_string_and_length_finish(tiny):
    model, tok = tiny
    ps = prompts(tok)
    gens = HFBackend(model, tok).generate(ps, SamplingParams(max_new_tokens=5, temperature=1.0, stop_strings=()))
    assert all(g.finish_reason in ("length", "eos") and len(g.token_ids) <= 5 for g in gens)
    # A stop string made of the first generated character stops right there.
    g = HFBackend(model, tok).generate([ps[0]], SamplingParams(max_new_tokens=5, temperature=0.0, stop_strings=()))[0]
    first = tok.decode(g.token_ids[:1])
    if g.token_ids[0] != tok.eos_token_id and first:
        s = HFBackend(model, tok).generate([ps[0]], SamplingParams(max_new_tokens=5, temperature=0.0, stop_strings=(first,)))[0]
        assert s.finish_reason == "stop" and s.token_ids == g.token_ids[:1]


def test_top_k_one_is_greedy():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9]])
    tok, lp = sample_next(logits, SamplingParams(temperature=1.0, top_k=1), torch.Generator().manual_seed(0))
    assert tok.item() == 1
    assert lp.item() == pytest.approx(torch.log_softmax(logits, -1)[0, 1].item())


def test_top_p_keeps_the_smallest_covering_set():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    seen = {sample_next(logits, SamplingParams(top_p=0.7), gen)[0].item() for _ in range(300)}
    assert seen == {0, 1}
