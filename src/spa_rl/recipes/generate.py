"""spa generate: self-play world-model data with ground-truth states (SPA stage 1, SPEC 3).

    spa generate --env sokoban --model default --episodes 1280 --out data/sokoban
    spa generate --env sokoban --policy random --episodes 1280 --out data/sokoban-rand

1. Play `episodes = levels x group_size` episodes on levels of the train seed stream, in
   world-model mode (the response writes `<observation>`, reasoning, `<prediction>`, answer).
   The policy is `self` (the model samples every turn: the paper's method), `random` (uniform
   actions with the game's fixed reasoning sentence: the paper's RandSFT ablation) or `solver`
   (the game's solver picks the actions, with short templated reasoning: an expert data
   source the paper does not have). `random` and `solver` need no model (`--model` is ignored).
2. Ground-truth substitution, after the episode: in assistant turn t the observation content
   becomes the true state before the turn, s_{t-1}, and the prediction content the true state
   after the actions executed in the turn, s_t (equal to s_{t-1} when nothing was executed),
   both in the configured render. Reasoning and answer stay as written, and the earlier turns
   inside later prompts carry the substituted texts too.
   Ablations: `--self-belief` keeps the model's own states; `--random-coords` replaces every
   coordinate of every state (in the prompts and the substituted spans alike) by a uniform
   in-grid one; `--filter-format` drops the rows whose response broke the world-model format.
3. One row per assistant turn, split by level into train.jsonl / validation.jsonl, plus
   episodes.jsonl (as played), config.yaml and the card README.md (written last).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

from spa_rl.config import config_to_dict, option, section, save_config
from spa_rl.sections import EnvSection, EpisodeSection, ModelSection, SamplingSection

POLICIES = ("self", "random", "solver")
COORDINATE_BASE = {"sudoku": 1}  # Sudoku coordinates are 1-indexed; the grids' are 0-indexed


@dataclass
class Config:
    model: ModelSection = section(ModelSection, "the model that plays (policy self only)")
    env: EnvSection = section(EnvSection, "the game")
    episode: EpisodeSection = section(EpisodeSection, "how an episode is played (world-model prompts; base with "
                                                      "the random or solver policy gives format-only data)",
                                      mode="world-model")
    sampling: SamplingSection = section(SamplingSection, "how responses are sampled (policy self only)")
    policy: str = option("self", "who chooses the actions: the model (self), uniform random, or the game's solver",
                         choices=POLICIES)
    episodes: int = option(1280, "episodes to play (the paper: 1,280 = 160 levels x 8)")
    group_size: int = option(8, "episodes per level (the last level gets fewer when episodes is not a multiple)")
    first_level: int = option(0, "index of the first level in the train seed stream")
    self_belief: bool = option(False, "ablation: keep the model's own observation/prediction (no substitution)")
    random_coords: bool = option(False, "ablation: replace every state coordinate by a random in-grid one")
    filter_format: bool = option(False, "drop rows whose response broke the world-model format")
    random_actions: int = option(3, "actions per turn of the random policy (the reference: 3)")
    val_fraction: float = option(0.2, "share of the levels held out for validation (split by level)")
    seed: int = option(0, "seed of sampling, the random policy, the coordinates ablation and the split")
    out: str = option("data/sokoban", "output folder")

    def check(self) -> list[str]:
        errors = []
        for name in ("episodes", "group_size", "random_actions"):
            if getattr(self, name) < 1:
                errors.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.episode.mode != "world-model" and (self.policy == "self" or self.self_belief):
            errors.append("episode.mode base (a format-only warm-up, no world-model content) needs policy random "
                          "or solver")
        if not 0 <= self.val_fraction < 1:
            errors.append(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.random_coords and self.episode.render != "grid+coords":
            errors.append("random_coords needs episode.render grid+coords (the grid render has no coordinates)")
        if self.self_belief and self.policy != "self":
            errors.append(f"self_belief only applies to policy self (the {self.policy} policy writes no states "
                          "of its own)")
        return errors


# ---- scripted policies -----------------------------------------------------------------------


def scripted_response(episode, policy: str, rng: random.Random, random_actions: int = 3) -> str:
    """A world-model response whose actions come from `policy` ("random" or "solver"). The
    observation is the current state and the prediction is left empty: substitution fills both."""
    from spa_rl.agent import serialize_response

    env, state = episode.env, episode.states[-1]
    per_turn = min(episode.config.max_actions_per_turn, episode.actions_left)
    actions = env.expert_actions(episode.actions_left)[:per_turn] if policy == "solver" else []
    if actions:
        reasoning = f"Planning ahead from this state, the best actions are {', '.join(actions)}."
    else:  # the random policy, or a solver with no plan left (e.g. a box pushed into a corner)
        actions = [random_action(env, rng, episode.variables) for _ in range(min(random_actions, per_turn))]
        reasoning = episode.prompts.random_policy_reasoning
    # world-model: the observation is the current state, the prediction is filled by substitution;
    # base (a format-only warm-up): think and answer only
    return serialize_response(episode.config.mode, reasoning, " || ".join(actions), state, "")


def random_action(env, rng: random.Random, variables: dict) -> str:
    if env.action_names:
        return rng.choice(env.action_names)
    size = variables["size"]  # free-text moves (Sudoku): row,col,value, all 1..size
    return f"{rng.randint(1, size)},{rng.randint(1, size)},{rng.randint(1, size)}"


# ---- rows ------------------------------------------------------------------------------------


def episode_rows(episode, index: int, group: int, cfg: Config, rng: random.Random) -> list[dict]:
    """The SFT rows of one finished episode, after substitution and the ablations."""
    from spa_rl.agent import ground_truth_messages
    from spa_rl.data import randomize_coordinates, rows_from_messages
    from spa_rl.tokens import content_spans

    states = list(episode.states)
    messages = [dict(m) for m in episode.messages]
    if cfg.random_coords:
        v = episode.variables
        fake = [randomize_coordinates(s, v["rows"], v["cols"], COORDINATE_BASE.get(episode.env_name, 0), rng)
                for s in states]
        users = [m for m in messages if m["role"] == "user"]  # user turn k shows states[k-1]
        for m, true, new in zip(users, states, fake):
            at = m["content"].rfind(true)
            m["content"] = m["content"][:at] + new + m["content"][at + len(true):]
        states = fake
    if not cfg.self_belief:
        messages = ground_truth_messages(messages, states)
    turn_meta = [{"format_ok": t.parsed.format_ok,
                  "substituted": not cfg.self_belief and bool(content_spans(t.response)),
                  "actions": list(t.actions_executed)} for t in episode.turns]
    meta = {"env": episode.env_name, "level_seed": episode.level_seed, "level": cfg.first_level + group,
            "episode": index, "num_turns": len(episode.turns), "success": bool(episode.success),
            "policy": cfg.policy}
    rows = rows_from_messages(messages, meta, turn_meta)
    return [r for r in rows if r["format_ok"]] if cfg.filter_format else rows


# ---- main ------------------------------------------------------------------------------------


def play(cfg: Config, episodes: list) -> None:
    """Play every (group, episode) pair to its end with `cfg.policy`."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(episodes), desc=f"generate {cfg.env.name} ({cfg.policy})", unit="ep")
    if cfg.policy != "self":
        rng = random.Random(cfg.seed)
        for _, ep in episodes:
            while not ep.done:
                ep.apply_response(scripted_response(ep, cfg.policy, rng, cfg.random_actions))
            bar.update(1)
        bar.close()
        return

    from spa_rl.models import load_model_and_tokenizer
    from spa_rl.rollout.engine import run_rollouts
    from spa_rl.rollout.setup import make_backend, sampling_params
    from spa_rl.tokens import ChatTokenizer

    from spa_rl import runtime

    rt = runtime.setup(device=cfg.model.device, dtype=cfg.model.dtype, distributed=False)
    model, tokenizer = load_model_and_tokenizer(cfg.model.name, dtype=rt.dtype, device=rt.device)
    chat = ChatTokenizer(tokenizer)
    backend = make_backend(model, tokenizer, cfg.sampling, cfg.seed, model_name=cfg.model.name, dtype=cfg.model.dtype)
    # Chunks of `decode_batch` episodes: bounded memory, steady progress; same result per chunk.
    step = cfg.sampling.decode_batch
    for start in range(0, len(episodes), step):
        chunk = episodes[start:start + step]
        run_rollouts(chunk, backend, chat, sampling_params(cfg.sampling), cfg.episode.max_context_tokens,
                     lambda turn, n: bar.set_postfix(turn=turn, active=n))
        bar.update(len(chunk))
    bar.close()


