"""Batched multi-turn rollouts, token-in token-out.

Each episode's context is a `TokenSequence` that only ever grows by appending:

    context_{t+1} = context_t + sampled ids of turn t + continuation ids (end of turn, next user turn)

so the ids a later stage trains on are exactly the ids that were sampled, with their sampling
log-probs beside them. Decoded text goes only to the game (parsing) and to the transcripts.

A backend with `generate_episodes` (HFBackend's engine) gets every episode at once and asks for
an episode's next context as soon as its turn ends, so it keeps that episode's KV cache and
prefills only the appended ids; any other backend is driven turn by turn through `generate`
(`backend.drive_turns`), all running episodes together, whole contexts each time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from spa_rl.agent import Episode, EpisodeConfig, PromptSet
from spa_rl.envs import make as make_env
from spa_rl.envs.seeds import level_seed
from spa_rl.rollout.backend import Generation, GenerationBackend, SamplingParams, drive_turns
from spa_rl.tokens import ChatTokenizer, TokenSequence


@dataclass
class TurnTokens:
    prompt_len: int  # the turn's prompt is sequence.input_ids[:prompt_len]
    sampled_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "eos", "stop" or "length" (see backend.Generation)


@dataclass
class Rollout:
    """One episode with its token record."""

    episode: Episode
    group: int  # episodes of one group play the same level
    sequence: TokenSequence = field(default_factory=TokenSequence)
    turns: list[TurnTokens] = field(default_factory=list)
    context_overflow: bool = False  # stopped because the next turn would not fit the context

    @property
    def response_tokens(self) -> int:
        return sum(len(t.sampled_ids) for t in self.turns)


def read_level_file(path: str) -> list[str]:
    """Levels of a text file, separated by blank lines (each in the game's `grid` format)."""
    from pathlib import Path

    from spa_rl.errors import LevelFormatError

    p = Path(path)
    if not p.is_file():
        raise LevelFormatError(f"level file {path} does not exist")
    levels = [block.strip("\n") for block in p.read_text(encoding="utf-8").split("\n\n") if block.strip()]
    if not levels:
        raise LevelFormatError(f"level file {path} holds no level")
    return levels


def make_episodes(env_name: str, split: str, first_level: int, groups: int, group_size: int,
                  config: EpisodeConfig, prompts: PromptSet | None = None,
                  env_options: dict | None = None, level_file: str | None = None) -> list[tuple[int, Episode]]:
    """`groups x group_size` episodes; group g plays level `level_seed(split, first_level + g)`,
    or, with `level_file`, level number (first_level + g) modulo the file's level count (the
    seed then only drives FrozenLake's slips)."""
    from spa_rl.envs import env_class

    prompts = prompts or PromptSet.load(env_name)
    levels = read_level_file(level_file) if level_file else None
    out = []
    for g in range(groups):
        seed = level_seed(split, first_level + g)
        for _ in range(group_size):
            if levels:
                k = (first_level + g) % len(levels)
                env = env_class(env_name).from_level_text(levels[k], source=f"{level_file} (level {k + 1})",
                                                          render_mode=config.render_mode, **(env_options or {}))
            else:
                env = make_env(env_name, render_mode=config.render_mode, **(env_options or {}))
            out.append((g, Episode(env, seed, config, prompts)))
    return out


def run_rollouts(episodes: Sequence[tuple[int, Episode]], backend: GenerationBackend, chat: ChatTokenizer,
                 params: SamplingParams, max_context_tokens: int = 8192,
                 on_turn: Callable[[int, int], None] | None = None) -> list[Rollout]:
    """Play every episode to its end.

    `on_turn(turn, n_active)` reports progress: with a plain backend it is called before each
    batch (all running episodes play turn `turn` together); with a backend that has
    `generate_episodes` (the engine: episodes advance independently, each keeping its KV cache
    between turns) it is called when the first episode starts turn `turn`, with the number of
    episodes still running.
    """
    rollouts = [Rollout(episode=ep, group=g) for g, ep in episodes]
    for r in rollouts:
        r.sequence.add(chat.prompt_ids(r.episode.messages), trained=False)
        if not r.episode.done and len(r.sequence) + params.max_new_tokens > max_context_tokens:
            r.context_overflow = True
    active = [i for i, r in enumerate(rollouts) if not r.episode.done and not r.context_overflow]
    running = len(active)
    reported_turn = 1

    def next_prompt(key: int, gen: Generation):
        nonlocal running, reported_turn
        r = rollouts[active[key]]
        r.turns.append(TurnTokens(len(r.sequence), gen.token_ids, gen.logprobs, gen.finish_reason))
        r.sequence.add(gen.token_ids, trained=True, logprobs=gen.logprobs, turn=len(r.turns))
        r.episode.apply_response(chat.generation_prefix + chat.decode(gen.token_ids))
        if not r.episode.done:
            user = r.episode.messages[-1]
            r.sequence.add(chat.continuation_ids(user, ended_with_eos=gen.finish_reason == "eos"), trained=False)
            if len(r.sequence) + params.max_new_tokens > max_context_tokens:
                r.context_overflow = True
        if r.episode.done or r.context_overflow:
            running -= 1
            return None
        if fast is not None and on_turn is not None and len(r.turns) + 1 > reported_turn:
            reported_turn = len(r.turns) + 1
            on_turn(reported_turn, running)
        return r.sequence.input_ids

    if not active:
        return rollouts
    prompts = [rollouts[i].sequence.input_ids for i in active]
    fast = getattr(backend, "generate_episodes", None)
    if fast is not None:
        if on_turn is not None:
            on_turn(1, running)
        fast(prompts, params, next_prompt)
    else:
        drive_turns(backend.generate, prompts, params, next_prompt, on_batch=on_turn)
    return rollouts
