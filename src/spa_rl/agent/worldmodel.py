"""World-model helpers: ground-truth substitution (SPEC 3, step 6) and accuracy of the model's
own state estimates.

Substitution writes the true states into the model's `<observation>`/`<prediction>` spans so
that the SFT data teaches real dynamics. It is a plain text operation: the inserted text is
never interpreted (no regex replacement strings), so states containing backslashes, `\\1` or
`$` are copied exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

_OBS = ("<observation>", "</observation>")
_PRED = ("<prediction>", "</prediction>")


def substitute_world_model(response_text: str, true_observation: str, true_prediction: str) -> str:
    """Replace the content of every `<observation>...</observation>` with `true_observation`
    and of every `<prediction>...</prediction>` with `true_prediction`; tags and all other text
    are kept byte for byte. The states are inserted exactly (no padding, no stripping).

    Span matching is that of `re.sub(r"<observation>(.*?)</observation>", ..., flags=DOTALL)`:
    left to right, each opening tag pairs with the next closing tag; an opening tag with no
    closing tag after it is left alone. Responses without the tags come back unchanged.
    """
    text = _replace_spans(response_text, _OBS, true_observation)
    return _replace_spans(text, _PRED, true_prediction)


def ground_truth_messages(messages: Sequence[dict], states: Sequence[str]) -> list[dict]:
    """A copy of an episode's `messages` with the k-th assistant message (k = 1..T) passed
    through `substitute_world_model(text, states[k-1], states[k])`.

    `states` is `Episode.states` (s_0..s_T). This is the reference's in-place rewrite: earlier
    assistant turns that appear inside later prompts also carry the true states.
    """
    out: list[dict] = []
    k = 0
    for message in messages:
        message = dict(message)
        if message.get("role") == "assistant":
            k += 1
            if k < len(states):
                message["content"] = substitute_world_model(message["content"], states[k - 1], states[k])
        out.append(message)
    return out


def world_model_accuracy(
    observation: str | None,
    prediction: str | None,
    true_before: str,
    true_after: str,
    *,
    true_after_grid: str | None = None,
) -> dict[str, float]:
    """How well the model's stated current state and predicted next state match the truth.

    Returns (each in [0, 1]):
    - `observation_exact`: 1.0 iff `observation` equals `true_before`,
    - `prediction_exact`: 1.0 iff `prediction` equals `true_after`,
      both compared after `normalize_state` (surrounding whitespace of the text and of every
      line removed; nothing else forgiven);
    - `prediction_cell_accuracy`: fraction of the true next grid's cells that the prediction
      gets right, position by position. The true grid is `true_after_grid` when given (pass
      `env.render_text("grid")`), else `true_after` minus a trailing coordinate line (a last
      line containing "(" — grids never contain parentheses). A cell is a non-whitespace
      character other than the separator `|` (so Sokoban/FrozenLake rows are compared char by
      char and a Sudoku row `| 4 . . 3 | ...` cell by cell). The first non-empty lines of
      the prediction are aligned with the grid rows; missing rows or cells count as wrong,
      extra ones are ignored; coordinate text in the prediction is not scored.
    `None` (no span) scores 0 everywhere.
    """
    obs_ok = observation is not None and normalize_state(observation) == normalize_state(true_before)
    pred_ok = prediction is not None and normalize_state(prediction) == normalize_state(true_after)
    grid = true_after_grid if true_after_grid is not None else _strip_coordinate_line(true_after)
    cells = cell_accuracy(prediction or "", grid)
    return {
        "observation_exact": float(obs_ok),
        "prediction_exact": float(pred_ok),
        "prediction_cell_accuracy": cells,
    }


def normalize_state(text: str) -> str:
    """Text with surrounding whitespace removed from it and from each of its lines."""
    return "\n".join(line.strip() for line in text.strip().splitlines())


def cell_accuracy(predicted: str, true_grid: str) -> float:
    """Fraction of `true_grid`'s cells matched position-wise by `predicted` (see
    `world_model_accuracy`). A grid with no cells gives 1.0 only for a cell-free prediction."""
    true_rows = [_cells(line) for line in true_grid.splitlines() if line.strip()]
    pred_rows = [_cells(line) for line in predicted.splitlines() if line.strip()]
    total = sum(len(row) for row in true_rows)
    if total == 0:
        return 1.0 if not any(pred_rows) else 0.0
    correct = 0
    for r, true_row in enumerate(true_rows):
        pred_row = pred_rows[r] if r < len(pred_rows) else []
        correct += sum(1 for c, cell in enumerate(true_row) if c < len(pred_row) and pred_row[c] == cell)
    return correct / total


def _cells(line: str) -> list[str]:
    return [ch for ch in line if not ch.isspace() and ch != "|"]


def _strip_coordinate_line(state: str) -> str:
    lines = state.strip().splitlines()
    if len(lines) > 1 and "(" in lines[-1]:
        lines = lines[:-1]
    return "\n".join(lines)


def tag_content_spans(text: str, open_tag: str, close_tag: str) -> list[tuple[int, int]]:
    """Character spans `[start, end)` of the contents of `open_tag ... close_tag`, left to right;
    an opening tag pairs with the next closing tag, and an unclosed one gives no span."""
    spans = []
    pos = 0
    while True:
        start = text.find(open_tag, pos)
        if start == -1:
            return spans
        body = start + len(open_tag)
        end = text.find(close_tag, body)
        if end == -1:
            return spans
        spans.append((body, end))
        pos = end + len(close_tag)


def _replace_spans(text: str, tags: tuple[str, str], content: str) -> str:
    parts: list[str] = []
    pos = 0
    for body, end in tag_content_spans(text, *tags):
        parts.append(text[pos:body])
        parts.append(content)
        pos = end
    parts.append(text[pos:])
    return "".join(parts)