def main(cfg: Config) -> int:
    import json

    from spa_rl.artifacts import atomic_write_text, write_jsonl
    from spa_rl.data import CARD, EPISODES_FILE, SPLIT_FILES, dataset_card, split_levels, split_stats
    from spa_rl.rollout.setup import make_level_episodes

    out = Path(cfg.out)
    if (out / CARD).exists():
        (out / CARD).unlink()  # the card marks a complete dataset: remove it until this one is
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    levels = -(-cfg.episodes // cfg.group_size)
    print(f"spa generate: {cfg.env.name}, {cfg.episodes} episodes on {levels} levels (up to {cfg.group_size} each), "
          f"policy {cfg.policy}" + (f", model {cfg.model.name}" if cfg.policy == "self"
                                    else " (no model: --model ignored)"))

    # 1. play
    t0 = time.perf_counter()
    episodes = make_level_episodes(cfg.env, cfg.episode, "train", cfg.first_level, levels,
                                   cfg.group_size)[:cfg.episodes]
    play(cfg, episodes)
    seconds = time.perf_counter() - t0

    # 2. substitute and expand into rows (one rng for the ablations, separate from sampling)
    rng = random.Random(cfg.seed + 1)
    records, rows, played_rows = [], [], 0
    for i, (group, ep) in enumerate(episodes):
        rec = ep.to_record()
        rec.update(episode=i, group=group, level=cfg.first_level + group)
        records.append(json.dumps(rec, ensure_ascii=False))
        played_rows += len(ep.turns)
        rows.extend(episode_rows(ep, i, group, cfg, rng))

    # 3. split by level and write; the card last
    val_levels = split_levels({ep.level_seed for _, ep in episodes}, cfg.val_fraction, cfg.seed)
    parts = {"train": [r for r in rows if r["level_seed"] not in val_levels],
             "validation": [r for r in rows if r["level_seed"] in val_levels]}
    atomic_write_text(out / EPISODES_FILE, "".join(line + "\n" for line in records))
    for split, part_rows in parts.items():
        if part_rows:
            write_jsonl(out / SPLIT_FILES[split], part_rows)
        elif (out / SPLIT_FILES[split]).exists():
            (out / SPLIT_FILES[split]).unlink()
    stats = {**{s: split_stats(r) for s, r in parts.items()}, "all": split_stats(rows)}
    notes = [f"Self-play world-model data for `{cfg.env.name}` made by `spa generate` (spa-rl) with policy "
             f"`{cfg.policy}`" + (f" and model `{cfg.model.name}`." if cfg.policy == "self" else "."),
             "",
             f"{cfg.episodes} episodes on {levels} train-stream levels (first level index {cfg.first_level}); "
             f"{len(val_levels)} level(s) held out for validation; {played_rows} turns played, "
             f"{len(rows)} rows kept" + (" (rows with a broken format dropped)." if cfg.filter_format else "."),
             "",
             "Observation/prediction contents: " + ("the model's own (self-belief ablation)." if cfg.self_belief
                                                    else "the true states (ground-truth substitution).")
             + (" Coordinates randomised (ablation)." if cfg.random_coords else "")]
    atomic_write_text(out / CARD, dataset_card(f"spa-rl world-model data: {cfg.env.name}", stats, notes,
                                               config_to_dict(cfg)))
    s = stats["all"]
    print(f"{s['episodes']} episodes, {s['rows']} rows ({len(parts['train'])} train, {len(parts['validation'])} "
          f"validation), format-valid {s['format_valid_share']:.1%}, success {s['success_share']:.1%}, "
          f"mean turns {s['mean_turns']:.2f}, {seconds:.0f} s")
    print(f"wrote {out}/: {', '.join(SPLIT_FILES[k] for k, v in parts.items() if v)}, {EPISODES_FILE}, "
          f"config.yaml, {CARD}")
    return 0
