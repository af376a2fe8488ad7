"""spa train: PPO (with a critic) or GRPO on the text games, from an SFT checkpoint.

    spa train --env sokoban --model runs/sft/final --steps 100 --out runs/ppo
    spa train --config ppo.yaml --model CKPT            # YAML first, flags win

`main` is the algorithm; each numbered phase is a function below it:
  1. collect   roll out groups x group_size episodes with the current policy;
  2. score     summed env rewards plus format penalties, one score per episode (plus a
               world-model reward for the VAGEN-style baseline, `world_model_reward`, and a
               reward for progress toward the goal, `progress_reward`; both off by default);
  3. filter    keep the groups with the largest in-group score std (keep_ratio of them);
  4. old       old log-probs and values of the kept episodes, under the training forward (with
               one optimizer step per PPO step, the paper's setting, read off the update's own
               forwards instead: `one_pass_update` runs 4-6 in one pass);
  5. advantage token-level GAE with the critic (ppo, then whitened) or group-normalised scores (grpo);
  6. update    mini-batch updates: critic (clipped value loss), actor (asymmetric + dual clip,
               entropy bonus, optional KL to the initial policy);
  7. validate  on the fixed validation levels (the `spa eval` config and loop), every eval_every;
  8. save      a checkpoint (spa_rl.artifacts layout), every save_every and at the end.

Device, dtype and ranks come from `spa_rl.runtime`. Under `torchrun --nproc-per-node N` the
step is data parallel and means what it means in one process: each rank plays its share of the
groups (whole groups, the same level seeds), every rank gathers all episodes, so the filter,
the advantages and their whitening and the loss denominators see the whole step; the scoring
forwards and each mini-batch's micro-batches are split over ranks, and gradients are summed
over ranks before clipping. Validation splits the levels and summarises all episodes once.
Rank 0 prints, logs and writes. With `rollout_seeding=group` an episode draws the same tokens
whatever the number of processes (tests/recipes/test_distributed.py).

Departures from the reference (SPEC 5, 8), each a flag:
- the loss covers the sampled assistant tokens (`loss_tokens=assistant`); `all-after-system`
  reproduces the reference, which also trains on environment text;
- the update uses the exact sampled token ids; old log-probs are recomputed by the training
  forward (`old_logprobs=recompute`, as verl does), so the ratio is exactly 1 at the first
  mini-batch, and the gap to the sampler's log-probs is logged as `rollout/logprob_gap`;
  `old_logprobs=rollout` uses the sampler's log-probs instead (one forward pass fewer);
- no reference model is loaded unless `kl_coef > 0`.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from spa_rl import envs
from spa_rl.config import option, save_config, section
from spa_rl.sections import EnvSection, EpisodeSection, EvalSection, ModelSection, OptimSection, SamplingSection


@dataclass
class Config:
    model: ModelSection = section(ModelSection, "the starting policy: an SFT run or checkpoint folder, 'default', "
                                                "'tiny' or a hub id")
    env: EnvSection = section(EnvSection, "the game (training and validation)")
    episode: EpisodeSection = section(EpisodeSection, "how an episode is played (the reference uses base prompts)")
    sampling: SamplingSection = section(SamplingSection, "rollout sampling (training and validation)")
    eval: EvalSection = section(EvalSection, "validation levels")
    optim: OptimSection = section(OptimSection, "the actor's AdamW", lr=1e-6, beta2=0.999, schedule="constant",
                                  warmup_ratio=0.0)
    critic_optim: OptimSection = section(OptimSection, "the critic's AdamW (algo ppo)", lr=1e-5, beta2=0.999,
                                         schedule="constant", warmup_ratio=0.0)
    steps: int = option(1000, "PPO steps")
    algo: str = option("ppo", "ppo (critic + GAE) or grpo (group-normalised scores, no critic)", choices=("ppo", "grpo"))
    groups: int = option(32, "levels per step")
    group_size: int = option(8, "episodes per level")
    keep_ratio: float = option(0.25, "share of groups kept by in-group score std")
    gamma: float = option(1.0, "GAE discount over response tokens")
    lam: float = option(1.0, "GAE lambda")
    whiten: str = option("auto", "whiten the advantages over the step's trained tokens: auto (ppo yes, as the "
                         "reference; grpo no, as GRPO: its scores are already group-normalised, and whitening "
                         "would shift an all-equal group's zero advantages by the batch's token-weighted mean), "
                         "always, never", choices=("auto", "always", "never"))
    clip_low: float = option(0.2, "PPO clip below 1")
    clip_high: float = option(0.28, "PPO clip above 1")
    dual_clip: float = option(3.0, "dual-clip bound for negative advantages (<= 1 disables)")
    entropy_coef: float = option(0.001, "entropy bonus")
    value_clip: float = option(0.5, "value clipping range around the old values")
    kl_coef: float = option(0.0, "KL penalty to the initial policy (0 = no reference model loaded)")
    world_model_reward: float = option(0.0, "VAGEN-style baseline: add this weight x the episode's mean over turns "
                                            "of (exact observation + exact prediction) / 2 to its score (needs "
                                            "episode.mode world-model; 0 = off, SPA's setting)")
    progress_reward: float = option(0.0, "add this weight x the episode's progress toward the goal (the share of "
                                         "the start's distance to the goal it closed, in [0, 1]; the game's "
                                         "info['distance_to_goal']) to its score: credit for moves the right way "
                                         "in episodes that fail (0 = off, the paper's setting; validation and "
                                         "evaluation score success only)")
    loss_tokens: str = option("assistant", "tokens the losses cover", choices=("assistant", "all-after-system"))
    loss_agg: str = option("token-mean", "loss aggregation", choices=("token-mean", "seq-mean-token-mean"))
    old_logprobs: str = option("recompute", "old log-probs: recompute (training forward) or rollout (sampler)",
                               choices=("recompute", "rollout"))
    ppo_epochs: int = option(1, "passes over the kept episodes per step")
    fuse_old_pass: bool = option(True, "with ppo_epochs 1 and one mini-batch of all kept episodes (the paper's "
                                       "setting), read the old log-probs and values off the update's own "
                                       "forwards instead of a separate no-grad pass: the same update, one actor "
                                       "and one critic forward fewer per step (false: the separate pass)")
    mini_batch: int = option(0, "episodes per optimizer step (0 = all kept episodes)")
    micro_batch: int = option(1, "episodes per forward/backward (gradient accumulation)")
    gradient_checkpointing: bool = option(False, "recompute activations in backward: less memory, one more "
                                                 "forward per trained token (off: a SmolLM2 PPO step of 32 "
                                                 "episodes peaks at 5.6 GiB without it, docs/performance.md)")
    rollout_seeding: str = option("rank", "rank: one sampler per step and rank, all its episodes decoded together "
                                          "(fast; the tokens depend on the number of processes); group: one "
                                          "sampler per group (level), groups decoded one after another (slower; "
                                          "the same tokens on 1 or N processes), also for validation",
                                  choices=("rank", "group"))
    eval_every: int = option(10, "validate every N steps (0 = only at the start and the end)")
    save_every: int = option(100, "checkpoint every N steps (and at the end)")
    seed: int = option(0, "seed for sampling and mini-batch order")
    out: str = option("runs/train", "output folder")
    resume: bool = option(False, "continue from the last checkpoint in --out")

    def check(self) -> list[str]:
        errors = []
        for name in ("steps", "groups", "group_size", "micro_batch", "ppo_epochs"):
            if getattr(self, name) < 1:
                errors.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            errors.append(f"group_size must be >= 2 (filtering and GRPO compare episodes of a level), got {self.group_size}")
        if not 0 < self.keep_ratio <= 1:
            errors.append(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.world_model_reward and self.episode.mode != "world-model":
            errors.append("world_model_reward needs episode.mode world-model (the model must write its observation "
                          "and prediction)")
        if self.world_model_reward < 0:
            errors.append(f"world_model_reward must be >= 0, got {self.world_model_reward}")
        if self.progress_reward < 0:
            errors.append(f"progress_reward must be >= 0, got {self.progress_reward}")
        elif self.progress_reward and self.env.name not in envs.GAMES_WITH_DISTANCE:
            errors.append(f"progress_reward needs a game that reports info['distance_to_goal'] "
                          f"({', '.join(envs.GAMES_WITH_DISTANCE)}); {self.env.name} does not")
        if self.mini_batch > self.kept_episodes:
            errors.append(f"mini_batch {self.mini_batch} exceeds the {self.kept_episodes} episodes kept per step "
                          f"(groups x group_size x keep_ratio)")
        return errors

    @property
    def kept_episodes(self) -> int:
        return max(1, int(self.keep_ratio * self.groups)) * self.group_size


def eval_config(cfg: Config):
    """The validation's config: a real `spa eval` config, validated as `spa eval` validates it."""
    from spa_rl.config import validate
    from spa_rl.rollout.evaluation import EvalConfig

    ec = EvalConfig(model=cfg.model, env=cfg.env, episode=cfg.episode, sampling=cfg.sampling, eval=cfg.eval,
                    seed=cfg.seed, out=cfg.out)
    validate(ec)
    return ec


