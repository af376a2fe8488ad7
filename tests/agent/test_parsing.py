"""parse_response: the reference grammar, the fixed reference bug, and fuzzing (never raises)."""

import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spa_rl.agent.parsing import ParsedResponse, parse_response, serialize_response
from spa_rl.errors import ConfigError

MODES = ("base", "world-model")
TAGS = [
    "<think>", "</think>", "<answer>", "</answer>", "<observation>", "</observation>",
    "<prediction>", "</prediction>", "<|im_end|>", "<|im_start|>", "||", " ", "\n",
]

# The reference regexes (SPEC 2.4), used as an oracle on small inputs.
BASE_RE = re.compile(r"<think>(.*?)</think>\s*<answer>(.*?)</answer>", re.DOTALL)
WM_RE = re.compile(
    r"<think>\s*<observation>(.*?)</observation>(.*?)<prediction>(.*?)</prediction>\s*</think>"
    r"\s*<answer>(.*?)</answer>",
    re.DOTALL,
)


def check_invariants(p: ParsedResponse, max_actions: int) -> None:
    assert isinstance(p.actions, tuple)
    assert all(isinstance(a, str) and a and a == a.strip() and "||" not in a for a in p.actions)
    assert len(p.actions) <= max_actions
    assert isinstance(p.format_ok, bool)
    assert isinstance(p.normalized, str)
    if not p.format_ok:
        assert p.actions == ()
        assert p.observation is None and p.prediction is None


# --- examples ------------------------------------------------------------------------------


def test_base_well_formed():
    p = parse_response("<think> go up twice </think> <answer> Up || up ||  || Left </answer>", "base", 5)
    assert p.format_ok
    assert p.actions == ("Up", "up", "Left")
    assert p.think == "go up twice"
    assert p.answer == "Up || up ||  || Left"
    assert p.observation is None and p.prediction is None


def test_world_model_well_formed():
    text = (
        "<think>\n<observation>\n#P#\n</observation> push it <prediction>#_P</prediction>\n</think>\n"
        "<answer>Right</answer>"
    )
    p = parse_response(text, "world-model", 5)
    assert p.format_ok
    assert p.actions == ("Right",)
    assert (p.observation, p.think, p.prediction) == ("#P#", "push it", "#_P")


def test_actions_truncated_to_max():
    p = parse_response("<think>x</think><answer>A || B || C || D</answer>", "base", 2)
    assert p.actions == ("A", "B")
    assert p.answer == "A || B || C || D"
    assert "<answer> A || B </answer>" in p.normalized


def test_reference_bug_case_gives_no_actions():
    # SPEC 8 item 5: the reference returned the answer string when the world-model format was
    # missing; Sudoku then sent each character to the env.
    text = "<think> I will fill it </think> <answer> 1,2,3 || 2,2,1 </answer>"
    p = parse_response(text, "world-model", 5)
    assert p.actions == () and isinstance(p.actions, tuple)
    assert not p.format_ok
    assert p.normalized == text  # raw text kept for display
    # The same text is fine in base mode.
    assert parse_response(text, "base", 5).actions == ("1,2,3", "2,2,1")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Up || Down",
        "<answer>Up</answer>",
        "<think>no answer",
        "<think>x</think> words <answer>Up</answer>",  # text between </think> and <answer>
        "<think>x</think><answer>Up",  # unclosed answer
        "<think>x<answer>Up</answer>",  # no </think>
    ],
)
def test_base_format_failures(text):
    p = parse_response(text, "base", 5)
    assert not p.format_ok and p.actions == () and p.normalized == text


@pytest.mark.parametrize(
    "text",
    [
        "<think> plan <observation>s</observation> x <prediction>t</prediction> </think><answer>Up</answer>",
        "<think><observation>s</observation> x <prediction>t</prediction> more </think><answer>Up</answer>",
        "<think><observation>s</observation> x </think><answer>Up</answer>",
        "<think><prediction>t</prediction><observation>s</observation></think><answer>Up</answer>",
    ],
)
def test_world_model_format_failures(text):
    p = parse_response(text, "world-model", 5)
    assert not p.format_ok and p.actions == ()


def test_trailing_text_after_answer_is_ignored():
    p = parse_response("<think>a</think><answer>Up</answer> and then <answer>Down</answer>", "base", 5)
    assert p.format_ok and p.actions == ("Up",)
    assert p.normalized == "<think> a </think> <answer> Up </answer>"


