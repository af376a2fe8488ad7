"""Response parsing: one parser for both prompt modes.

The model's turn is the full assistant text *including* the `<think>` generation prefix (the
rollout engine forces `<think>` as the first token and prepends it before calling us).

Grammar (tags are case-sensitive, contents may span lines):

- base:        `<think> THINK </think> <answer> ANSWER </answer>`
- world-model: `<think> <observation> OBS </observation> THINK <prediction> PRED </prediction>
  </think> <answer> ANSWER </answer>`

Only whitespace may sit between `</think>` and `<answer>`; in world-model mode also between
`<think>` and `<observation>` and between `</prediction>` and `</think>`. Matching is the
leftmost-first, shortest-content match of the reference regexes (SPEC 2.4), implemented with
`str.find` so that it runs in linear time on any input (the regexes are quadratic on inputs
full of unclosed tags). Text before the opening `<think>` and after the first `</answer>` is
tolerated and ignored: the rollout stops generating at `</answer>`, so trailing text only
appears when a caller passes untrimmed text, and it never changes the actions.

Contents are cleaned by removing every occurrence of the protocol tags and chat-template
markers (`<think>`, `</answer>`, `<|im_end|>`, ...) and stripping surrounding whitespace.
Actions are the cleaned answer split on `||`, each stripped, empties dropped, and the first
`max_actions` kept.

Deviation from the reference (SPEC 8 item 5): when the full format is missing the reference's
world-model parser returned the answer *string* as the action list (so Sudoku fed every
character to the env). Here a missing format always gives `actions == ()` and
`format_ok is False`, in both modes.

`parse_response` never raises on any text; it only raises `ConfigError` for a bad `mode` or
`max_actions` (those are programming/config errors, not model output).
"""

from __future__ import annotations

from dataclasses import dataclass

from spa_rl.errors import ConfigError

MODES = ("base", "world-model")
ACTION_SEPARATOR = "||"
# How actions are joined when a response is re-serialised (and in the prompts).
ACTION_JOINER = " || "

# Strings removed from every parsed content. Chat-template markers appear when a model
# hallucinates a turn boundary inside its text.
_TAGS = (
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    "<observation>",
    "</observation>",
    "<prediction>",
    "</prediction>",
)
_CHAT_MARKERS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
_REMOVED = _TAGS + _CHAT_MARKERS


@dataclass(frozen=True)
class ParsedResponse:
    """What the model said, in structured form.

    `actions` holds at most `max_actions` non-empty stripped strings (never a bare string);
    it is empty whenever `format_ok` is False. `think`/`answer` are the cleaned contents
    (empty strings on a format failure). `observation`/`prediction` are the cleaned world-model
    contents in world-model mode when the format matched, else None. `normalized` is the
    canonical re-serialisation (`serialize_response`) of a well-formed response, or the raw
    text unchanged when the format failed; it is for display only (the episode history keeps
    the raw text).
    """

    actions: tuple[str, ...]
    format_ok: bool
    think: str
    answer: str
    observation: str | None
    prediction: str | None
    normalized: str


def parse_response(text: str, mode: str, max_actions: int) -> ParsedResponse:
    """Parse one assistant turn (including its leading `<think>`) in `mode`.

    Never raises for any `text`; non-str input is treated as its `str()` (None as "").
    """
    if mode not in MODES:
        raise ConfigError(f"mode: unknown prompt mode {mode!r}; use one of {', '.join(MODES)}")
    if isinstance(max_actions, bool) or not isinstance(max_actions, int) or max_actions < 0:
        raise ConfigError(f"max_actions: must be an integer >= 0, got {max_actions!r}")
    if not isinstance(text, str):
        text = "" if text is None else str(text)

    spans = _match_base(text) if mode == "base" else _match_world_model(text)
    if spans is None:
        return ParsedResponse((), False, "", "", None, None, text)

    think = _clean(spans["think"])
    answer = _clean(spans["answer"])
    all_actions = split_actions(answer)
    actions = tuple(all_actions[:max_actions])
    # Like the reference: a truncated answer is shown as the kept actions only.
    shown_answer = ACTION_JOINER.join(actions) if len(all_actions) > max_actions else answer
    if mode == "base":
        observation = prediction = None
    else:
        observation = _clean(spans["observation"])
        prediction = _clean(spans["prediction"])
    normalized = serialize_response(mode, think, shown_answer, observation, prediction)
    return ParsedResponse(actions, True, think, answer, observation, prediction, normalized)