# ---------------------------------------------------------------------------------------------
# The critic: the policy's backbone (copied) with a scalar head, value read at every token.
class Critic(torch.nn.Module):
    def __init__(self, backbone: torch.nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)  # V = 0 at the start: first advantages are the scores
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, input_ids, attention_mask):  # -> (B, T): value of the state before token i
        from spa_rl.training import packed_hidden_states

        h = packed_hidden_states(self.backbone, input_ids, attention_mask)  # (B, T, H), rows packed
        v = self.head(h).squeeze(-1).float()  # value of the state after token i
        return torch.nn.functional.pad(v[:, :-1], (1, 0))  # shift: value aligned with the token it precedes


# ---------------------------------------------------------------------------------------------
def loss_mask_for(rollout, chat, loss_tokens: str) -> list[int]:
    """Per-token mask: the sampled assistant tokens, or everything after the system prompt."""
    mask = list(rollout.sequence.loss_mask)
    if loss_tokens == "all-after-system":
        n_system = len(chat.encode(chat.render(rollout.episode.messages[:1], add_generation_prompt=False)))
        mask = [0] * n_system + [1] * (len(mask) - n_system)
    return mask


# ---------------------------------------------------------------------------------------------
@dataclass
class PPOBatch:
    """The kept episodes of one step as right-padded tensors: B episodes, T = the longest.

    Filled phase by phase: `build_batch` (1-3), `old_outputs` (4), `add_advantages` (5)."""

    input_ids: torch.Tensor           # (B, T) long: the exact ids of each episode, sampled ones included
    attention_mask: torch.Tensor      # (B, T) long: 1 on real tokens
    mask: torch.Tensor                # (B, T) float: 1 on the tokens the losses cover (never position 0)
    rewards: torch.Tensor             # (B, T) float: the episode's score on its last covered token
    rollout_logprobs: torch.Tensor    # (B, T) float: the sampler's log-probs (0 elsewhere)
    scores: torch.Tensor              # (B,) float: the episode scores
    group_ids: torch.Tensor           # (B,) long: the group (level) of each episode
    old_logprobs: torch.Tensor | None = None  # (B, T) float: log-probs the ratio divides by
    old_values: torch.Tensor | None = None    # (B, T) float: critic values before the update
    ref_logprobs: torch.Tensor | None = None  # (B, T) float: the initial policy's (kl_coef > 0)
    advantages: torch.Tensor | None = None    # (B, T) float: 0 off the mask (whitened: see `whiten`)
    returns: torch.Tensor | None = None       # (B, T) float: value targets (algo ppo)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, idx: torch.Tensor) -> "PPOBatch":
        """The episodes `idx` (a mini- or micro-batch)."""
        return PPOBatch(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[idx])
                           for f in fields(self)})

    def to(self, device) -> "PPOBatch":
        return PPOBatch(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name).to(device))
                           for f in fields(self)})


