"""Folders that appear whole or not at all.

A checkpoint is written into a hidden temporary folder beside its target and renamed into place
only when complete. Replacing an existing checkpoint goes through a `.old` name, so a crash at
any instant leaves either the new or the previous checkpoint readable (`find_complete` looks at
both). Completeness is marked by a `COMPLETE` file written last. SFT epoch checkpoints and the
PPO checkpoint both go through `atomic_dir`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

MARKER = "COMPLETE"


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder; on normal exit it becomes `target` (replacing an old one)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)  # debris of an interrupted write
    tmp.mkdir()
    try:
        yield tmp
        (tmp / MARKER).write_text("ok\n")
        for f in tmp.rglob("*"):  # data on disk before the rename makes it visible
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.parent / f".{target.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def is_complete(path: str | os.PathLike) -> bool:
    return (Path(path) / MARKER).is_file()


def find_complete(target: str | os.PathLike) -> Path | None:
    """The complete checkpoint at `target`, or the previous one if a swap was interrupted."""
    target = Path(target)
    for candidate in (target, target.parent / f".{target.name}.old"):
        if is_complete(candidate):
            return candidate
    return None


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
