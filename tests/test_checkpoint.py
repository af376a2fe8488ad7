"""Atomic checkpoint folders (spa_rl/checkpoint.py), on real files."""

import os

import pytest

from spa_rl.checkpoint import MARKER, atomic_dir, find_complete, is_complete


def write(target, text):
    with atomic_dir(target) as tmp:
        (tmp / "weights.txt").write_text(text)


def test_a_finished_write_is_complete_and_leaves_no_debris(tmp_path):
    target = tmp_path / "ckpt"
    write(target, "v1")
    assert is_complete(target) and (target / "weights.txt").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    # an ordinary folder, not mkdtemp's private 0700
    umask = os.umask(0)
    os.umask(umask)
    assert (target.stat().st_mode & 0o777) == (0o777 & ~umask)


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path):
    target = tmp_path / "ckpt"
    write(target, "v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "weights.txt").write_text("half")
            raise RuntimeError("killed while saving")
    assert (target / "weights.txt").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_replacing_overwrites_and_debris_of_a_killed_write_is_cleared(tmp_path):
    target = tmp_path / "ckpt"
    write(target, "v1")
    (tmp_path / ".ckpt.tmp").mkdir()  # what SIGKILL during a write leaves behind
    (tmp_path / ".ckpt.tmp" / "weights.txt").write_text("torn")
    write(target, "v2")
    assert (target / "weights.txt").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_find_complete_falls_back_to_the_old_folder_of_an_interrupted_swap(tmp_path):
    target = tmp_path / "ckpt"
    assert find_complete(target) is None
    write(target, "v1")
    os.replace(target, tmp_path / ".ckpt.old")  # killed between the two renames of a replacement
    assert find_complete(target) == tmp_path / ".ckpt.old"
    (tmp_path / ".ckpt.old" / MARKER).unlink()
    assert find_complete(target) is None  # an incomplete folder is never offered
