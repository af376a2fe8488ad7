"""Prompts: editable YAML data per game, assembled into the reference message layout (SPEC 2.2).

Each `spa_rl/agent/prompts/{env}.yaml` holds the game-specific text: the system message, one
instruction per mode, the symbol legend, the output format per mode, the world-model worked
example and the random-policy reasoning sentence. The frame around it (turn headers, the
"actions left" line, the reward line) is fixed here because it is the protocol, not content.

User turn 1 = PREFIX + TURN(1); user turn t > 1 = "Reward:\\n{r}\\n" + TURN(t), where

    PREFIX  = instruction
              + "\\nSymbols in the state:\\n" + "sym: meaning, ..."         (if a legend is given)
              + "\\nAvailable actions:\\n" + "Up, Down, ..."                (if the game has names)
              + "\\nYou can make up to N actions in total, separated by ..."  (always)
    TURN(t) = "\\nTurn t:\\nState:\\n{state}\\nYou have n actions left. Always output: {FORMAT}
              with no extra text. ... Max response length: {max_words} words (tokens).\\n"

The reward is rounded to 2 decimals and printed without float noise (`format_reward`).

Placeholders: instructions, the example and the formats may use `{name}`; the names are
`rows`, `cols`, `last_row`, `last_col`, `size`, `box` (from the game's grid, see
`prompt_variables`), `max_words`, `action_budget` and, in instructions only, `example`.
A `{` not followed by `identifier}` is literal text, so JSON-like examples need no escaping.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from spa_rl.agent.parsing import MODES
from spa_rl.errors import ConfigError, UnknownEnvError

_REQUIRED = ("system", "instructions", "legend", "formats", "example", "random_policy_reasoning")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

# The fixed frame (own wording; structure as in SPEC 2.2).
_LEGEND_HEADER = "\nSymbols in the state:\n"
_ACTIONS_HEADER = "\nAvailable actions:\n"
_BUDGET_LINE = '\nYou can make up to {budget} actions in total, separated by the action separator " || "\n'
_TURN = (
    "\nTurn {turn}:\nState:\n{state}\nYou have {actions_left} {noun} left. "
    "Always output: {format} with no extra text. Strictly follow this format. "
    "Max response length: {max_words} words (tokens).\n"
)
_REWARD = "Reward:\n{reward}\n"


def format_reward(reward: float) -> str:
    """Reward text for the next user turn: rounded to 2 decimals, no float noise, no `-0`.

    `-0.30000000000000004 -> "-0.3"`, `10.700000000000001 -> "10.7"`, `1.0 -> "1"`, `0 -> "0"`.
    (The reference printed `str(float)`; SPEC 8 item 10.)
    """
    text = f"{float(reward):.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


@dataclass(frozen=True)
class PromptSet:
    """The prompt text of one game, loaded from YAML. Build messages with the `build_*` methods."""

    env_name: str
    source: str
    system: str
    instructions: dict[str, str]
    legend: tuple[tuple[str, str], ...]
    formats: dict[str, str]
    example: str
    random_policy_reasoning: str
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, env_name: str, path: str | Path | None = None) -> PromptSet:
        """Load `path`, or the packaged `prompts/{env_name}.yaml` when `path` is None.

        A user file must be complete: a missing or mistyped key raises `ConfigError` naming
        the file and the key. Unknown top-level keys are kept in `extra` (free for comments).
        """
        if path is None:
            package_file = resources.files("spa_rl.agent").joinpath("prompts", f"{env_name}.yaml")
            if not package_file.is_file():
                known = sorted(
                    p.name.removesuffix(".yaml")
                    for p in resources.files("spa_rl.agent").joinpath("prompts").iterdir()
                    if p.name.endswith(".yaml")
                )
                raise UnknownEnvError(f"no packaged prompts for env {env_name!r}; known: {', '.join(known)}")
            source, text = f"spa_rl/agent/prompts/{env_name}.yaml", package_file.read_text(encoding="utf-8")
        else:
            source = str(path)
            try:
                text = Path(path).read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"{source}: cannot read prompt file ({exc.strerror or exc})") from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: invalid YAML: {exc}") from exc
        return cls.from_dict(env_name, data, source=source)

    @classmethod
    def from_dict(cls, env_name: str, data: Any, *, source: str = "<dict>") -> PromptSet:
        """Validate a parsed YAML mapping (see `load`)."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
        for key in _REQUIRED:
            if key not in data:
                raise ConfigError(f"{source}: missing key {key!r}")

        variants = data.get("variants") or {}
        if not isinstance(variants, dict) or not all(
                isinstance(v, dict) and all(isinstance(t, str) for t in v.values()) for v in variants.values()):
            raise ConfigError(f"{source}: key 'variants' must map a placeholder to {{option: text}}")

        def text_at(value: Any, key: str) -> str:
            if not isinstance(value, str):
                raise ConfigError(f"{source}: key {key!r} must be a string, got {type(value).__name__}")
            _check_placeholders(value, source, key, extra=set(variants))
            return value

        def per_mode(key: str) -> dict[str, str]:
            value = data[key]
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: key {key!r} must map each mode ({', '.join(MODES)}) to a text")
            for mode in MODES:
                if mode not in value:
                    raise ConfigError(f"{source}: missing key '{key}.{mode}'")
            return {mode: text_at(value[mode], f"{key}.{mode}") for mode in MODES}

        legend_data = data["legend"]
        if legend_data is None:
            legend_data = {}
        if not isinstance(legend_data, dict):
            raise ConfigError(f"{source}: key 'legend' must map each symbol to its meaning (may be empty: {{}})")
        legend = []
        for symbol, meaning in legend_data.items():
            if not isinstance(symbol, str) or not isinstance(meaning, str):
                raise ConfigError(
                    f"{source}: key 'legend' entry {symbol!r}: symbol and meaning must both be quoted strings"
                )
            legend.append((symbol, meaning))
        extra = {k: v for k, v in data.items() if k not in _REQUIRED}
        return cls(
            env_name=env_name,
            source=source,
            system=text_at(data["system"], "system"),
            instructions=per_mode("instructions"),
            legend=tuple(legend),
            formats=per_mode("formats"),
            example=text_at(data["example"], "example"),
            random_policy_reasoning=text_at(data["random_policy_reasoning"], "random_policy_reasoning"),
            extra=extra,
        )

    # --- message builders ------------------------------------------------------------------

    def build_system_message(self) -> str:
        return self.system

    def format_prompt(self, mode: str, variables: dict[str, Any] | None = None) -> str:
        """The `{FORMAT}` string of `mode`, placeholders filled."""
        _check_mode(mode)
        return self._fill(self.formats[mode], f"formats.{mode}", variables or {})

    def instruction(self, mode: str, variables: dict[str, Any] | None = None) -> str:
        """The game instruction of `mode` with placeholders (incl. `{example}`) filled."""
        _check_mode(mode)
        variables = dict(variables or {})
        variables["example"] = self._fill(self.example, "example", variables).strip()
        return self._fill(self.instructions[mode], f"instructions.{mode}", variables).strip()

    def instruction_prefix(
        self,
        *,
        mode: str,
        action_names: tuple[str, ...] | list[str] | None,
        action_budget: int,
        variables: dict[str, Any] | None = None,
    ) -> str:
        """Instruction + legend + available actions + budget line (ends with a newline)."""
        variables = {**(variables or {}), "action_budget": action_budget}
        parts = [self.instruction(mode, variables)]
        if self.legend:
            parts.append(_LEGEND_HEADER + ", ".join(f"{s}: {m}" for s, m in self.legend))
        if action_names:
            parts.append(_ACTIONS_HEADER + ", ".join(action_names))
        parts.append(_BUDGET_LINE.format(budget=action_budget))
        return "".join(parts)

    def build_first_user_message(
        self,
        state: str,
        actions_left: int,
        *,
        mode: str = "base",
        action_names: tuple[str, ...] | list[str] | None = None,
        action_budget: int | None = None,
        max_words: int = 100,
        variables: dict[str, Any] | None = None,
    ) -> str:
        """User turn 1: instruction prefix + "\\nTurn 1:\\nState:..." block.

        `action_budget` (the episode's total, shown in the prefix) defaults to `actions_left`.
        `variables` fills the grid placeholders; get them with `prompt_variables(env)`.
        """
        budget = actions_left if action_budget is None else action_budget
        variables = {**(variables or {}), "max_words": max_words, "action_budget": budget}
        prefix = self.instruction_prefix(
            mode=mode, action_names=action_names, action_budget=budget, variables=variables
        )
        return prefix + self._turn_block(1, state, actions_left, mode, max_words, variables)

    def build_next_user_message(
        self,
        reward: float,
        state: str,
        turn: int,
        actions_left: int,
        *,
        mode: str = "base",
        max_words: int = 100,
        variables: dict[str, Any] | None = None,
    ) -> str:
        """User turn `turn` (>= 2): "Reward:\\n{rounded reward}\\n" + the turn block."""
        variables = {**(variables or {}), "max_words": max_words}
        return _REWARD.format(reward=format_reward(reward)) + self._turn_block(
            turn, state, actions_left, mode, max_words, variables
        )

    def _turn_block(
        self, turn: int, state: str, actions_left: int, mode: str, max_words: int, variables: dict[str, Any]
    ) -> str:
        return _TURN.format(
            turn=turn,
            state=state,
            actions_left=actions_left,
            noun="action" if actions_left == 1 else "actions",
            format=self.format_prompt(mode, variables),
            max_words=max_words,
        )

    def _fill(self, template: str, key: str, variables: dict[str, Any]) -> str:
        # `variants` (optional YAML key): a placeholder whose text depends on the game's settings,
        # chosen by the env's `prompt_variables()` (FrozenLake: {ice} by is_slippery).
        variants = self.extra.get("variants") or {}

        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name in variants:
                choice = variables.get(name)
                if choice not in variants[name]:
                    raise ConfigError(f"{self.source}: variants.{name} has no text for {choice!r} "
                                      f"(has: {', '.join(map(str, variants[name]))})")
                return self._fill(variants[name][choice], f"variants.{name}.{choice}", variables)
            if name not in variables:
                available = ", ".join(sorted(variables)) or "none"
                raise ConfigError(
                    f"{self.source}: key {key!r} uses placeholder {{{name}}}, which is not available here "
                    f"(available: {available})"
                )
            return str(variables[name])

        return _PLACEHOLDER.sub(replace, template)


