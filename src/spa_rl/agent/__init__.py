"""The text protocol between a language model and a game (no torch, no transformers).

- `prompts`: editable YAML prompt data and the message layout (`PromptSet`).
- `parsing`: `parse_response`, one never-raising parser for both prompt modes.
- `episode`: `Episode`, the per-episode state machine (turns, budget, format penalty).
- `worldmodel`: ground-truth substitution and world-model accuracy.
- `metrics`: per-episode metrics and their means.

The protocol is described in docs/protocol.md.
"""

from spa_rl.agent.episode import Episode, EpisodeConfig, TurnRecord
from spa_rl.agent.metrics import aggregate_metrics, episode_metrics
from spa_rl.agent.parsing import MODES, ParsedResponse, parse_response, serialize_response, split_actions
from spa_rl.agent.prompts import PromptSet, format_reward, prompt_variables
from spa_rl.agent.worldmodel import (
    ground_truth_messages,
    substitute_world_model,
    world_model_accuracy,
)

__all__ = [
    "MODES",
    "Episode",
    "EpisodeConfig",
    "ParsedResponse",
    "PromptSet",
    "TurnRecord",
    "aggregate_metrics",
    "episode_metrics",
    "format_reward",
    "ground_truth_messages",
    "parse_response",
    "prompt_variables",
    "serialize_response",
    "split_actions",
    "substitute_world_model",
    "world_model_accuracy",
]
