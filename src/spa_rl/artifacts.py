"""Everything a run writes to disk, in one place: atomic files and folders, JSONL, the metrics
log, and the checkpoint layout that SFT and PPO share.

Run folder (`spa sft`, `spa train`; the pipeline nests one per stage):

    config.yaml              the resolved config
    metrics.jsonl            one JSON record per step / validation ({"step": N, ...}); appended
                             on resume after dropping the records past the checkpoint
    tb/                      TensorBoard scalars of the same records
    checkpoint-epoch-N/      SFT: after epoch N     } one layout: a loadable Hugging Face model
    checkpoint-step-N/       PPO: after step N      } folder (the policy) plus
        config.yaml              the stage config that wrote it
        trainer_state.pt         what resuming needs (TRAINER_STATE_KEYS), newest checkpoint only
        <name>.safetensors       extra modules that resuming needs (the PPO critic), newest only
        adapter/                 the LoRA adapter (SFT with --lora; the folder's model is merged)
        COMPLETE                 written last: the folder is whole
    final -> checkpoint-...  the newest checkpoint; what the next stage loads (`final_model`)

Writes go to a temporary name beside the target and are renamed into place, after an fsync,
so that a reader or a killed run sees the old or the new version, never half of one
(`atomic_write_text`, `atomic_dir`; `build_shared_dir` for a folder several processes may build
at once, such as the converted model cache).
`trainer_state.pt` holds only tensors and plain Python values and loads with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from spa_rl.errors import CheckpointError, DataError

COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.pt"
FINAL = "final"
# The trainer-state schema, for SFT and PPO alike. `counters`: {"step": optimizer or PPO steps
# done, "epoch": SFT epochs done}; `optimizers` / `schedulers`: state dicts by name ("model",
# "actor", "critic"); `rng`: `training.rng_state()`.
TRAINER_STATE_KEYS = ("counters", "optimizers", "schedulers", "rng")


# ---- atomic writes ---------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file() and not f.is_symlink():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(folder)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file so that readers see the old or the new content, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, marker: str = COMPLETE, marker_text: str = "ok\n") -> Iterator[Path]:
    """Yield a temporary folder; on normal exit it becomes `target` (replacing an old one).

    The `marker` file is written last. Replacing an existing folder goes through a `.old` name,
    so a crash at any instant leaves the new or the previous folder complete (`find_complete`
    looks at both). A temporary folder left by a killed writer is removed by the next write.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        (tmp / marker).write_text(marker_text)
        _fsync_tree(tmp)
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