def split_actions(answer: str) -> list[str]:
    """`"Up || Left||  || Down"` -> `["Up", "Left", "Down"]`."""
    return [a.strip() for a in answer.split(ACTION_SEPARATOR) if a.strip()]


def serialize_response(
    mode: str,
    think: str,
    answer: str,
    observation: str | None = None,
    prediction: str | None = None,
) -> str:
    """Build a well-formed response in `mode` from its parts (the inverse of the parser).

    Parts must not contain protocol tags. Also used to write synthetic responses, e.g. the
    random-policy ablation: `serialize_response("world-model", reasoning, "Up || Left", obs, pred)`.
    """
    if mode == "base":
        return f"<think> {think} </think> <answer> {answer} </answer>"
    if mode == "world-model":
        return (
            f"<think> <observation>{observation or ''}</observation> {think} "
            f"<prediction>{prediction or ''}</prediction> </think> <answer> {answer} </answer>"
        )
    raise ConfigError(f"mode: unknown prompt mode {mode!r}; use one of {', '.join(MODES)}")


# --- matching ----------------------------------------------------------------------------
# Each matcher reproduces `re.search(PATTERN, text, re.DOTALL)` for the reference pattern.
# Lazy groups plus backtracking reduce to "take the first occurrence of each delimiter",
# because a later delimiter can only leave less room for the rest of the pattern (so if the
# first choice fails, every later one fails too). That keeps every step a single `find`.


def _skip_ws(text: str, i: int) -> int:
    n = len(text)
    while i < n and text[i].isspace():
        i += 1
    return i


def _find_joined(text: str, start: int, first: str, second: str) -> tuple[int, int]:
    """First `first \\s* second` at or after `start`: (index of `first`, end of `second`)."""
    i = text.find(first, start)
    while i != -1:
        j = _skip_ws(text, i + len(first))
        if text.startswith(second, j):
            return i, j + len(second)
        i = text.find(first, i + 1)
    return -1, -1


def _match_base(text: str) -> dict[str, str] | None:
    # <think>(.*?)</think>\s*<answer>(.*?)</answer>
    start = text.find("<think>")
    if start == -1:
        return None
    body = start + len("<think>")
    close_think, answer_start = _find_joined(text, body, "</think>", "<answer>")
    if close_think == -1:
        return None
    close_answer = text.find("</answer>", answer_start)
    if close_answer == -1:
        return None
    return {"think": text[body:close_think], "answer": text[answer_start:close_answer]}


def _match_world_model(text: str) -> dict[str, str] | None:
    # <think>\s*<observation>(.*?)</observation>(.*?)<prediction>(.*?)</prediction>\s*</think>
    # \s*<answer>(.*?)</answer>
    _, obs_start = _find_joined(text, 0, "<think>", "<observation>")
    if obs_start == -1:
        return None
    obs_end = text.find("</observation>", obs_start)
    if obs_end == -1:
        return None
    think_start = obs_end + len("</observation>")
    pred_open = text.find("<prediction>", think_start)
    if pred_open == -1:
        return None
    pred_start = pred_open + len("<prediction>")
    # </prediction>\s*</think>\s*<answer>
    i = text.find("</prediction>", pred_start)
    while i != -1:
        j = _skip_ws(text, i + len("</prediction>"))
        if text.startswith("</think>", j):
            k = _skip_ws(text, j + len("</think>"))
            if text.startswith("<answer>", k):
                answer_start = k + len("<answer>")
                close_answer = text.find("</answer>", answer_start)
                if close_answer == -1:
                    return None
                return {
                    "observation": text[obs_start:obs_end],
                    "think": text[think_start:pred_open],
                    "prediction": text[pred_start:i],
                    "answer": text[answer_start:close_answer],
                }
        i = text.find("</prediction>", i + 1)
    return None


def _clean(content: str) -> str:
    """Remove every protocol tag / chat marker, then strip.

    Removal is done in one left-to-right pass with a stack, so removing one tag can never
    leave a new tag behind (`"<th<think>ink>"` -> `""`), which keeps
    `parse(normalized) == parsed` for every input.
    """
    if not any(tag in content for tag in _REMOVED):
        return content.strip()
    out: list[str] = []
    for ch in content:
        out.append(ch)
        if ch == ">":
            for tag in _REMOVED:
                n = len(tag)
                if len(out) >= n and "".join(out[-n:]) == tag:
                    del out[-n:]
                    break
    return "".join(out).strip()
