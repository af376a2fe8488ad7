"""The per-episode state machine: one game, driven turn by turn by model responses (SPEC 1.5, 2).

    episode = Episode(spa_rl.envs.make("sokoban"), level_seed=7, config=EpisodeConfig())
    while not episode.done:
        text = "<think>" + generate(episode.messages)    # the caller prepends the forced prefix
        record = episode.apply_response(text)

Per turn: parse (`parse_response`) -> map names case-insensitively onto `env.action_names`
(unknown names dropped; games without names, i.e. Sudoku, get every non-empty string) ->
execute in order, cut to the remaining action budget, stopping when the env terminates or
truncates. The format penalty is charged at most once per turn when the format failed, or
some parsed action was not recognised, or no action was recognised (SPEC 1.5). Every action
sent to the env counts against the budget, including Sudoku moves the env rejects (as in the
reference). The episode ends when the env is done, the budget is used up, or `max_turns`
responses were applied.

The history keeps each response exactly as generated (including the leading `<think>`), so
later prompts show the model what it really wrote; `parsed.normalized` is only for display.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from spa_rl.agent.parsing import MODES, ParsedResponse, parse_response
from spa_rl.agent.prompts import PromptSet, prompt_variables
from spa_rl.envs import RENDER_MODES
from spa_rl.errors import ConfigError



@dataclass(frozen=True)
class EpisodeConfig:
    """How one episode is played. Defaults are the SPA PPO setting (SPEC 2.5)."""

    mode: str = "base"
    """Prompt mode: "base" (RL and evaluation) or "world-model" (self-play data generation)."""
    render_mode: str = "grid+coords"
    """State text shown to the model: "grid" or "grid+coords" (grid plus coordinate line)."""
    max_turns: int = 5
    """Model responses per episode."""
    max_actions_per_turn: int = 5
    """Actions kept from one answer; extra ones are ignored."""
    action_budget: int | None = None
    """Actions per episode; None = the game's default (Sokoban/FrozenLake 10, Sudoku 50)."""
    format_penalty: float = -0.1
    """Added to the score once per badly formatted turn; must be <= 0."""
    max_words: int = 100
    """Length limit printed in the prompt (not enforced)."""

    def __post_init__(self) -> None:
        errors = []
        if self.mode not in MODES:
            errors.append(f"mode: {self.mode!r} is not one of {', '.join(MODES)}")
        if self.render_mode not in RENDER_MODES:
            errors.append(f"render_mode: {self.render_mode!r} is not one of {', '.join(RENDER_MODES)}")
        for name in ("max_turns", "max_actions_per_turn", "max_words"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                errors.append(f"{name}: must be an integer >= 1, got {value!r}")
        budget = self.action_budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            errors.append(f"action_budget: must be an integer >= 1 or None (game default), got {budget!r}")
        penalty = self.format_penalty
        if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not penalty <= 0:
            errors.append(f"format_penalty: must be a number <= 0 (e.g. -0.1, or 0 to disable), got {penalty!r}")
        if errors:
            raise ConfigError("invalid EpisodeConfig: " + "; ".join(errors))


@dataclass
class TurnRecord:
    """Everything that happened in one turn. States are in the episode's render mode."""

    turn: int
    """1-based turn index."""
    response: str
    """The response exactly as given to `apply_response`."""
    parsed: ParsedResponse
    state_before: str
    state_after: str
    actions_executed: list[str]
    """Action strings sent to the env, in order (canonical names for named actions)."""
    action_rewards: list[float]
    env_reward: float
    """Sum of `action_rewards` (what the next prompt shows, rounded)."""
    format_penalty: float
    """0.0, or the configured penalty when this turn broke the format rules."""
    info: dict[str, Any]
    """The env's info of the last executed action ({} when none was executed)."""
    num_parsed: int
    """Actions in the answer (after the per-turn cap)."""
    num_recognized: int
    """Parsed actions that name an env action (all of them for free-text games)."""
    num_valid: int
    """Executed actions the env called valid."""
    num_effective: int
    """Executed actions that changed the state."""
    grid_after: str = ""
    """`state_after` in plain "grid" mode (for per-cell world-model accuracy)."""
    terminated: bool = False
    truncated: bool = False

    @property
    def reward(self) -> float:
        """Turn contribution to the score: env reward plus format penalty."""
        return self.env_reward + self.format_penalty

    def to_record(self) -> dict[str, Any]:
        return _jsonable(
            {
                "turn": self.turn,
                "response": self.response,
                "format_ok": self.parsed.format_ok,
                "actions_parsed": list(self.parsed.actions),
                "observation": self.parsed.observation,
                "prediction": self.parsed.prediction,
                "actions_executed": self.actions_executed,
                "action_rewards": self.action_rewards,
                "env_reward": self.env_reward,
                "format_penalty": self.format_penalty,
                "state_before": self.state_before,
                "state_after": self.state_after,
                "info": self.info,
                "num_parsed": self.num_parsed,
                "num_recognized": self.num_recognized,
                "num_valid": self.num_valid,
                "num_effective": self.num_effective,
                "terminated": self.terminated,
                "truncated": self.truncated,
            }
        )


class Episode:
    """One game played through the text protocol. See the module docstring."""

    def __init__(
        self,
        env: Any,
        level_seed: int,
        config: EpisodeConfig | None = None,
        prompts: PromptSet | None = None,
    ) -> None:
        self.env = env
        self.level_seed = level_seed
        self.config = config if config is not None else EpisodeConfig()
        self.prompts = prompts if prompts is not None else PromptSet.load(env.name)
        self.env_name: str = env.name
        names = getattr(env, "action_names", None)
        self.action_names: tuple[str, ...] | None = tuple(names) if names is not None else None
        self._by_lower = {n.lower(): n for n in self.action_names} if self.action_names else None
        self.action_budget: int = (
            self.config.action_budget if self.config.action_budget is not None else int(env.default_action_budget)
        )

        _, reset_info = env.reset(seed=level_seed)
        self.variables = prompt_variables(env)
        self.states: list[str] = [env.render_text(self.config.render_mode)]
        self.distances: list[int | None] = [reset_info.get("distance_to_goal")]
        """The env's `info["distance_to_goal"]` at the start and after each turn (None where
        the game reports none, or the goal cannot be reached: a FrozenLake hole)."""
        self.turns: list[TurnRecord] = []
        self.num_actions = 0
        self.success = False
        self.end_reason: str | None = None
        """None while running; then "success"/"terminated" (env ended the game),
        "env_truncated" (env step cap), "budget" or "max_turns"."""
        self.messages: list[dict[str, str]] = [
            {"role": "system", "content": self.prompts.build_system_message()},
            {
                "role": "user",
                "content": self.prompts.build_first_user_message(
                    self.states[0],
                    self.action_budget,
                    mode=self.config.mode,
                    action_names=self.action_names,
                    action_budget=self.action_budget,
                    max_words=self.config.max_words,
                    variables=self.variables,
                ),
            },
        ]

    # --- state --------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.end_reason is not None

    @property
    def actions_left(self) -> int:
        return self.action_budget - self.num_actions

    @property
    def total_reward(self) -> float:
        """Env rewards plus format penalties over all turns (the RL score)."""
        return sum(t.env_reward + t.format_penalty for t in self.turns)

    @property
    def score(self) -> float:
        """Alias of `total_reward`: the episode score PPO puts on the last token."""
        return self.total_reward

    @property
    def progress(self) -> float:
        """The share of the start's distance to the goal that the episode closed, in [0, 1]:
        `(d_start - d_end) / d_start` over the env's `info["distance_to_goal"]`, clipped at 0
        (moving away earns nothing, as standing still does). 1.0 on success; 0.0 where the game
        reports no distance, the start is already at distance 0, or the episode ended where the
        goal cannot be reached (a FrozenLake hole). Read by `train.progress_reward`."""
        if self.success:
            return 1.0
        start, end = self.distances[0], self.distances[-1]
        if not start or end is None:
            return 0.0
        return max(0.0, (start - end) / start)

    @property
    def next_user_message(self) -> str | None:
        """The user message awaiting a response, or None once the episode is done."""
        if self.done:
            return None
        return self.messages[-1]["content"]

    # --- the step -----------------------------------------------------------------------------

    def apply_response(self, text: str) -> TurnRecord:
        """Play one model response (full text, including the leading `<think>`)."""
        if self.done:
            raise RuntimeError(f"episode already ended ({self.end_reason}); do not send more responses")
        cfg = self.config
        parsed = parse_response(text, cfg.mode, cfg.max_actions_per_turn)
        if self._by_lower is None:
            recognized = list(parsed.actions)
        else:
            recognized = [self._by_lower[a.lower()] for a in parsed.actions if a.lower() in self._by_lower]
        bad_format = not parsed.format_ok or len(recognized) != len(parsed.actions) or not recognized
        penalty = float(cfg.format_penalty) if bad_format else 0.0

        state_before = self.states[-1]
        executed: list[str] = []
        rewards: list[float] = []
        info: dict[str, Any] = {}
        terminated = truncated = False
        num_valid = num_effective = 0
        for action in recognized[: self.actions_left]:
            _, reward, terminated, truncated, info = self.env.step(action)
            executed.append(action)
            rewards.append(float(reward))
            num_valid += bool(info.get("action_is_valid", False))
            num_effective += bool(info.get("action_is_effective", False))
            if terminated or truncated:
                break
        self.num_actions += len(executed)
        state_after = self.env.render_text(cfg.render_mode)
        grid_after = state_after if cfg.render_mode == "grid" else self.env.render_text("grid")
        self.states.append(state_after)
        self.distances.append(info.get("distance_to_goal") if executed else self.distances[-1])

        record = TurnRecord(
            turn=len(self.turns) + 1,
            response=text,
            parsed=parsed,
            state_before=state_before,
            state_after=state_after,
            actions_executed=executed,
            action_rewards=rewards,
            env_reward=float(sum(rewards)),
            format_penalty=penalty,
            info=dict(info),
            num_parsed=len(parsed.actions),
            num_recognized=len(recognized),
            num_valid=num_valid,
            num_effective=num_effective,
            grid_after=grid_after,
            terminated=bool(terminated),
            truncated=bool(truncated),
        )
        self.turns.append(record)
        self.messages.append({"role": "assistant", "content": text})

        if executed and bool(info.get("success", False)):
            self.success = True
        if terminated:
            self.end_reason = "success" if self.success else "terminated"
        elif truncated:
            self.end_reason = "env_truncated"
        elif self.actions_left <= 0:
            self.end_reason = "budget"
        elif len(self.turns) >= cfg.max_turns:
            self.end_reason = "max_turns"
        else:
            self.messages.append(
                {
                    "role": "user",
                    "content": self.prompts.build_next_user_message(
                        record.env_reward,
                        state_after,
                        len(self.turns) + 1,
                        self.actions_left,
                        mode=cfg.mode,
                        max_words=cfg.max_words,
                        variables=self.variables,
                    ),
                }
            )
        return record

    # --- export -------------------------------------------------------------------------------

    def to_record(self) -> dict[str, Any]:
        """A JSON-serialisable transcript: config, messages, true states, turns, outcome."""
        return _jsonable(
            {
                "env_name": self.env_name,
                "level_seed": self.level_seed,
                "config": asdict(self.config),
                "action_budget": self.action_budget,
                "prompts_source": self.prompts.source,
                "messages": self.messages,
                "states": self.states,
                "distances": self.distances,
                "turns": [t.to_record() for t in self.turns],
                "num_actions": self.num_actions,
                "done": self.done,
                "end_reason": self.end_reason,
                "success": self.success,
                "total_reward": self.total_reward,
                "score": self.score,
            }
        )

    def __repr__(self) -> str:
        return (
            f"Episode(env={self.env_name!r}, level_seed={self.level_seed}, turns={len(self.turns)}, "
            f"actions={self.num_actions}/{self.action_budget}, end_reason={self.end_reason!r})"
        )


def _jsonable(value: Any) -> Any:
    """Plain JSON types only (numpy scalars and arrays, tuples and sets are converted)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars, without importing numpy
        return _jsonable(value.tolist())
    if hasattr(value, "item"):
        return _jsonable(value.item())
    return str(value)
