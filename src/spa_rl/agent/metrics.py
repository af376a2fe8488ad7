"""Per-episode metrics and their aggregation (SPEC 5.6; definitions below are spa-rl's own).

`episode_metrics(episode)` returns one flat dict of floats (booleans as 0/1):

- `success`: 1 if the env reported success.
- `score`: env rewards + format penalties (the RL score); `env_reward`: env rewards only.
- `num_actions`: actions sent to the env; `num_turns`: responses applied.
- `format_ok_rate`: fraction of turns whose response matched the full format;
  `format_penalty_rate`: fraction of turns that were charged the format penalty.
- `valid_action_rate` = executed actions the env called valid / actions attempted, where the
  attempted actions are the executed ones plus the parsed names that match no env action.
  Parsed actions that were never sent because the game ended or the budget ran out are left
  out of the denominator (stopping after a win is not the model's mistake). For Sudoku no name
  is unrecognised, so this is the share of sent moves the env accepted as well-formed.
- `effective_action_rate` = executed actions that changed the state / executed actions.
  Both rates are 0.0 when their denominator is 0.
- `response_chars`: mean characters per response.
- world-model mode only, averaged over the turns whose format matched (None if there are
  none): `observation_exact`, `prediction_exact`, `prediction_cell_accuracy`
  (see `world_model_accuracy`), and `world_model_turns`, the number of such turns.

These differ from RAGEN's `action_is_valid`/`action_is_effective`, which average the *last*
action's flag per turn (SPEC 1.5). Response length in tokens is added by the rollout layer.

`aggregate_metrics(list_of_dicts)` averages every key over the dicts that have a non-None
value for it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from spa_rl.agent.worldmodel import world_model_accuracy

_WM_KEYS = ("observation_exact", "prediction_exact", "prediction_cell_accuracy")


def episode_metrics(episode: Any) -> dict[str, float | None]:
    """Metrics of one (usually finished) `Episode`; see the module docstring."""
    turns = episode.turns
    n_turns = len(turns)
    executed = sum(len(t.actions_executed) for t in turns)
    unrecognized = sum(t.num_parsed - t.num_recognized for t in turns)
    valid = sum(t.num_valid for t in turns)
    effective = sum(t.num_effective for t in turns)
    metrics: dict[str, float | None] = {
        "success": float(bool(episode.success)),
        "score": float(episode.score),
        "env_reward": float(sum(t.env_reward for t in turns)),
        "num_actions": float(episode.num_actions),
        "num_turns": float(n_turns),
        "format_ok_rate": _ratio(sum(t.parsed.format_ok for t in turns), n_turns),
        "format_penalty_rate": _ratio(sum(t.format_penalty != 0 for t in turns), n_turns),
        "valid_action_rate": _ratio(valid, executed + unrecognized),
        "effective_action_rate": _ratio(effective, executed),
        "response_chars": _ratio(sum(len(t.response) for t in turns), n_turns),
    }
    if episode.config.mode == "world-model":
        scores = [
            world_model_accuracy(
                t.parsed.observation,
                t.parsed.prediction,
                t.state_before,
                t.state_after,
                true_after_grid=t.grid_after or None,
            )
            for t in turns
            if t.parsed.format_ok
        ]
        for key in _WM_KEYS:
            metrics[key] = sum(s[key] for s in scores) / len(scores) if scores else None
        metrics["world_model_turns"] = float(len(scores))
    return metrics


def aggregate_metrics(items: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Mean of each key over the dicts where it is present and not None (bools count 0/1).

    Keys whose values are all None are left out. Key order follows first appearance.
    """
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for item in items:
        for key, value in item.items():
            if value is None:
                sums.setdefault(key, 0.0)
                counts.setdefault(key, 0)
                continue
            sums[key] = sums.get(key, 0.0) + float(value)
            counts[key] = counts.get(key, 0) + 1
    return {key: sums[key] / counts[key] for key in sums if counts[key]}


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / denominator if denominator else 0.0
