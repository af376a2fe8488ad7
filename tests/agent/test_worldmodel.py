"""Ground-truth substitution and world-model accuracy."""

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from spa_rl.agent.worldmodel import (
    cell_accuracy,
    ground_truth_messages,
    normalize_state,
    substitute_world_model,
    world_model_accuracy,
)

GRID = "######\n#___O#\n#____#\n###X_#\n###P_#\n######"
COORDS = "Player (P) is at (4,3); box (X) is at (3,3); target (O) is at (1,4)."
STATE = GRID + "\n" + COORDS


def test_substitution_replaces_contents_only():
    text = (
        "<think> <observation>I think P is somewhere</observation> plan <prediction>\n??\n</prediction> </think>"
        " <answer>Up</answer>"
    )
    out = substitute_world_model(text, "OBS", "PRED")
    assert out == (
        "<think> <observation>OBS</observation> plan <prediction>PRED</prediction> </think> <answer>Up</answer>"
    )


def test_substitution_every_span_and_no_tags():
    text = "<observation>a</observation><observation>b</observation>x<prediction></prediction>"
    expected = "<observation>S</observation><observation>S</observation>x<prediction>T</prediction>"
    assert substitute_world_model(text, "S", "T") == expected
    assert substitute_world_model("<think>no tags</think>", "S", "T") == "<think>no tags</think>"
    # An unclosed tag is left alone, like re.sub would.
    assert substitute_world_model("<observation>open", "S", "T") == "<observation>open"


def test_substitution_is_literal_with_backslashes():
    nasty = r"a\1b\g<0>c\\d$1 \n" + "\\"
    text = "<observation>x</observation> <prediction>y</prediction>"
    out = substitute_world_model(text, nasty, nasty + "!")
    assert out == f"<observation>{nasty}</observation> <prediction>{nasty}!</prediction>"


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(
        st.one_of(
            st.sampled_from(["<observation>", "</observation>", "<prediction>", "</prediction>"]),
            st.text(max_size=6),
        ),
        max_size=16,
    ),
    obs=st.text(max_size=20),
    pred=st.text(max_size=20),
)
def test_substitution_matches_re_sub_with_function(pieces, obs, pred):
    text = "".join(pieces)
    def sub(tag, content, s):
        return re.sub(rf"(<{tag}>).*?(</{tag}>)", lambda m: m.group(1) + content + m.group(2), s, flags=re.DOTALL)

    expected = sub("prediction", pred, sub("observation", obs, text))
    assert substitute_world_model(text, obs, pred) == expected


def test_ground_truth_messages_uses_states_per_turn():
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "u1 <observation>keep</observation>"},
        {"role": "assistant", "content": "<think><observation>?</observation><prediction>?</prediction>"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "<think>no tags</think>"},
        {"role": "user", "content": "u3"},
        {"role": "assistant", "content": "<observation>?</observation><prediction>?</prediction>"},
    ]
    out = ground_truth_messages(messages, ["s0", "s1", "s2", "s3"])
    assert out[1] == messages[1]  # user text untouched
    assert out[2]["content"] == "<think><observation>s0</observation><prediction>s1</prediction>"
    assert out[4]["content"] == "<think>no tags</think>"
    assert out[6]["content"] == "<observation>s2</observation><prediction>s3</prediction>"
    assert messages[2]["content"].startswith("<think><observation>?")  # input not modified


def test_accuracy_exact_matches():
    acc = world_model_accuracy("\n" + STATE + "  \n", STATE, STATE, STATE)
    assert acc == {"observation_exact": 1.0, "prediction_exact": 1.0, "prediction_cell_accuracy": 1.0}
    acc = world_model_accuracy(None, None, STATE, STATE)
    assert acc == {"observation_exact": 0.0, "prediction_exact": 0.0, "prediction_cell_accuracy": 0.0}
    # Trailing spaces of a line are forgiven (the Sudoku render ends its row line with one).
    assert normalize_state("| 1 2 |  \nEmpty.") == normalize_state("| 1 2 |\nEmpty.")


def test_cell_accuracy_ignores_coordinates_and_counts_missing_cells():
    wrong_coords = GRID + "\nPlayer (P) is at (0,0)."
    acc = world_model_accuracy(STATE, wrong_coords, STATE, STATE)
    assert acc["prediction_exact"] == 0.0
    assert acc["prediction_cell_accuracy"] == 1.0
    one_wrong = GRID.replace("###P_#", "###_P#")  # two cells differ
    assert cell_accuracy(one_wrong, GRID) == 34 / 36
    short = "\n".join(GRID.splitlines()[:3])  # half the rows missing
    assert cell_accuracy(short, GRID) == 0.5
    truncated_row = GRID.replace("###P_#", "###")  # 3 missing cells
    assert cell_accuracy(truncated_row, GRID) == 33 / 36
    assert cell_accuracy("", GRID) == 0.0


def test_cell_accuracy_explicit_grid_and_sudoku_cells():
    board = "| 4 . . 3 | 3 1 . . | . 4 . 2 | 2 3 4 1 "
    state = board + "\nEmpty positions to be filled are at (1,2), (1,3)."
    pred = "|4 2 . 3|3 1 . .|. 4 . 2|2 3 4 1"  # spacing differs, one cell differs (16 cells)
    acc = world_model_accuracy(None, pred, state, state, true_after_grid=board)
    assert acc["prediction_cell_accuracy"] == 15 / 16
    assert world_model_accuracy(None, pred, state, state)["prediction_cell_accuracy"] == 15 / 16
