"""spa_rl.data: rows, the split by level, JSONL files, the card (and that `datasets` reads them)."""

import json
import random
import re

import pytest

from spa_rl.data import (
    dataset_card,
    load_rows,
    randomize_coordinates,
    read_jsonl,
    rows_from_messages,
    split_levels,
    split_stats,
    write_jsonl,
)
from spa_rl.errors import DataError

MESSAGES = [
    {"role": "system", "content": "sys"},
    {"role": "user", "content": "u1"},
    {"role": "assistant", "content": "<think> a1"},
    {"role": "user", "content": "u2"},
    {"role": "assistant", "content": "<think> a2"},
]


def _rows():
    return rows_from_messages(MESSAGES, {"env": "sokoban", "level_seed": 3, "episode": 0, "num_turns": 2,
                                         "success": True},
                              [{"format_ok": True}, {"format_ok": False}])


def test_rows_from_messages_one_row_per_assistant_turn():
    rows = _rows()
    assert [r["turn"] for r in rows] == [1, 2]
    assert rows[0]["prompt"] == MESSAGES[:2]
    assert rows[1]["prompt"] == MESSAGES[:4]
    assert rows[1]["completion"] == [MESSAGES[4]]
    assert all(r["messages"] == r["prompt"] + r["completion"] for r in rows)
    assert [r["format_ok"] for r in rows] == [True, False]
    assert all(r["level_seed"] == 3 for r in rows)
    with pytest.raises(DataError):
        rows_from_messages(MESSAGES, {}, [{}])  # one metadata entry per assistant turn


@pytest.mark.parametrize("n,frac", [(2, 0.2), (10, 0.2), (160, 0.2), (7, 0.5), (50, 0.01)])
def test_split_levels_is_by_level_and_deterministic(n, frac):
    levels = list(range(100, 100 + n)) * 3  # repeated seeds: several episodes per level
    val = split_levels(levels, frac, seed=1)
    assert val == split_levels(list(reversed(levels)), frac, seed=1)  # order does not matter
    assert 1 <= len(val) <= n - 1
    assert len(val) == min(n - 1, max(1, round(frac * n)))
    assert val <= set(levels)


def test_split_levels_edge_cases():
    assert split_levels([5, 5, 5], 0.2) == set()  # a single level cannot be split
    assert split_levels(range(10), 0.0) == set()
    assert split_levels(range(100), 0.2, seed=0) != split_levels(range(100), 0.2, seed=1)


def test_randomize_coordinates_keeps_grid_and_stays_in_grid():
    state = "######\n#_P_O#\n#_X__#\n######\nPlayer (P) is at (1,2); box (X) is at (2,2); target (O) is at (1,4)."
    rng = random.Random(0)
    seen = set()
    for _ in range(50):
        new = randomize_coordinates(state, 4, 6, 0, rng)
        grid, line = new.rsplit("\n", 1)
        assert grid == state.rsplit("\n", 1)[0]
        assert re.sub(r"\(\d+,\d+\)", "()", line) == re.sub(r"\(\d+,\d+\)", "()", state.rsplit("\n", 1)[1])
        coords = [(int(r), int(c)) for r, c in re.findall(r"\((\d+),(\d+)\)", line)]
        assert len(coords) == 3 and all(0 <= r < 4 and 0 <= c < 6 for r, c in coords)
        seen.update(coords)
    assert len(seen) > 10  # really random
    one_based = randomize_coordinates("| 1 . |\nEmpty position to be filled is at (1,2).", 2, 2, 1, rng)
    assert re.search(r"\(([12]),([12])\)", one_based)
    assert randomize_coordinates("######\n#P__#", 2, 5, 0, rng) == "######\n#P__#"  # no coordinate line


def test_jsonl_roundtrip_and_errors(tmp_path):
    rows = _rows()
    assert write_jsonl(tmp_path / "train.jsonl", rows) == 2
    assert read_jsonl(tmp_path / "train.jsonl") == rows
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{oops\n')
    with pytest.raises(DataError, match="line 2"):
        read_jsonl(tmp_path / "bad.jsonl")


def test_load_rows_checks_folder_and_columns(tmp_path):
    with pytest.raises(DataError, match="spa generate"):
        load_rows(tmp_path, "train")
    write_jsonl(tmp_path / "train.jsonl", _rows())
    (tmp_path / "README.md").write_text("card")
    assert len(load_rows(tmp_path, "train")) == 2
    assert load_rows(tmp_path, "validation") == []  # absent split of a complete dataset
    bad = _rows()
    bad[1]["prompt"] = bad[1]["prompt"][:-1]  # ends with an assistant message
    write_jsonl(tmp_path / "train.jsonl", bad)
    with pytest.raises(DataError, match="row 2"):
        load_rows(tmp_path, "train")


def test_card_counts_and_datasets_reads_the_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    train = _rows()
    val = rows_from_messages(MESSAGES[:3], {"env": "sokoban", "level_seed": 4, "episode": 1, "num_turns": 1,
                                            "success": False}, [{"format_ok": True}])
    stats = {"train": split_stats(train), "validation": split_stats(val), "all": split_stats(train + val)}
    assert stats["all"] == {"episodes": 2, "levels": 2, "rows": 3, "format_valid_share": 2 / 3,
                            "success_share": 0.5, "mean_turns": 1.5}
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "validation.jsonl", val)
    (tmp_path / "episodes.jsonl").write_text(json.dumps({"other": "schema"}) + "\n")  # must not be read as data
    (tmp_path / "README.md").write_text(dataset_card("t", stats, ["note"], {"env": "sokoban"}))
    ds = datasets.load_dataset(str(tmp_path))
    assert ds["train"].num_rows == 2 and ds["validation"].num_rows == 1
    assert ds["train"][1]["completion"] == [{"role": "assistant", "content": "<think> a2"}]
    ds = datasets.load_dataset("json", data_files={"train": str(tmp_path / "train.jsonl")})
    assert ds["train"].num_rows == 2
