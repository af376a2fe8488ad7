"""Multi-turn rollouts: token-in token-out contexts, per-turn records, episode bookkeeping."""

import pytest

from spa_rl.agent import EpisodeConfig
from spa_rl.models import load_model_and_tokenizer
from spa_rl.rollout.backend import HFBackend, SamplingParams
from spa_rl.rollout.engine import make_episodes, run_rollouts
from spa_rl.tokens import ChatTokenizer


class ScriptedBackend:
    """Stands in for a model where the test needs to choose the responses (the protocol is what
    is under test, not a model): returns the canonical ids of scripted texts."""

    def __init__(self, chat, texts):
        self.chat, self.texts, self.calls = chat, list(texts), []

    def generate(self, prompts, params):
        self.calls.append([list(p) for p in prompts])
        text = self.texts.pop(0)
        from spa_rl.rollout.backend import Generation
        ids = self.chat.encode(text) + [self.chat.eos_token_id]
        return [Generation(ids, [-0.5] * len(ids), "eos") for _ in prompts]


@pytest.fixture(scope="module")
def tiny():
    return load_model_and_tokenizer("tiny", dtype="fp32")


def test_contexts_grow_by_exactly_the_sampled_ids(tiny):
    model, tok = tiny
    chat = ChatTokenizer(tok)
    eps = make_episodes("sokoban", "val", 0, 2, 2, EpisodeConfig(max_turns=3))
    rollouts = run_rollouts(eps, HFBackend(model, tok, seed=1), chat, SamplingParams(max_new_tokens=16))
    for r in rollouts:
        assert len(r.turns) == len(r.episode.turns) == 3
        ids = r.sequence.input_ids
        for t, turn in enumerate(r.turns):
            # the sampled ids sit right after the turn's prompt, with their log-probs, masked in
            assert ids[turn.prompt_len:turn.prompt_len + len(turn.sampled_ids)] == turn.sampled_ids
            seg = slice(turn.prompt_len, turn.prompt_len + len(turn.sampled_ids))
            assert all(r.sequence.loss_mask[seg]) and r.sequence.logprobs[seg] == turn.logprobs
            # the response the game saw is the decoded sample
            assert r.episode.turns[t].response == "<think>" + chat.decode(turn.sampled_ids)
        # nothing but sampled tokens is trained
        assert sum(r.sequence.loss_mask) == sum(len(t.sampled_ids) for t in r.turns)
        # the first prompt is the template rendering of the first two messages
        assert ids[:r.turns[0].prompt_len] == chat.prompt_ids(r.episode.messages[:2])


def test_scripted_episode_contexts_equal_the_template(tiny):
    _, tok = tiny
    chat = ChatTokenizer(tok)
    eps = make_episodes("sokoban", "val", 0, 1, 1, EpisodeConfig(max_turns=2))
    backend = ScriptedBackend(chat, [" go</think><answer>Up</answer>", " again</think><answer>Down</answer>"])
    (r,) = run_rollouts(eps, backend, chat, SamplingParams())
    msgs = r.episode.messages
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    rendered = chat.encode(chat.render(msgs, add_generation_prompt=False))
    assert r.sequence.input_ids == rendered[:len(r.sequence)]
    # the second call's prompt is the first context extended, never re-encoded
    assert backend.calls[1][0][:len(backend.calls[0][0])] == backend.calls[0][0]


def test_finished_episodes_are_not_sent_again(tiny):
    _, tok = tiny
    chat = ChatTokenizer(tok)
    eps = make_episodes("frozenlake", "val", 0, 1, 1, EpisodeConfig(max_turns=5, action_budget=1))
    backend = ScriptedBackend(chat, [" x</think><answer>Left</answer>"] * 5)
    (r,) = run_rollouts(eps, backend, chat, SamplingParams())
    assert len(backend.calls) == 1 and r.episode.done and r.episode.num_actions == 1


def test_context_overflow_stops_an_episode(tiny):
    model, tok = tiny
    chat = ChatTokenizer(tok)
    eps = make_episodes("sokoban", "val", 0, 1, 1, EpisodeConfig())
    first = len(chat.prompt_ids(eps[0][1].messages))
    (r,) = run_rollouts(eps, HFBackend(model, tok), chat, SamplingParams(max_new_tokens=8),
                        max_context_tokens=first + 8)
    assert r.context_overflow and len(r.turns) == 1