def prompt_variables(env: Any) -> dict[str, int]:
    """Grid placeholders for the prompts of `env`, read from its plain grid render.

    `rows`/`cols` count grid rows and cells per row (a cell is a non-space character other
    than `|`); a one-line render made of `|`-separated rows (Sudoku) counts each segment as a
    row. `last_row`/`last_col` are `rows-1`/`cols-1` (zero-indexed coordinates), `size` is
    `rows` and `box` is `isqrt(size)` (Sudoku box side). If the env defines
    `prompt_variables()`, its values override these.
    """
    grid = env.render_text("grid")
    lines = [line for line in grid.splitlines() if line.strip()]
    if len(lines) == 1 and lines[0].count("|") > 1:
        lines = [seg for seg in lines[0].split("|") if seg.strip()]
    rows = len(lines)
    cols = max((sum(1 for ch in line if not ch.isspace() and ch != "|") for line in lines), default=0)
    variables = {
        "rows": rows,
        "cols": cols,
        "last_row": max(rows - 1, 0),
        "last_col": max(cols - 1, 0),
        "size": rows,
        "box": math.isqrt(rows),
    }
    own = getattr(env, "prompt_variables", None)
    if callable(own):
        variables.update(own())
    return variables


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"mode: unknown prompt mode {mode!r}; use one of {', '.join(MODES)}")


_KNOWN_PLACEHOLDERS = {
    "rows",
    "cols",
    "last_row",
    "last_col",
    "size",
    "box",
    "max_words",
    "action_budget",
    "example",
}


def _check_placeholders(text: str, source: str, key: str, extra: set[str] = frozenset()) -> None:
    """Fail at load time on a misspelt placeholder rather than at the first episode."""
    for name in _PLACEHOLDER.findall(text):
        if name not in _KNOWN_PLACEHOLDERS and name not in extra:
            raise ConfigError(
                f"{source}: key {key!r} uses unknown placeholder {{{name}}}; "
                f"known: {', '.join(sorted(_KNOWN_PLACEHOLDERS))}"
            )