def test_leading_text_before_think_is_tolerated():
    p = parse_response("Sure! <think>a</think><answer>Up</answer>", "base", 5)
    assert p.format_ok and p.actions == ("Up",)


def test_tags_and_chat_markers_removed_from_contents():
    p = parse_response("<think>a <think> b</think>\n<answer><|im_end|>Up || <th<think>ink>Down</answer>", "base", 5)
    assert p.format_ok
    assert p.think == "a  b"
    assert p.actions == ("Up", "Down")


def test_empty_answer_is_well_formed_with_no_actions():
    p = parse_response("<think>hmm</think><answer>  </answer>", "base", 5)
    assert p.format_ok and p.actions == ()


def test_max_actions_zero():
    p = parse_response("<think>a</think><answer>Up</answer>", "base", 0)
    assert p.format_ok and p.actions == ()


def test_non_str_input_does_not_raise():
    assert parse_response(None, "base", 5).actions == ()  # type: ignore[arg-type]
    assert parse_response(b"<think>", "base", 5).actions == ()  # type: ignore[arg-type]


def test_bad_mode_or_max_is_a_config_error():
    with pytest.raises(ConfigError, match="mode"):
        parse_response("x", "add_worldmodel", 5)
    with pytest.raises(ConfigError, match="max_actions"):
        parse_response("x", "base", -1)


def test_huge_adversarial_input_is_fast():
    # The reference regexes are quadratic here (each <think> rescans to the end).
    for text in ["<think>" * 200_000, "<think></think>" * 100_000 + "<answer>", "<think><observation>" * 100_000]:
        for mode in MODES:
            start = time.perf_counter()
            p = parse_response(text, mode, 5)
            assert time.perf_counter() - start < 2.0
            assert not p.format_ok
    big = "<think>" + "x" * 2_000_000 + "</think><answer>" + "Up || " * 100_000 + "</answer>"
    p = parse_response(big, "base", 5)
    assert p.format_ok and p.actions == ("Up",) * 5


# --- fuzzing -------------------------------------------------------------------------------

tag_soup = st.lists(st.one_of(st.sampled_from(TAGS), st.text(max_size=8)), max_size=30).map("".join)
any_text = st.one_of(st.text(max_size=300), tag_soup)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=any_text, mode=st.sampled_from(MODES), max_actions=st.integers(0, 6))
def test_never_raises_and_invariants_hold(text, mode, max_actions):
    p = parse_response(text, mode, max_actions)
    check_invariants(p, max_actions)
    # Parsing the normalised text gives the same result (idempotent normalisation).
    if p.format_ok:
        again = parse_response(p.normalized, mode, max_actions)
        assert again.format_ok
        assert again.actions == p.actions
        assert again.normalized == p.normalized
        assert (again.observation, again.prediction, again.think) == (p.observation, p.prediction, p.think)


@settings(max_examples=400, deadline=None)
@given(text=tag_soup, mode=st.sampled_from(MODES))
def test_matches_reference_regex(text, mode):
    """Same match decision and same raw spans as the reference regexes (SPEC 2.4)."""
    p = parse_response(text, mode, 100)
    m = (BASE_RE if mode == "base" else WM_RE).search(text)
    assert p.format_ok == (m is not None)
    if m is not None:
        answer = m.group(2) if mode == "base" else m.group(4)
        expected = [a.strip() for a in answer.split("||") if a.strip()]
        # Contents are cleaned of tags afterwards, so compare on tag-free answers only.
        if not any(t in answer for t in TAGS[:10]):
            assert list(p.actions) == expected


clean_text = st.text(
    alphabet=st.characters(blacklist_characters="<>|", blacklist_categories=("Cs",)), max_size=40
)
action = clean_text.map(str.strip).filter(bool)


@settings(max_examples=300, deadline=None)
@given(
    mode=st.sampled_from(MODES),
    think=clean_text,
    obs=clean_text,
    pred=clean_text,
    actions=st.lists(action, max_size=5),
)
def test_round_trip_well_formed(mode, think, obs, pred, actions):
    text = serialize_response(mode, think, " || ".join(actions), obs, pred)
    p = parse_response(text, mode, 5)
    assert p.format_ok
    assert p.actions == tuple(actions)
    assert p.think == think.strip()
    if mode == "world-model":
        assert (p.observation, p.prediction) == (obs.strip(), pred.strip())
    assert p.normalized == text or parse_response(p.normalized, mode, 5) == p