@dataclass
class Models:
    actor: torch.nn.Module            # fp32 master weights, trained under bf16 autocast where supported
    rollout_model: torch.nn.Module    # what samples: a bf16 copy of the actor, or the actor itself
    critic: "Critic | None"
    ref: torch.nn.Module | None
    tokenizer: object
    chat: object
    backends: dict = field(default_factory=dict)  # generation engines kept across steps (vLLM's)


def build_batch(rollouts, scores: torch.Tensor, chat, cfg: Config, pad_id: int) -> PPOBatch:
    """Tensors for the kept episodes. Rewards: the episode score on its last covered token. An
    episode with no covered token (its first prompt left no room under
    `episode.max_context_tokens`) contributes no loss; its score still counts in its group's
    statistics."""
    from spa_rl.training import pad_batch

    masks = [loss_mask_for(r, chat, cfg.loss_tokens) for r in rollouts]
    input_ids, attention, mask = pad_batch([r.sequence.input_ids for r in rollouts], masks, pad_id)
    mask[:, 0] = False  # token 0 is never predicted
    rewards = torch.zeros(input_ids.shape, dtype=torch.float32)
    rollout_logprobs = torch.zeros(input_ids.shape, dtype=torch.float32)
    for b, r in enumerate(rollouts):
        covered = [i for i, m in enumerate(masks[b]) if m]
        if covered:
            rewards[b, covered[-1]] = float(scores[b])
        rollout_logprobs[b, :len(r.sequence)] = torch.tensor(r.sequence.logprobs)
    return PPOBatch(input_ids=input_ids, attention_mask=attention, mask=mask.float(), rewards=rewards,
                    rollout_logprobs=rollout_logprobs, scores=scores.float(),
                    group_ids=torch.tensor([r.group for r in rollouts]))


