"""The one token path: incremental contexts equal the chat template's rendering, masks are exact."""

import pytest
from hypothesis import given, settings, strategies as st

from spa_rl.models.tiny import build_byte_tokenizer
from spa_rl.tokens import ChatTokenizer, TokenSequence, conversation_to_sequence


@pytest.fixture(scope="module")
def smol_chat(default_model_dir):
    from transformers import AutoTokenizer
    return ChatTokenizer(AutoTokenizer.from_pretrained(default_model_dir))


@pytest.fixture(scope="module")
def byte_chat():
    return ChatTokenizer(build_byte_tokenizer())


def conversation(responses):
    msgs = [{"role": "system", "content": "You're a helpful assistant. "},
            {"role": "user", "content": "Turn 1:\nState:\n######\n#_P_O#\n######\nYou have 10 actions left."}]
    for t, r in enumerate(responses):
        msgs.append({"role": "assistant", "content": "<think>" + r})
        if t + 1 < len(responses):
            msgs.append({"role": "user", "content": f"Reward:\n-0.1\n\nTurn {t + 2}:\nState:\n#P__O#"})
    return msgs


RESPONSES = [" I go right.</think><answer>Right</answer>", " Again right.</think><answer>Right || Right</answer>",
             " Done?</think><answer>Up</answer>"]


@pytest.mark.parametrize("which", ["smol_chat", "byte_chat"])
def test_incremental_context_equals_template_rendering(which, request):
    chat = request.getfixturevalue(which)
    msgs = conversation(RESPONSES)
    seq = conversation_to_sequence(chat, msgs)
    rendered = chat.encode(chat.render(msgs, add_generation_prompt=False))
    # The template ends the conversation with the end-of-turn text ("<|im_end|>\n"): the sequence
    # stops after the last end-of-turn token, which the model produced.
    assert seq.input_ids == rendered[:len(seq)]
    assert chat.tokenizer.decode(rendered[len(seq):]) == "\n"


@pytest.mark.parametrize("which", ["smol_chat", "byte_chat"])
def test_loss_mask_covers_exactly_the_assistant_responses(which, request):
    chat = request.getfixturevalue(which)
    seq = conversation_to_sequence(chat, conversation(RESPONSES))
    trained_runs, run = [], []
    for tok, m in zip(seq.input_ids, seq.loss_mask):
        if m:
            run.append(tok)
        elif run:
            trained_runs.append(run)
            run = []
    if run:
        trained_runs.append(run)
    assert len(trained_runs) == 3
    for ids, response in zip(trained_runs, RESPONSES):
        # the response after the <think> prefix, then the end-of-turn token
        assert ids[-1] == chat.eos_token_id
        assert chat.tokenizer.decode(ids[:-1]) == response
    assert sorted(set(seq.turn_ids)) == [0, 1, 2, 3]


def test_last_turn_only_mask(byte_chat):
    seq = conversation_to_sequence(byte_chat, conversation(RESPONSES), train_turns="last")
    trained = [t for t, m in zip(seq.input_ids, seq.loss_mask) if m]
    assert byte_chat.tokenizer.decode(trained[:-1]) == RESPONSES[-1]


def test_prompt_ends_with_generation_prefix(smol_chat):
    ids = smol_chat.prompt_ids(conversation([])[:2])
    assert smol_chat.tokenizer.decode(ids).endswith("<|im_start|>assistant\n<think>")


def test_continuation_without_sampled_eos_adds_the_end_of_turn(smol_chat):
    with_eos = smol_chat.continuation_ids({"role": "user", "content": "x"}, ended_with_eos=True)
    without = smol_chat.continuation_ids({"role": "user", "content": "x"}, ended_with_eos=False)
    assert without == [smol_chat.eos_token_id] + with_eos


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40), min_size=1, max_size=3))
def test_byte_tokenizer_contexts_match_for_any_text(responses):
    # Byte-level tokens never merge across a boundary, so equality holds for any text at all.
    chat = ChatTokenizer(build_byte_tokenizer())
    msgs = conversation([r.replace("<|", "< |") for r in responses])
    seq = conversation_to_sequence(chat, msgs)
    assert seq.input_ids == chat.encode(chat.render(msgs, add_generation_prompt=False))[:len(seq)]


def test_token_sequence_rejects_mismatched_logprobs():
    with pytest.raises(ValueError):
        TokenSequence().add([1, 2], trained=True, logprobs=[0.0])


def test_template_that_rewrites_history_is_refused():
    from spa_rl.errors import ConfigError
    tok = build_byte_tokenizer()
    # drops assistant content from history, like reasoning-stripping templates do
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{m.role}}\n{% if m.role != 'assistant' %}"
                         "{{m.content}}{% endif %}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(ConfigError):
        ChatTokenizer(tok)
