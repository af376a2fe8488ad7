"""World-model SFT datasets: rows, the split by level, JSONL files and the dataset card.

A dataset is a folder written by `spa generate`:

    train.jsonl        one row per assistant turn (levels of the train part)
    validation.jsonl   the same for the held-out levels (absent when no level is held out)
    episodes.jsonl     every episode as played (`Episode.to_record()`), before substitution
    config.yaml        the resolved generation config
    README.md          the dataset card: counts, and the split files in its YAML header

A row is a chat example in the layout Hugging Face `datasets` and TRL read as is:
`prompt` (the messages before the turn; ends with a user message), `completion` (one assistant
message whose content starts with the `<think>` generation prefix), `messages` (prompt +
completion), and metadata columns (`ROW_METADATA`). The card is written last, so a folder with
a card is complete; each file is written to a temporary name and renamed into place.

The split is by level: every row of a level lands in the same file, so no validation level
(hence no validation trajectory) was seen in training. The reference split rows at random,
which leaks trajectories (SPEC 8 item 4).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from spa_rl.artifacts import read_jsonl, write_jsonl  # noqa: F401  (the dataset files are JSONL)
from spa_rl.errors import DataError

SPLIT_FILES = {"train": "train.jsonl", "validation": "validation.jsonl"}
CARD = "README.md"
EPISODES_FILE = "episodes.jsonl"
CHAT_COLUMNS = ("prompt", "completion", "messages")
# name -> meaning (documented in the card and docs/sft.md)
ROW_METADATA = {
    "env": "game name",
    "level_seed": "reset seed of the level (`level_seed('train', level)`)",
    "level": "index of the level in the train seed stream",
    "episode": "index of the episode in the generation run",
    "turn": "1-based turn of this row's completion",
    "num_turns": "turns the episode took",
    "success": "the episode was solved",
    "format_ok": "this turn's response (as generated) matched the world-model format",
    "substituted": "the observation/prediction contents were replaced by the true states",
    "actions": "actions executed in this turn",
    "policy": "who chose the actions: self, random or solver",
}

_COORD = re.compile(r"\((\d+),(\d+)\)")


# ---- rows ------------------------------------------------------------------------------------


def rows_from_messages(messages: Sequence[dict], metadata: dict, turn_metadata: Sequence[dict]) -> list[dict]:
    """One row per assistant message of a conversation [system, user, assistant, user, ...].

    `metadata` goes into every row; `turn_metadata[k]` into the row of the (k+1)-th assistant
    message (it must have one entry per assistant message).
    """
    n_assistant = sum(m["role"] == "assistant" for m in messages)
    if n_assistant != len(turn_metadata):
        raise DataError(f"{n_assistant} assistant messages but {len(turn_metadata)} turn metadata entries")
    rows = []
    k = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0 or messages[i - 1]["role"] != "user":
            raise DataError(f"assistant message {i} does not follow a user message")
        prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:i]]
        completion = [{"role": "assistant", "content": message["content"]}]
        rows.append({"prompt": prompt, "completion": completion, "messages": prompt + completion,
                     **metadata, "turn": k + 1, **turn_metadata[k]})
        k += 1
    return rows


def randomize_coordinates(state: str, rows: int, cols: int, base: int, rng: random.Random) -> str:
    """`state` with every `(r,c)` of its coordinate line (the last line of a grid+coords render)
    replaced by an independent uniform in-grid coordinate (`base`-indexed). The grid lines are
    kept. The random-coordinates ablation (paper Fig. 5)."""
    head, sep, last = state.rpartition("\n")
    if not sep or not _COORD.search(last):
        return state

    def draw(_):
        return f"({rng.randrange(rows) + base},{rng.randrange(cols) + base})"

    return head + sep + _COORD.sub(draw, last)


# ---- the split -------------------------------------------------------------------------------


def split_levels(levels: Iterable[int], val_fraction: float, seed: int = 0) -> set[int]:
    """The held-out levels: `round(val_fraction * n)` of the n distinct levels, at least one
    when `val_fraction > 0` and at most n - 1 (so both parts have a level when n >= 2), chosen
    by a seeded shuffle of the sorted levels (the same levels give the same split)."""
    distinct = sorted(set(levels))
    if val_fraction <= 0 or len(distinct) < 2:
        return set()
    n_val = min(len(distinct) - 1, max(1, round(val_fraction * len(distinct))))
    random.Random(seed).shuffle(distinct)
    return set(distinct[:n_val])


# ---- files -----------------------------------------------------------------------------------


def load_rows(data_dir: str | Path, split: str) -> list[dict]:
    """The rows of one split of a dataset folder ([] when the split file is absent but the
    folder is a complete dataset). Checks that every row has the chat columns."""
    data_dir = Path(data_dir)
    if split not in SPLIT_FILES:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLIT_FILES)}")
    path = data_dir / SPLIT_FILES[split]
    if not path.is_file():
        if split == "train" or not (data_dir / CARD).is_file():
            raise DataError(f"{data_dir} is not a complete spa dataset ({SPLIT_FILES[split]} or {CARD} "
                            "missing); create one with `spa generate --out DIR`")
        return []
    rows = read_jsonl(path)
    for n, row in enumerate(rows, 1):
        missing = [c for c in ("prompt", "completion") if c not in row]
        if missing:
            raise DataError(f"{path} row {n}: missing column(s) {', '.join(missing)}")
        comp = row["completion"]
        if not (isinstance(comp, list) and len(comp) == 1 and comp[0].get("role") == "assistant"):
            raise DataError(f"{path} row {n}: completion must be a list with one assistant message")
        if not row["prompt"] or row["prompt"][-1].get("role") != "user":
            raise DataError(f"{path} row {n}: prompt must end with a user message")
    return rows


# ---- the card --------------------------------------------------------------------------------


def split_stats(rows: Sequence[dict]) -> dict[str, Any]:
    """Counts for the card: episodes, levels, rows, format-valid share, success share, mean turns."""
    episodes: dict[int, dict] = {}
    for r in rows:
        episodes.setdefault(r["episode"], r)
    n_ep = len(episodes)
    return {
        "episodes": n_ep,
        "levels": len({r["level_seed"] for r in rows}),
        "rows": len(rows),
        "format_valid_share": sum(bool(r["format_ok"]) for r in rows) / len(rows) if rows else 0.0,
        "success_share": sum(bool(r["success"]) for r in episodes.values()) / n_ep if n_ep else 0.0,
        "mean_turns": sum(r["num_turns"] for r in episodes.values()) / n_ep if n_ep else 0.0,
    }


def dataset_card(title: str, stats: dict[str, dict], notes: Sequence[str], config: dict) -> str:
    """Markdown card with a YAML header naming the split files (read by `load_dataset(DIR)`)."""
    splits = [s for s in SPLIT_FILES if stats.get(s, {}).get("rows")]
    header = ["---", "configs:", "- config_name: default", "  data_files:"]
    for s in splits:
        header += [f"  - split: {s}", f"    path: {SPLIT_FILES[s]}"]
    header += ["---", ""]
    cols = ["episodes", "levels", "rows", "format_valid_share", "success_share", "mean_turns"]
    table = ["| part | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for part, st in stats.items():
        cells = [f"{st[c]:.3f}" if isinstance(st[c], float) else str(st[c]) for c in cols]
        table.append(f"| {part} | " + " | ".join(cells) + " |")
    meta = [f"- `{k}`: {v}" for k, v in ROW_METADATA.items()]
    settings = [f"- `{k}`: `{v}`" for k, v in config.items()]
    body = [f"# {title}", "", *notes, "", "## Counts", "", *table, "",
            "`format_valid_share` is over rows (turns), `success_share` and `mean_turns` over episodes.", "",
            "## Files", "",
            "- `train.jsonl`, `validation.jsonl`: one row per assistant turn; the split is by level.",
            "- `episodes.jsonl`: every episode as played, before ground-truth substitution.",
            "- `config.yaml`: the generation settings.", "",
            "Load with `datasets.load_dataset(\"<this folder>\")` or train with `spa sft --data <this folder>`.", "",
            "## Columns", "",
            "- `prompt`: the conversation before the turn (ends with a user message).",
            "- `completion`: one assistant message; its content starts with the `<think>` generation prefix.",
            "- `messages`: `prompt + completion`.", *meta, "",
            "## Settings", "", *settings, ""]
    return "\n".join(header + body)