def mixed_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (a group's sampler: seed, stream, level index)."""
    import numpy as np

    return int(np.random.SeedSequence([int(p) & (2**63 - 1) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def sampler_blocks(shard: range, first_level: int, seed: int, cfg: Config, rt, stream: int) -> list[tuple]:
    """How this rank samples its `shard` of levels first_level + i: (i, number of levels, sampler
    seed) blocks. rollout_seeding=rank: one block, with the rank's seed (rank 0 keeps `seed`,
    so one process draws what it always drew). group: one block per level, seeded by the seed,
    the stream (0 train, 1 validation) and the level index alone."""
    from spa_rl.runtime import rank_seed

    if cfg.rollout_seeding == "rank":
        return [(shard.start, len(shard), rank_seed(seed, rt.rank))] if len(shard) else []
    return [(i, 1, mixed_seed(cfg.seed, stream, first_level + i)) for i in shard]


# ---- 1. collect ------------------------------------------------------------------------------
def collect(models: Models, cfg: Config, step: int, rt) -> list:
    """Play this rank's share of the step's `groups x group_size` episodes (whole groups).
    Group g plays train level `step * groups + g` whatever the number of ranks, and sampling is
    seeded by the step, so a resumed run draws the episodes an uninterrupted one would. Returns
    this rank's rollouts, numbered by their group in the whole step."""
    from spa_rl.rollout.engine import run_rollouts
    from spa_rl.rollout.setup import make_level_episodes, sampling_params

    first = step * cfg.groups
    rollouts = []
    for g, n, seed in sampler_blocks(rt.shard_range(cfg.groups), first, cfg.seed * 1_000_003 + step, cfg, rt, 0):
        backend = rollout_backend(models, cfg, seed)
        episodes = make_level_episodes(cfg.env, cfg.episode, "train", first + g, n, cfg.group_size)
        block = run_rollouts(episodes, backend, models.chat, sampling_params(cfg.sampling),
                             cfg.episode.max_context_tokens)
        for r in block:
            r.group += g
        rollouts += block
    return rollouts


def rollout_backend(models: Models, cfg: Config, seed: int):
    """The backend that samples for `collect` (validation passes the same cache to `evaluate`):
    an engine kept across steps in `models.backends` (vLLM's, built in `load_models`) is
    reseeded; an HF backend is built per call."""
    from spa_rl.rollout.setup import make_backend

    return make_backend(models.rollout_model, models.tokenizer, cfg.sampling, seed, model_name=cfg.model.name,
                        dtype=cfg.model.dtype, cache=models.backends)


def release_rollout_memory(models: Models) -> None:
    """Before the update: a colocated vLLM engine hands the GPU to the trainer (sleep mode)."""
    if "vllm" in models.backends:
        models.backends["vllm"].sleep()


def sync_rollout_weights(models: Models) -> None:
    """After the update: what samples next holds the updated weights (the bf16 rollout copy,
    and the vLLM engine when there is one)."""
    if models.rollout_model is not models.actor:
        models.rollout_model.load_state_dict(models.actor.state_dict())
    if "vllm" in models.backends:
        models.backends["vllm"].update_weights(models.actor.state_dict())


# ---- 2. score, 3. filter ---------------------------------------------------------------------
def score(rollouts, world_model_reward: float = 0.0, progress_reward: float = 0.0) -> torch.Tensor:
    """Env rewards plus format penalties, per episode (the reference's filter input, SPEC 8.9),
    plus, for the VAGEN-style baseline, a reward for exact state estimation and prediction, and
    optionally a reward for the progress toward the goal (`Episode.progress`)."""
    scores = [float(r.episode.score) for r in rollouts]
    if world_model_reward:
        scores = [s + world_model_reward * world_model_share(r.episode) for s, r in zip(scores, rollouts)]
    if progress_reward:
        scores = [s + progress_reward * r.episode.progress for s, r in zip(scores, rollouts)]
    return torch.tensor(scores)


def world_model_share(episode) -> float:
    """Mean over the episode's turns of (observation exact + prediction exact) / 2; a turn that
    broke the format scores 0 (VAGEN rewards state estimation and transition modelling per turn)."""
    from spa_rl.agent.worldmodel import world_model_accuracy

    total = 0.0
    for t in episode.turns:
        if t.parsed.format_ok:
            acc = world_model_accuracy(t.parsed.observation, t.parsed.prediction, t.state_before, t.state_after,
                                       true_after_grid=t.grid_after or None)
            total += (acc["observation_exact"] + acc["prediction_exact"]) / 2
    return total / max(1, len(episode.turns))


def keep_groups(scores: torch.Tensor, cfg: Config) -> tuple[list[int], dict]:
    """Indices of the episodes of the groups whose scores disagree most, and the filter's stats."""
    from spa_rl.algorithms import episode_indices, select_groups_by_reward_std

    kept, stats = select_groups_by_reward_std(scores, cfg.group_size, cfg.keep_ratio)
    return episode_indices(kept, cfg.group_size).tolist(), stats


# ---- 4. old log-probs and values -------------------------------------------------------------
def scoring_temperature(cfg: Config) -> float:
    """The temperature the sampler's log-probs were taken at (greedy sampling scores at 1), so
    that old and new log-probs, and the ratio, use the distribution the tokens were drawn from."""
    return cfg.sampling.temperature if cfg.sampling.temperature > 0 else 1.0


@torch.no_grad()
def forward_no_grad(actor, critic, batch: PPOBatch, rt, micro: int, temperature: float = 1.0):
    """Log-probs (training forward, at `temperature`) and values of every episode of `batch`,
    micro-batch by micro-batch, the micro-batches split over ranks."""
    from spa_rl.training import token_logprobs

    logprobs = torch.zeros_like(batch.rewards)
    values = torch.zeros_like(batch.rewards)
    for s in rt.shard(range(0, len(batch), micro) if actor is not None or critic is not None else []):
        sl = slice(s, s + micro)
        with rt.autocast():
            if actor is not None:
                logprobs[sl] = token_logprobs(actor, batch.input_ids[sl], batch.attention_mask[sl], batch.mask[sl],
                                              temperature=temperature)
            if critic is not None:
                values[sl] = critic(batch.input_ids[sl], batch.attention_mask[sl])
    # Each rank filled its own rows and left zeros elsewhere: the sum over ranks is every row, exactly.
    rt.all_reduce(logprobs, "sum")
    rt.all_reduce(values, "sum")
    return logprobs, values * batch.mask


def old_outputs(models: Models, batch: PPOBatch, cfg: Config, rt) -> float | None:
    """Fill old_logprobs, old_values (and ref_logprobs); return the mean |training - sampler|
    log-prob gap on the covered tokens. With `old_logprobs=rollout` the actor's no-grad pass is
    skipped (the sampler's log-probs are the old ones: one forward fewer per step), and so is the
    gap (None)."""
    recompute = cfg.old_logprobs == "recompute"
    logprobs, values = forward_no_grad(models.actor if recompute else None, models.critic, batch, rt, cfg.micro_batch,
                                       scoring_temperature(cfg))
    batch.old_logprobs = logprobs if recompute else batch.rollout_logprobs * batch.mask
    batch.old_values = values
    add_ref_logprobs(models, batch, cfg, rt)
    return logprob_gap(logprobs, batch) if recompute else None


def add_ref_logprobs(models: Models, batch: PPOBatch, cfg: Config, rt) -> None:
    """The initial policy's log-probs, for the KL term (only with a reference model, kl_coef > 0)."""
    if models.ref is not None:
        batch.ref_logprobs = forward_no_grad(models.ref, None, batch, rt, cfg.micro_batch,
                                             scoring_temperature(cfg))[0]


def logprob_gap(logprobs: torch.Tensor, batch: PPOBatch) -> float:
    """Mean |training forward - sampler| log-prob over the covered tokens (`rollout/logprob_gap`)."""
    mask = batch.mask
    return (((logprobs - batch.rollout_logprobs).abs() * mask).sum() / mask.sum().clamp(min=1)).item()


# ---- 5. advantages ---------------------------------------------------------------------------
def add_advantages(batch: PPOBatch, cfg: Config) -> None:
    from spa_rl.algorithms import gae, grpo_advantages, whiten

    mask = batch.mask
    if cfg.algo == "ppo":
        advantages, batch.returns = gae(batch.rewards, batch.old_values, mask, cfg.gamma, cfg.lam)
    else:
        advantages = grpo_advantages(batch.scores, batch.group_ids)[:, None] * mask
    whitened = cfg.whiten == "always" or (cfg.whiten == "auto" and cfg.algo == "ppo")
    batch.advantages = whiten(advantages, mask) if whitened and mask.sum() > 1 else advantages


# ---- 6. update -------------------------------------------------------------------------------
def minibatches(order: torch.Tensor, size: int) -> list[torch.Tensor]:
    """`order` cut into mini-batches of `size`, each in batch order. The shuffle decides which
    episodes share an optimizer step; within one, the order does not change the gradient (every
    micro-batch's loss has the mini-batch's denominator), and batch order puts the samples of a
    level side by side, so that a micro-batch packs their shared prompt once
    (`training.pack_rows`)."""
    return [order[m:m + size].sort().values for m in range(0, len(order), size)]


def ppo_update(models: Models, optimizers: dict, schedulers: dict, batch: PPOBatch, cfg: Config, generator,
               rt) -> dict:
    """Mini-batch updates over the kept episodes, `ppo_epochs` times; returns mean stats.

    Every loss term of a micro-batch is divided by its mini-batch's denominator (`loss_agg`:
    the mini-batch's trained tokens, or its sequences), so accumulating micro-batches gives the
    gradient of the whole mini-batch, however it is split (tests/algorithms/test_losses.py).
    Over ranks: every rank holds the whole batch and draws the same order; each takes its share
    of a mini-batch's micro-batches, and the gradients are summed over ranks before clipping."""
    from spa_rl.algorithms import loss_denominator

    B = len(batch)
    mb = cfg.mini_batch or B
    stats: dict[str, list[float]] = {}  # this rank's, gathered at the end
    for _ in range(cfg.ppo_epochs):
        for mb_idx in minibatches(torch.randperm(B, generator=generator), mb):
            denominator = loss_denominator(batch.mask[mb_idx], cfg.loss_agg)
            for opt in optimizers.values():
                opt.zero_grad(set_to_none=True)
            for u in rt.shard(range(0, len(mb_idx), cfg.micro_batch)):
                part = batch.select(mb_idx[u:u + cfg.micro_batch])
                actor_backward(models.actor, part, part.old_logprobs, cfg, denominator, rt, stats)
                if models.critic is not None:
                    critic_backward(models.critic, part, part.old_values, part.returns, cfg, denominator, rt, stats)
            optimizer_steps(models, optimizers, schedulers, cfg, rt, stats)
    return mean_stats(stats, rt)


def one_pass_update(models: Models, optimizers: dict, schedulers: dict, batch: PPOBatch, cfg: Config,
                    rt) -> tuple[dict, float | None]:
    """Phases 4-6 for one optimizer step over all kept episodes (`ppo_epochs` 1, one mini-batch:
    the paper's setting), with the update's own forwards as the old ones. Before the only
    optimizer step the weights are the sampling policy's, so the separate no-grad pass of
    `old_outputs` would compute exactly the log-probs and values that the update's forwards
    compute next: they are read off those instead, one actor and one critic forward fewer
    per step, and the update is the one `old_outputs` + `ppo_update` make
    (tests/recipes/test_train.py compares the two).

    Order: the critic's micro-batches first (their values, detached, are the old values; GAE
    is per episode, so each micro-batch's returns need only its own values), then the
    advantages over the whole step (whitening needs every episode's), then the actor's
    micro-batches, whose log-probs, detached, are the old ones: the ratio is 1. Returns the
    stats and the log-prob gap to the sampler (None with `old_logprobs=rollout`)."""
    from spa_rl.algorithms import loss_denominator

    B = len(batch)
    denominator = loss_denominator(batch.mask, cfg.loss_agg)
    stats: dict[str, list[float]] = {}
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    micro_batches = [torch.arange(u, min(B, u + cfg.micro_batch)) for u in rt.shard(range(0, B, cfg.micro_batch))]
    if models.critic is not None:
        values = torch.zeros_like(batch.rewards)
        for idx in micro_batches:
            values[idx] = critic_backward(models.critic, batch.select(idx), None, None, cfg, denominator, rt, stats)
        rt.all_reduce(values, "sum")  # each rank filled its own rows
        batch.old_values = values
    add_ref_logprobs(models, batch, cfg, rt)
    add_advantages(batch, cfg)
    recompute = cfg.old_logprobs == "recompute"
    if not recompute:
        batch.old_logprobs = batch.rollout_logprobs * batch.mask  # else None: each forward's own
    logprobs = torch.zeros_like(batch.rewards)
    for idx in micro_batches:
        part = batch.select(idx)
        logprobs[idx] = actor_backward(models.actor, part, part.old_logprobs, cfg, denominator, rt, stats)
    gap = None
    if recompute:
        rt.all_reduce(logprobs, "sum")
        batch.old_logprobs = logprobs
        gap = logprob_gap(logprobs, batch)
    optimizer_steps(models, optimizers, schedulers, cfg, rt, stats)
    return mean_stats(stats, rt), gap


def one_pass(cfg: Config, kept: int) -> bool:
    """Whether `one_pass_update` applies: one optimizer step over all `kept` episodes (and not
    turned off by `fuse_old_pass`)."""
    return cfg.fuse_old_pass and cfg.ppo_epochs == 1 and (cfg.mini_batch or kept) >= kept


def actor_backward(actor, part: PPOBatch, old_logprobs, cfg: Config, denominator, rt, stats) -> torch.Tensor:
    """The policy loss of one micro-batch, backward; returns its log-probs (detached, 0 off the
    mask). `old_logprobs` None: the forward's own log-probs are the old ones (ratio 1)."""
    from spa_rl.algorithms import actor_loss
    from spa_rl.training import token_logprobs

    with rt.autocast():
        logprobs, entropy = token_logprobs(actor, part.input_ids, part.attention_mask, part.mask,
                                           temperature=scoring_temperature(cfg), return_entropy=True)
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    loss, pg_stats = actor_loss(logprobs, old, part.advantages, part.mask, entropy, cfg.entropy_coef,
                                part.ref_logprobs, cfg.kl_coef, cfg.clip_low, cfg.clip_high,
                                cfg.dual_clip if cfg.dual_clip > 1 else None, cfg.loss_agg, denominator)
    loss.backward()
    record(stats, "actor", pg_stats)
    return logprobs.detach()


def critic_backward(critic, part: PPOBatch, old_values, returns, cfg: Config, denominator, rt, stats) -> torch.Tensor:
    """The clipped value loss of one micro-batch, backward; returns its values (detached, 0 off
    the mask). `old_values` None: the forward's own values are the old ones, and the returns
    are GAE's from them (per episode, so this micro-batch's values are all it needs)."""
    from spa_rl.algorithms import gae, value_loss

    with rt.autocast():
        values = critic(part.input_ids, part.attention_mask)
    own = values.detach() * part.mask
    if old_values is None:
        old_values, returns = own, gae(part.rewards, own, part.mask, cfg.gamma, cfg.lam)[1]
    vf_loss, vf_stats = value_loss(values, old_values, returns, part.mask, cfg.value_clip, cfg.loss_agg, denominator)
    vf_loss.backward()
    vf_stats["vf_loss"] = vf_loss.detach()
    record(stats, "critic", vf_stats)
    return own


def optimizer_steps(models: Models, optimizers: dict, schedulers: dict, cfg: Config, rt, stats) -> None:
    """Sum the gradients over ranks, clip, step the optimizers and their schedules."""
    for name, module, optim in (("actor", models.actor, cfg.optim), ("critic", models.critic, cfg.critic_optim)):
        if module is None:
            continue
        rt.sync_gradients(module, op="sum")  # each rank's share of the mini-batch's loss: their sum
        clip = optim.grad_clip if optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
        if rt.is_main:  # the same on every rank after the sum: counted once
            record(stats, name, {"grad_norm": grad_norm})
        optimizers[name].step()
        schedulers[name].step()


def train_mode(models: Models, on: bool) -> None:
    """The actor and the critic in train (on) or eval mode. The critic's backbone is a copy of
    the actor loaded in eval mode, so without this its activation checkpointing never acted."""
    for module in (models.actor, models.critic):
        if module is not None:
            module.train(on)


def record(stats: dict, prefix: str, values: dict) -> None:
    for k, v in values.items():
        stats.setdefault(f"{prefix}/{k}", []).append(float(v))


def mean_stats(stats: dict, rt) -> dict:
    """The means over every micro-batch of every rank, as one process would take them."""
    for part in rt.all_gather_object(stats)[1:]:
        for k, v in part.items():
            stats.setdefault(k, []).extend(v)
    return {k: sum(v) / len(v) for k, v in stats.items() if v and not all(math.isnan(x) for x in v)}


# ---- 7. validate, 8. save --------------------------------------------------------------------
def validate(models: Models, cfg: Config, step: int, log, rt) -> dict:
    """`spa eval`'s loop on the validation levels: each rank plays its share of the levels, and
    the episodes of all ranks are summarised once, into the metrics one process reports."""
    from dataclasses import replace

    from spa_rl.rollout.evaluation import evaluate, summarize

    ec = eval_config(cfg)
    rollouts, seconds = [], 0.0
    for i, n, seed in sampler_blocks(rt.shard_range(ec.eval.levels), ec.eval.first_level, ec.seed, cfg, rt, 1):
        part = replace(ec, seed=seed, eval=replace(ec.eval, first_level=ec.eval.first_level + i, levels=n))
        metrics, block = evaluate(models.rollout_model, models.tokenizer, part, split="val", show_progress=False,
                                  backend_cache=models.backends)
        for r in block:
            r.group += i  # numbered by level over all ranks: Pass@k counts per level
        rollouts += block
        seconds += metrics["seconds"]
    rollouts = rt.gather_shards(rollouts)
    metrics = summarize(rollouts)
    metrics["seconds"] = rt.all_reduce_float(seconds, "max")  # the slowest rank's
    generated = sum(r.response_tokens for r in rollouts)
    metrics["generated_tokens_per_second"] = generated / metrics["seconds"] if metrics["seconds"] > 0 else 0.0
    metrics = {f"val/{k}": v for k, v in metrics.items()}
    log.log(step, metrics)
    rt.print(f"step {step}: val pass@1 {metrics['val/pass@1']:.3f}  " +
             "  ".join(f"{k[4:]} {v:.3f}" for k, v in metrics.items() if k.startswith("val/pass@") and k != "val/pass@1"))
    return metrics


def write_config(cfg: Config, out: Path, rt) -> None:
    """config.yaml, with how the run ran (rank 0's device type stands for every rank's)."""
    from spa_rl.runtime import dtype_name

    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out, runtime={"world_size": rt.world_size, "backend": rt.backend, "device": rt.device.type,
                                   "dtype": dtype_name(rt.dtype)})


def save(out: Path, step: int, models: Models, optimizers: dict, schedulers: dict, cfg: Config) -> None:
    from spa_rl.artifacts import checkpoint_dir, finish_checkpoint, save_checkpoint
    from spa_rl.config import config_to_dict
    from spa_rl.training import rng_state

    state = {"counters": {"step": step}, "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
             "schedulers": {k: s.state_dict() for k, s in schedulers.items()}, "rng": rng_state()}
    extra = {"critic": models.critic} if models.critic is not None else {}
    path = save_checkpoint(checkpoint_dir(out, "step", step), models.actor, models.tokenizer, config_to_dict(cfg),
                           state, extra_modules=extra)
    finish_checkpoint(out, path, extra_modules=("critic",))


# ---- set-up ----------------------------------------------------------------------------------
def load_models(cfg: Config, resume_from: Path | None, rt) -> Models:
    """The actor trains in fp32 master weights (bf16 autocast compute where the runtime's dtype
    is bf16); rollouts then use a bf16 copy refreshed after every update, because casting 135M
    weights per decoded token under autocast would cost more than the copy."""
    from spa_rl.artifacts import load_extra_module
    from spa_rl.models import load_model_and_tokenizer
    from spa_rl.tokens import ChatTokenizer
    from spa_rl.training import enable_activation_checkpointing

    with rt.main_first():  # rank 0 builds a model cache (tiny, default) once; the others load it
        actor, tokenizer = load_model_and_tokenizer(str(resume_from) if resume_from else cfg.model.name,
                                                    dtype="fp32", device=rt.device)
        ref = (load_model_and_tokenizer(cfg.model.name, dtype="fp32", device=rt.device)[0].eval()
               if cfg.kl_coef else None)
    critic = Critic(copy.deepcopy(actor.get_decoder()), actor.config.hidden_size) if cfg.algo == "ppo" else None
    if critic is not None:
        if resume_from is not None:
            load_extra_module(resume_from, "critic", critic)
        critic.to(rt.device)  # the value head is created on the CPU
    for module in (actor, critic):
        if module is not None:
            rt.broadcast_parameters(module)  # every rank starts from rank 0's weights, whatever happened at load
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(actor)
        if critic is not None:
            enable_activation_checkpointing(critic.backbone)
    actor.config.use_cache = False
    # (vLLM keeps its own copy of the weights: no rollout copy then)
    bf16_copy = rt.dtype == torch.bfloat16 and cfg.sampling.backend != "vllm"
    rollout_model = copy.deepcopy(actor).to(torch.bfloat16).eval() if bf16_copy else actor
    models = Models(actor=actor, rollout_model=rollout_model, critic=critic, ref=ref, tokenizer=tokenizer,
                    chat=ChatTokenizer(tokenizer))
    if cfg.sampling.backend == "vllm":
        # one engine for the whole run, given the actor's weights at once (a resumed run's checkpoint)
        rollout_backend(models, cfg, cfg.seed).update_weights(actor.state_dict())
    return models


def make_optimizers(models: Models, cfg: Config) -> tuple[dict, dict]:
    from spa_rl.training import optimizer_and_schedule

    updates = cfg.steps * cfg.ppo_epochs * math.ceil(cfg.kept_episodes / (cfg.mini_batch or cfg.kept_episodes))
    optimizers, schedulers = {}, {}
    for name, module, optim in (("actor", models.actor, cfg.optim), ("critic", models.critic, cfg.critic_optim)):
        if module is not None:
            optimizers[name], schedulers[name] = optimizer_and_schedule(module, optim, updates)
    return optimizers, schedulers


def restore(resume_from: Path, optimizers: dict, schedulers: dict) -> int:
    """Optimizer, schedule and RNG state of a checkpoint (the weights are loaded with the
    models); returns the step it was taken at."""
    from spa_rl.artifacts import load_trainer_state
    from spa_rl.training import set_rng_state

    state = load_trainer_state(resume_from)
    for name, opt in optimizers.items():
        opt.load_state_dict(state["optimizers"][name])
        schedulers[name].load_state_dict(state["schedulers"][name])
    set_rng_state(state["rng"])
    return state["counters"]["step"]


def step_metrics(rollouts, scores, filter_stats, gap, trained_tokens, update_stats, timing) -> dict:
    """The step's log line. `rollouts` are every rank's episodes and `trained_tokens` counts the
    covered tokens of the kept episodes of every rank, so each key but time/* and the
    throughput is what one process running the same step logs."""
    n_tokens = sum(r.response_tokens for r in rollouts)
    return {
        "rollout/score_mean": scores.mean().item(),
        "rollout/success": sum(bool(r.episode.success) for r in rollouts) / len(rollouts),
        "rollout/num_actions": sum(r.episode.num_actions for r in rollouts) / len(rollouts),
        "rollout/progress": sum(r.episode.progress for r in rollouts) / len(rollouts),
        "rollout/response_tokens": n_tokens / len(rollouts),
        "rollout/truncated_turn_rate": (sum(t.finish_reason == "length" for r in rollouts for t in r.turns)
                                        / max(1, sum(len(r.turns) for r in rollouts))),
        "rollout/generated_tokens_per_s": n_tokens / timing["time/rollout_s"],
        **({"rollout/logprob_gap": gap} if gap is not None else {}),
        "rollout/trained_tokens": trained_tokens,
        **{f"rollout/{k}": v for k, v in filter_stats.items()},
        **update_stats, **timing,
    }


# ---- the algorithm ---------------------------------------------------------------------------
def main(cfg: Config) -> int:
    from spa_rl import runtime
    from spa_rl.artifacts import MetricsLog, check_new_or_resume

    rt = runtime.setup(device=cfg.model.device, dtype=cfg.model.dtype)
    out = Path(cfg.out)
    eval_config(cfg)  # the validation's config is valid before any work
    resume_from = check_new_or_resume(out, cfg.resume)
    rt.barrier()  # every rank has looked at --out before rank 0 writes into it
    rt.main_only(write_config, cfg, out, rt)
    torch.manual_seed(cfg.seed)
    models = load_models(cfg, resume_from, rt)
    optimizers, schedulers = make_optimizers(models, cfg)
    start = restore(resume_from, optimizers, schedulers) if resume_from else 0
    if resume_from:
        rt.print(f"resuming {out} from step {start} ({resume_from.name})")
    log = MetricsLog(out, resume_step=start if resume_from else None, enabled=rt.is_main)
    rt.print(f"{cfg.algo} on {cfg.env.name}: {cfg.groups}x{cfg.group_size} episodes per step, {cfg.kept_episodes} "
             f"kept; steps {start}..{cfg.steps}; loss on {cfg.loss_tokens} tokens; "
             f"compute {runtime.dtype_name(rt.dtype)} on {rt.device}"
             + (f" x {rt.world_size} ranks ({rt.backend})" if rt.distributed else ""))
    train_mode(models, False)
    if start == 0:
        validate(models, cfg, 0, log, rt)

    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        rollouts = rt.gather_shards(collect(models, cfg, step, rt))                  # 1 (every rank: all episodes)
        timing = {"time/rollout_s": time.perf_counter() - t0}
        t1 = time.perf_counter()
        scores = score(rollouts, cfg.world_model_reward, cfg.progress_reward)        # 2
        kept, filter_stats = keep_groups(scores, cfg)                                # 3
        batch = build_batch([rollouts[i] for i in kept], scores[kept], models.chat, cfg,
                            models.tokenizer.pad_token_id).to(rt.device)
        timing["time/scoring_s"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        release_rollout_memory(models)
        # In train mode only for the update (activation checkpointing acts in train mode only;
        # with it, transformers turns the KV cache off, and sampling would decode without its
        # context).
        if one_pass(cfg, len(batch)):                                                # 4-6 in one pass
            train_mode(models, True)
            update_stats, gap = one_pass_update(models, optimizers, schedulers, batch, cfg, rt)
        else:
            gap = old_outputs(models, batch, cfg, rt)                                # 4
            add_advantages(batch, cfg)                                               # 5
            train_mode(models, True)                                                 # 6
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            update_stats = ppo_update(models, optimizers, schedulers, batch, cfg, generator, rt)
        train_mode(models, False)
        sync_rollout_weights(models)
        timing["time/update_s"] = time.perf_counter() - t2
        timing["time/step_s"] = time.perf_counter() - t0

        trained_tokens = int(batch.mask.sum().item())  # the whole step's (the batch holds every rank's episodes)
        metrics = step_metrics(rollouts, scores, filter_stats, gap, trained_tokens, update_stats, timing)
        log.log(step + 1, {**metrics, "runtime/world_size": rt.world_size})
        rt.print(f"step {step + 1}/{cfg.steps}: score {metrics['rollout/score_mean']:.3f} success "
                 f"{metrics['rollout/success']:.3f} pg_loss {update_stats.get('actor/pg_loss', float('nan')):.4f} "
                 f"{timing['time/step_s']:.1f}s")
        # Validate before saving: a run killed in between redoes both from the previous checkpoint.
        last = step + 1 == cfg.steps
        if last or (cfg.eval_every and (step + 1) % cfg.eval_every == 0):
            validate(models, cfg, step + 1, log, rt)                                 # 7
        if last or (cfg.save_every and (step + 1) % cfg.save_every == 0):
            rt.main_only(save, out, step + 1, models, optimizers, schedulers, cfg)  # 8
    log.close()
    rt.print(f"done: {out / 'final'} ; metrics in {out / 'metrics.jsonl'}")
    rt.close()
    return 0
