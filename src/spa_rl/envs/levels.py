"""Reading level text: line splitting and errors that name line and column.

A level text is the env's `grid` render (see each env's docstring for its symbols). The rules
shared by all three games:

- lines are split on `\\n` (a `\\r` before it is dropped) and trailing whitespace of each line
  is ignored, so files saved on Windows or with trailing spaces still load;
- blank lines before and after the grid are ignored; a blank line inside the grid is an error;
- line and column numbers in error messages are 1-based and count the lines of the text as
  given (leading blank lines included), so they match what an editor shows.
"""

from __future__ import annotations

from spa_rl.errors import LevelFormatError

DEFAULT_SOURCE = "<level text>"


def level_error(source: str, line: int, column: int, problem: str) -> LevelFormatError:
    """A `LevelFormatError` whose message is `"{source}, line L, column C: {problem}"`.

    The numbers are also attached as attributes `line`, `column` and `source`.
    """
    err = LevelFormatError(f"{source}, line {line}, column {column}: {problem}")
    err.source = source  # type: ignore[attr-defined]
    err.line = line  # type: ignore[attr-defined]
    err.column = column  # type: ignore[attr-defined]
    return err


def level_lines(text: str, source: str = DEFAULT_SOURCE) -> list[tuple[int, str]]:
    """The grid lines of `text` as `(line_number, line)` pairs, trailing whitespace removed.

    Raises `LevelFormatError` if `text` is not a string, has no grid at all, or has a blank
    line between two grid lines.
    """
    if not isinstance(text, str):
        raise level_error(source, 1, 1, f"expected level text (str), got {type(text).__name__}")
    raw = [line.rstrip("\r").rstrip() for line in text.split("\n")]
    numbered = [(i + 1, line) for i, line in enumerate(raw)]
    filled = [i for i, (_, line) in enumerate(numbered) if line]
    if not filled:
        raise level_error(source, 1, 1, "the level text is empty")
    body = numbered[filled[0] : filled[-1] + 1]
    for number, line in body:
        if not line:
            raise level_error(source, number, 1, "blank line inside the grid")
    return body


def check_rectangular(lines: list[tuple[int, str]], source: str) -> int:
    """The common width of `lines`; raises naming the first line whose width differs."""
    width = len(lines[0][1])
    for number, line in lines[1:]:
        if len(line) != width:
            column = min(len(line), width) + 1
            raise level_error(
                source,
                number,
                column,
                f"row has {len(line)} cells but the first row has {width}; all rows must be equally long",
            )
    return width