def build_shared_dir(target: Path, build: Callable[[Path], None], is_complete_dir: Callable[[Path], bool],
                     stale_seconds: float = 3600) -> Path:
    """`atomic_dir` for a folder that several processes may build at once (a model cache that
    torchrun ranks or parallel test workers all need): each builds in its own temp folder
    (`.NAME.partial-XXXX`), and the first to finish renames it into place; a later finisher
    finds `target` complete and discards its copy. A complete `target` is returned untouched,
    an incomplete one is replaced; temp folders older than `stale_seconds` are from dead
    processes and are removed."""
    target = Path(target)
    if is_complete_dir(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.partial-"
    now = time.time()
    for p in target.parent.glob(prefix + "*"):
        with contextlib.suppress(OSError):
            if now - p.stat().st_mtime > stale_seconds:
                shutil.rmtree(p, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    try:
        build(tmp)
        _fsync_tree(tmp)
        if target.exists() and not is_complete_dir(target):
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:  # another process renamed its complete copy first
            if not is_complete_dir(target):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def is_complete(path: str | os.PathLike, marker: str = COMPLETE) -> bool:
    return (Path(path) / marker).is_file()


def find_complete(target: str | os.PathLike, marker: str = COMPLETE) -> Path | None:
    """The complete folder at `target`, or the previous one if a swap was interrupted."""
    target = Path(target)
    for candidate in (target, target.parent / f".{target.name}.old"):
        if is_complete(candidate, marker):
            return candidate
    return None


def atomic_symlink(link: Path, target_name: str) -> None:
    """Point `link` at `target_name` (relative), replacing it atomically."""
    tmp = link.parent / f".{link.name}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target_name, tmp)
    os.replace(tmp, link)


# ---- JSONL and the metrics log ---------------------------------------------------------------


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a JSONL file; a bad line fails with the file and line number."""
    path = Path(path)
    out = []
    try:
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path} line {n}: not valid JSON ({exc.msg})") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None
    return out


class MetricsLog:
    """`metrics.jsonl` (one record per step or validation) plus TensorBoard scalars.

    A new run starts the file afresh; a resumed run (`resume_step` = the checkpoint's step)
    keeps the records up to that step and appends after them, so the file reads as if the run
    had never stopped. `enabled=False` (ranks other than 0) writes nothing.
    """

    def __init__(self, run_dir: str | os.PathLike, resume_step: int | None = None, tb_prefix: str = "",
                 enabled: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb_prefix = tb_prefix
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
            write_jsonl(self.path, kept)
        elif self.path.exists():
            self.path.unlink()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run_dir) / "tb"))

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, **metrics}) + "\n")
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and k != "epoch":
                self.writer.add_scalar(self.tb_prefix + k, v, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ---- checkpoints -----------------------------------------------------------------------------


def checkpoint_dir(run_dir: str | os.PathLike, unit: str, count: int) -> Path:
    """`run_dir/checkpoint-{unit}-{count}` (unit: "epoch" for SFT, "step" for PPO)."""
    return Path(run_dir) / f"checkpoint-{unit}-{count}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first, as (count, folder). Folders of an
    interrupted save never match: they appear under their name only once complete."""
    run_dir = Path(run_dir)
    found = []
    if run_dir.is_dir():
        for p in run_dir.iterdir():
            m = re.fullmatch(r"checkpoint-(?:epoch|step)-(\d+)", p.name)
            if m and p.is_dir() and not p.is_symlink() and is_complete(p):
                found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike, resumable: bool = False) -> Path | None:
    """The newest complete checkpoint of `run_dir` (None if there is none); with `resumable`,
    the newest that also holds the trainer state. A checkpoint folder given directly is
    returned as it is."""
    run_dir = Path(run_dir)
    if is_complete(run_dir) and (run_dir / "config.json").is_file():
        return run_dir
    for _, path in reversed(list_checkpoints(run_dir)):
        if not resumable or (path / TRAINER_STATE).is_file():
            return path
    return None


def final_model(run_dir: str | os.PathLike) -> Path:
    """Where a stage's final model is (or will be, once the stage has run): `run_dir/final`,
    a link to its newest checkpoint. The pipeline passes this path to the next stage."""
    return Path(run_dir) / FINAL


def save_checkpoint(path: str | os.PathLike, model, tokenizer, config: dict, trainer_state: dict,
                    extra_modules: dict[str, Any] | None = None, adapter_model=None) -> Path:
    """Write one checkpoint folder atomically (layout in the module docstring).

    `model`: the policy, saved as a Hugging Face folder; `config`: the resolved stage config as
    a mapping; `trainer_state`: a mapping with TRAINER_STATE_KEYS; `extra_modules`: modules
    whose weights resuming needs (name -> nn.Module, saved as `<name>.safetensors`);
    `adapter_model`: a peft model saved under `adapter/` (then `model` is its merged copy).
    """
    import torch
    import yaml
    from safetensors.torch import save_file

    missing = [k for k in TRAINER_STATE_KEYS if k not in trainer_state]
    if missing:
        raise ValueError(f"trainer_state lacks {', '.join(missing)}")
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if adapter_model is not None:
            adapter_model.save_pretrained(tmp / "adapter")
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        for name, module in (extra_modules or {}).items():
            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(tmp / f"{name}.safetensors"))
        torch.save(trainer_state, tmp / TRAINER_STATE)
    return Path(path)


def load_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """The trainer state of a checkpoint (tensors and plain values only: `weights_only=True`)."""
    import torch

    file = Path(path) / TRAINER_STATE
    if not file.is_file():
        raise CheckpointError(f"{path} has no {TRAINER_STATE}: it cannot be resumed (only the newest "
                              "checkpoint of a run keeps its trainer state)")
    state = torch.load(file, map_location="cpu", weights_only=True)
    missing = [k for k in TRAINER_STATE_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{file}: not a spa-rl trainer state (missing {', '.join(missing)})")
    return state


def load_extra_module(path: str | os.PathLike, name: str, module) -> None:
    """Load `<name>.safetensors` of a checkpoint into `module`."""
    from safetensors.torch import load_file

    file = Path(path) / f"{name}.safetensors"
    if not file.is_file():
        raise CheckpointError(f"{path} has no {file.name}: it cannot be resumed")
    module.load_state_dict(load_file(str(file)))


def finish_checkpoint(run_dir: str | os.PathLike, path: Path, extra_modules: Iterable[str] = ()) -> None:
    """After `path` was saved: point `final` at it, and drop the trainer state and the extra
    modules of every older checkpoint (older ones stay loadable models, for evaluation from
    any epoch or step, without optimizer files twice the model's size each)."""
    run_dir = Path(run_dir)
    atomic_symlink(run_dir / FINAL, path.name)
    for _, old in list_checkpoints(run_dir):
        if old != path:
            for name in [TRAINER_STATE, *(f"{m}.safetensors" for m in extra_modules)]:
                (old / name).unlink(missing_ok=True)


def check_new_or_resume(run_dir: str | os.PathLike, resume: bool) -> Path | None:
    """The checkpoint to resume from (None = a new run). A folder that already holds a run
    without `resume` is refused, so that nothing is overwritten by mistake."""
    from spa_rl.errors import ConfigError

    run_dir = Path(run_dir)
    has_run = bool(list_checkpoints(run_dir)) or (run_dir / "metrics.jsonl").exists()
    if not resume:
        if has_run:
            raise ConfigError(f"out: {run_dir} already holds a run; pass --resume to continue it or choose "
                              "another --out")
        return None
    if not list_checkpoints(run_dir):
        print(f"--resume: {run_dir} has no checkpoint yet; starting a new run")
        return None
    found = latest_checkpoint(run_dir, resumable=True)
    if found is None:
        raise CheckpointError(f"--resume: no checkpoint in {run_dir} holds a trainer state ({TRAINER_STATE})")
    return found
