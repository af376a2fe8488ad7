"""Level seeds for the train and validation splits, disjoint by construction.

`level_seed(split, index)` maps the `index`-th level of a split to the integer passed to
`env.reset(seed=...)`:

| split   | seed                  | range                      |
|---------|-----------------------|----------------------------|
| `train` | `index`               | `[0, 2**40)`               |
| `val`   | `(1 << 40) \\| index`  | `[2**40, 2**41)`           |

The two ranges cannot overlap, whatever indices a run uses, so no validation level is ever a
training level. Train seeds equal their index, so the reference's train seeds (10000, 10001,
...) are `level_seed("train", 10000 + k)`; its validation seeds 123..250 have no counterpart
here on purpose (they lie inside the reference's own train range).

A seed fixes the level and, for FrozenLake, the slips of the episode; nothing depends on the
process (no `hash()`, no global random state).
"""

from __future__ import annotations

from spa_rl.errors import ConfigError

SPLITS = ("train", "val")
INDEX_LIMIT = 1 << 40
_SPLIT_BASE = {"train": 0, "val": 1 << 40}


def level_seed(split: str, index: int) -> int:
    """The reset seed of level `index` (0-based) of `split` ("train" or "val")."""
    if split not in _SPLIT_BASE:
        raise ConfigError(f"split: unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if isinstance(index, bool) or not isinstance(index, int):
        raise ConfigError(f"index: a level index must be an int, got {type(index).__name__}")
    if not 0 <= index < INDEX_LIMIT:
        raise ConfigError(f"index: level index {index} is outside [0, 2**40)")
    return _SPLIT_BASE[split] | index


def split_of_seed(seed: int) -> tuple[str, int]:
    """The inverse of `level_seed`: `(split, index)` of a seed in `[0, 2**41)`."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 * INDEX_LIMIT:
        raise ConfigError(f"seed: {seed!r} is not a level seed (an int in [0, 2**41))")
    return ("val", seed - INDEX_LIMIT) if seed >= INDEX_LIMIT else ("train", seed)
