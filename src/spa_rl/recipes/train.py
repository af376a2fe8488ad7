"""spa train: PPO (with a critic) or GRPO on the text games, from an SFT checkpoint.

    spa train --env sokoban --init runs/sft/checkpoint-epoch-5 --steps 100 --out runs/ppo
    spa train --config configs/ppo-paper.yaml --init CKPT          # YAML first, flags win

One step, in the order of the algorithm (numbers match the comments below):
  1. roll out groups x group_size episodes (base prompts, coordinates on) with the current policy;
  2. score them: summed env rewards plus format penalties, on the last trained token;
  3. keep the groups with the largest in-group score std (keep_ratio of them);
  4. old log-probs and values for the kept episodes, under the training forward;
  5. advantages: token-level GAE with the critic (ppo) or group-normalised scores (grpo), whitened;
  6. mini-batch updates: critic (clipped value loss), actor (asymmetric + dual clip, entropy bonus).
Validation on the fixed validation levels every `eval_every` steps and at the end.

Departures from the reference (SPEC 5, 8), each a flag:
- the loss covers the sampled assistant tokens (`loss_tokens=assistant`); `all-after-system`
  reproduces the reference, which also trains on environment text;
- the update uses the exact sampled token ids; old log-probs are recomputed by the training
  forward (`old_logprobs=recompute`, as verl does), so the ratio is exactly 1 at the first
  mini-batch; `old_logprobs=rollout` uses the sampler's log-probs instead, and the gap between
  the two is logged as `rollout/logprob_gap`;
- no reference model is loaded unless `kl_coef > 0`.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from spa_rl.config import option, save_config
from spa_rl.envs import ENV_NAMES
from spa_rl.recipes.eval import MODES, RENDERS, env_options_errors


@dataclass
class Config:
    env: str = option("sokoban", "game to train on", choices=ENV_NAMES)
    init: str = option("default", "starting checkpoint: an SFT folder, 'default', 'tiny' or a hub id")
    steps: int = option(1000, "PPO steps")
    algo: str = option("ppo", "ppo (critic + GAE) or grpo (group-normalised scores, no critic)", choices=("ppo", "grpo"))
    # rollout
    groups: int = option(32, "levels per step")
    group_size: int = option(8, "episodes per level")
    keep_ratio: float = option(0.25, "share of groups kept by in-group score std")
    level_file: str | None = option(None, "train and validate on the levels of this file instead of generated ones")
    env_options: str | None = option(None, "game options as YAML, e.g. '{is_slippery: false}'")
    mode: str = option("base", "prompt mode during RL (the reference uses base)", choices=MODES)
    render: str = option("grid+coords", "state text", choices=RENDERS)
    max_turns: int = option(5, "LLM turns per episode")
    max_actions_per_turn: int = option(5, "actions kept from one answer")
    action_budget: int | None = option(None, "actions per episode (default: the game's)")
    max_new_tokens: int = option(400, "token cap for one turn's response")
    temperature: float = option(1.0, "rollout sampling temperature")
    top_p: float = option(1.0, "rollout nucleus threshold")
    top_k: int = option(0, "rollout top-k (0 = off)")
    batch_size: int = option(64, "episodes generated together")
    max_context_tokens: int = option(8192, "an episode stops when its next turn would not fit")
    # objective
    gamma: float = option(1.0, "GAE discount over response tokens")
    lam: float = option(1.0, "GAE lambda")
    clip_low: float = option(0.2, "PPO clip below 1")
    clip_high: float = option(0.28, "PPO clip above 1")
    dual_clip: float = option(3.0, "dual-clip bound for negative advantages (<= 1 disables)")
    entropy_coef: float = option(0.001, "entropy bonus")
    value_clip: float = option(0.5, "value clipping range around the old values")
    kl_coef: float = option(0.0, "KL penalty to the initial policy (0 = no reference model loaded)")
    loss_tokens: str = option("assistant", "tokens the losses cover", choices=("assistant", "all-after-system"))
    loss_agg: str = option("token-mean", "loss aggregation", choices=("token-mean", "seq-mean-token-mean"))
    old_logprobs: str = option("recompute", "old log-probs: recompute (training forward) or rollout (sampler)",
                               choices=("recompute", "rollout"))
    # optimisation
    actor_lr: float = option(1e-6, "actor AdamW learning rate (constant)")
    critic_lr: float = option(1e-5, "critic AdamW learning rate (constant)")
    weight_decay: float = option(0.01, "AdamW weight decay")
    grad_clip: float = option(1.0, "gradient norm clip")
    ppo_epochs: int = option(1, "passes over the kept episodes per step")
    mini_batch_size: int = option(0, "episodes per optimizer step (0 = all kept episodes)")
    micro_batch_size: int = option(1, "episodes per forward/backward (gradient accumulation)")
    gradient_checkpointing: bool = option(True, "recompute activations in backward (less memory)")
    dtype: str = option("auto", "compute dtype: auto (bf16 autocast where supported), bf16, fp32",
                        choices=("auto", "bf16", "fp32"))
    # validation, logging, checkpoints
    eval_every: int = option(10, "validate every N steps (0 = only at the start and the end)")
    val_levels: int = option(128, "validation levels")
    val_samples: int = option(8, "episodes per validation level")
    save_every: int = option(100, "checkpoint every N steps (and at the end)")
    seed: int = option(0, "seed for sampling and mini-batch order")
    out: str = option("runs/train", "output folder")
    resume: bool = option(False, "continue from the checkpoint in --out")

    def check(self) -> list[str]:
        errors = env_options_errors(self.env_options)
        for name in ("steps", "groups", "group_size", "max_turns", "max_new_tokens", "micro_batch_size", "ppo_epochs"):
            if getattr(self, name) < 1:
                errors.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            errors.append(f"group_size must be >= 2 (filtering and GRPO compare episodes of a level), got {self.group_size}")
        if not 0 < self.keep_ratio <= 1:
            errors.append(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        kept = max(1, int(self.keep_ratio * self.groups)) * self.group_size
        if self.mini_batch_size > kept:
            errors.append(f"mini_batch_size {self.mini_batch_size} exceeds the {kept} episodes kept per step "
                          f"(groups x group_size x keep_ratio)")
        return errors


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
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state  # (B, T, H)
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


def build_batch(rollouts, chat, cfg, pad_id):
    """Tensors for the kept episodes. Rewards: the episode score on its last trained token."""
    from spa_rl.training import pad_batch

    masks = [loss_mask_for(r, chat, cfg.loss_tokens) for r in rollouts]
    input_ids, attention, mask = pad_batch([r.sequence.input_ids for r in rollouts], masks, pad_id)
    mask[:, 0] = False  # token 0 is never predicted
    rewards = torch.zeros(input_ids.shape, dtype=torch.float32)
    rollout_logprobs = torch.zeros(input_ids.shape, dtype=torch.float32)
    for b, r in enumerate(rollouts):
        last = max(i for i, m in enumerate(masks[b]) if m)
        rewards[b, last] = float(r.episode.score)
        rollout_logprobs[b, :len(r.sequence)] = torch.tensor(r.sequence.logprobs)
    return dict(input_ids=input_ids, attention_mask=attention, mask=mask.float(), rewards=rewards,
                rollout_logprobs=rollout_logprobs)


def autocast(cfg_dtype: str):
    from spa_rl.models import resolve_dtype
    use_bf16 = resolve_dtype(cfg_dtype) == torch.bfloat16
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16)


@torch.no_grad()
def forward_no_grad(actor, critic, batch, cfg, micro: int):
    """Old log-probs (training forward) and old values, micro-batch by micro-batch."""
    from spa_rl.training import token_logprobs

    B = batch["input_ids"].shape[0]
    logprobs = torch.zeros_like(batch["rewards"])
    values = torch.zeros_like(batch["rewards"])
    for s in range(0, B, micro):
        sl = slice(s, s + micro)
        with autocast(cfg.dtype):
            logprobs[sl] = token_logprobs(actor, batch["input_ids"][sl], batch["attention_mask"][sl],
                                          batch["mask"][sl])
            if critic is not None:
                values[sl] = critic(batch["input_ids"][sl], batch["attention_mask"][sl])
    return logprobs, values * batch["mask"]


def ppo_update(actor, critic, actor_opt, critic_opt, batch, cfg, generator) -> dict:
    """Step 6: mini-batch updates over the kept episodes; returns mean stats."""
    from spa_rl.algorithms import masked_mean, ppo_policy_loss, value_loss
    from spa_rl.training import token_logprobs

    B = batch["input_ids"].shape[0]
    mb = cfg.mini_batch_size or B
    stats: dict[str, list[float]] = {}
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(B, generator=generator)
        for m in range(0, B, mb):
            mb_idx = order[m:m + mb]
            n_micro = math.ceil(len(mb_idx) / cfg.micro_batch_size)
            for opt in (actor_opt, critic_opt):
                if opt is not None:
                    opt.zero_grad(set_to_none=True)
            for u in range(0, len(mb_idx), cfg.micro_batch_size):
                idx = mb_idx[u:u + cfg.micro_batch_size]
                mb_b = {k: v[idx] for k, v in batch.items()}
                with autocast(cfg.dtype):
                    logprobs, entropy = token_logprobs(actor, mb_b["input_ids"], mb_b["attention_mask"],
                                                       mb_b["mask"], return_entropy=True)
                pg_loss, pg_stats = ppo_policy_loss(logprobs, mb_b["old_logprobs"], mb_b["advantages"],
                                                    mb_b["mask"], cfg.clip_low, cfg.clip_high,
                                                    cfg.dual_clip if cfg.dual_clip > 1 else None, cfg.loss_agg)
                loss = pg_loss
                mean_entropy = masked_mean(entropy, mb_b["mask"])
                pg_stats["entropy"] = mean_entropy.detach()
                if cfg.entropy_coef:
                    loss = loss - cfg.entropy_coef * mean_entropy
                if cfg.kl_coef:
                    log_r = mb_b["ref_logprobs"] - logprobs
                    kl = masked_mean(torch.exp(log_r) - log_r - 1, mb_b["mask"])  # k3 estimator
                    loss = loss + cfg.kl_coef * kl
                    pg_stats["kl_to_ref"] = kl.detach()
                (loss / n_micro).backward()
                pg_stats["pg_loss"] = pg_loss.detach()
                for k, v in pg_stats.items():
                    stats.setdefault(f"actor/{k}", []).append(float(v))
                if critic is not None:
                    with autocast(cfg.dtype):
                        values = critic(mb_b["input_ids"], mb_b["attention_mask"])
                    vf_loss, vf_stats = value_loss(values, mb_b["old_values"], mb_b["returns"], mb_b["mask"],
                                                   cfg.value_clip, cfg.loss_agg)
                    (vf_loss / n_micro).backward()
                    vf_stats["vf_loss"] = vf_loss.detach()
                    for k, v in vf_stats.items():
                        stats.setdefault(f"critic/{k}", []).append(float(v))
            gn = torch.nn.utils.clip_grad_norm_(actor.parameters(), cfg.grad_clip)
            stats.setdefault("actor/grad_norm", []).append(float(gn))
            actor_opt.step()
            if critic is not None:
                gn = torch.nn.utils.clip_grad_norm_(critic.parameters(), cfg.grad_clip)
                stats.setdefault("critic/grad_norm", []).append(float(gn))
                critic_opt.step()
    return {k: sum(v) / len(v) for k, v in stats.items() if v and not all(math.isnan(x) for x in v)}


# ---------------------------------------------------------------------------------------------
def eval_config(cfg: Config):
    from spa_rl.recipes.eval import Config as EvalConfig
    return EvalConfig(env=cfg.env, model=cfg.init, mode=cfg.mode, render=cfg.render, levels=cfg.val_levels,
                      samples=cfg.val_samples, max_turns=cfg.max_turns, max_actions_per_turn=cfg.max_actions_per_turn,
                      action_budget=cfg.action_budget, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                      top_p=cfg.top_p, top_k=cfg.top_k, batch_size=cfg.batch_size,
                      max_context_tokens=cfg.max_context_tokens, seed=cfg.seed, out=cfg.out,
                      level_file=cfg.level_file, env_options=cfg.env_options)


def save_checkpoint(out: Path, step: int, actor, tokenizer, critic, actor_opt, critic_opt, cfg) -> None:
    from safetensors.torch import save_file

    from spa_rl.checkpoint import atomic_dir
    from spa_rl.config import config_to_dict

    with atomic_dir(out / "checkpoint") as tmp:
        actor.save_pretrained(tmp / "actor", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "actor")
        save_config(cfg, tmp / "actor")
        if critic is not None:
            save_file({k: v.contiguous() for k, v in critic.state_dict().items()}, str(tmp / "critic.safetensors"))
        torch.save({"step": step, "actor_opt": actor_opt.state_dict(),
                    "critic_opt": critic_opt.state_dict() if critic_opt is not None else None,
                    "torch_rng": torch.get_rng_state(), "config": config_to_dict(cfg)}, tmp / "trainer_state.pt")


class MetricsLog:
    """metrics.jsonl (one line per step or validation) plus TensorBoard scalars."""

    def __init__(self, out: Path, keep_until_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        self.path = out / "metrics.jsonl"
        if keep_until_step is not None and self.path.exists():  # resume: drop what will be redone
            from spa_rl.config import atomic_write_text
            kept = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= keep_until_step]
            atomic_write_text(self.path, "".join(ln + "\n" for ln in kept))
        elif self.path.exists():
            self.path.unlink()
        self.writer = SummaryWriter(str(out / "tb"))

    def log(self, step: int, metrics: dict) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps({"step": step, **metrics}) + "\n")
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.writer.add_scalar(k, v, step)
        self.writer.flush()


def validate(rollout_model, tokenizer, cfg, step: int, log: MetricsLog) -> dict:
    from spa_rl.recipes.eval import evaluate

    metrics, _ = evaluate(rollout_model, tokenizer, eval_config(cfg), split="val", show_progress=False)
    metrics = {f"val/{k}": v for k, v in metrics.items()}
    log.log(step, metrics)
    print(f"step {step}: val pass@1 {metrics['val/pass@1']:.3f}  " +
          "  ".join(f"{k[4:]} {v:.3f}" for k, v in metrics.items() if k.startswith("val/pass@") and k != "val/pass@1"))
    return metrics


def main(cfg: Config) -> int:
    from safetensors.torch import load_file

    from spa_rl.algorithms import episode_indices, gae, grpo_advantages, select_groups_by_reward_std, whiten
    from spa_rl.checkpoint import find_complete
    from spa_rl.errors import ConfigError
    from spa_rl.models import load_model_and_tokenizer, resolve_dtype
    from spa_rl.recipes.eval import episode_config, parse_env_options, sampling_params
    from spa_rl.rollout.backend import HFBackend
    from spa_rl.rollout.engine import make_episodes, run_rollouts
    from spa_rl.tokens import ChatTokenizer

    out = Path(cfg.out)
    ckpt = find_complete(out / "checkpoint") if cfg.resume else None
    if not cfg.resume and (out / "metrics.jsonl").exists():
        raise ConfigError(f"{out} already holds a run: pass --resume to continue it, or another --out")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    torch.manual_seed(cfg.seed)

    # Models: the actor trains in fp32 master weights (bf16 autocast compute); rollouts use a
    # bf16 copy refreshed after every update, because casting 135M weights per decoded token
    # under autocast would cost more than the copy.
    actor, tokenizer = load_model_and_tokenizer(str(ckpt / "actor") if ckpt else cfg.init, dtype="fp32")
    critic = Critic(copy.deepcopy(actor.get_decoder()), actor.config.hidden_size) if cfg.algo == "ppo" else None
    ref = load_model_and_tokenizer(cfg.init, dtype="fp32")[0].eval() if cfg.kl_coef else None
    if cfg.gradient_checkpointing:
        from spa_rl.training import enable_activation_checkpointing
        enable_activation_checkpointing(actor)
        if critic is not None:
            enable_activation_checkpointing(critic.backbone)
    actor.config.use_cache = False
    actor_opt = torch.optim.AdamW(actor.parameters(), lr=cfg.actor_lr, weight_decay=cfg.weight_decay)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_lr, weight_decay=cfg.weight_decay) if critic else None
    start = 0
    if ckpt:
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        start = state["step"]
        actor_opt.load_state_dict(state["actor_opt"])
        if critic is not None:
            critic.load_state_dict(load_file(str(ckpt / "critic.safetensors")))
            critic_opt.load_state_dict(state["critic_opt"])
        torch.set_rng_state(state["torch_rng"])
        print(f"resuming {out} from step {start}")
    bf16 = resolve_dtype(cfg.dtype) == torch.bfloat16
    rollout_model = copy.deepcopy(actor).to(torch.bfloat16).eval() if bf16 else actor
    chat = ChatTokenizer(tokenizer)
    log = MetricsLog(out, keep_until_step=start if ckpt else None)
    kept_groups = max(1, int(cfg.keep_ratio * cfg.groups))
    print(f"{cfg.algo} on {cfg.env}: {cfg.groups}x{cfg.group_size} episodes per step, {kept_groups * cfg.group_size} "
          f"kept; steps {start}..{cfg.steps}; loss on {cfg.loss_tokens} tokens; compute {'bf16' if bf16 else 'fp32'}")
    actor.eval()
    if start == 0:
        validate(rollout_model, tokenizer, cfg, 0, log)

    for step in range(start, cfg.steps):
        timing, t0 = {}, time.perf_counter()
        # 1. Rollout: level seeds advance by `groups` each step; sampling seeded by the step, so a
        #    resumed run draws the same episodes as an uninterrupted one.
        backend = HFBackend(rollout_model, tokenizer, max_batch_size=cfg.batch_size, seed=cfg.seed * 1_000_003 + step)
        episodes = make_episodes(cfg.env, "train", step * cfg.groups, cfg.groups, cfg.group_size, episode_config(cfg),
                                 env_options=parse_env_options(cfg.env_options), level_file=cfg.level_file)
        rollouts = run_rollouts(episodes, backend, chat, sampling_params(cfg), cfg.max_context_tokens)
        timing["time/rollout_s"] = time.perf_counter() - t0
        # 2. Scores: env rewards plus format penalties (the reference's filter input, SPEC 8.9).
        t1 = time.perf_counter()
        scores = torch.tensor([float(r.episode.score) for r in rollouts])
        # 3. Keep the groups whose episodes disagree most.
        kept, filter_stats = select_groups_by_reward_std(scores, cfg.group_size, cfg.keep_ratio)
        kept_idx = episode_indices(kept, cfg.group_size)
        kept_rollouts = [rollouts[i] for i in kept_idx.tolist()]
        batch = build_batch(kept_rollouts, chat, cfg, tokenizer.pad_token_id)
        timing["time/scoring_s"] = time.perf_counter() - t1
        # 4. Old log-probs and values under the training forward.
        t2 = time.perf_counter()
        old_logprobs, old_values = forward_no_grad(actor, critic, batch, cfg, cfg.micro_batch_size)
        mask = batch["mask"]
        gap = ((old_logprobs - batch["rollout_logprobs"]).abs() * mask).sum() / mask.sum().clamp(min=1)
        batch["old_logprobs"] = old_logprobs if cfg.old_logprobs == "recompute" else batch["rollout_logprobs"] * mask
        batch["old_values"] = old_values
        if ref is not None:
            batch["ref_logprobs"] = forward_no_grad(ref, None, batch, cfg, cfg.micro_batch_size)[0]
        # 5. Advantages.
        if critic is not None:
            advantages, returns = gae(batch["rewards"], old_values, mask, cfg.gamma, cfg.lam)
            batch["returns"] = returns
        else:
            group_ids = torch.tensor([r.group for r in kept_rollouts])
            per_episode = grpo_advantages(scores[kept_idx], group_ids)
            advantages = per_episode[:, None] * mask
        batch["advantages"] = whiten(advantages, mask) if mask.sum() > 1 else advantages
        # 6. Updates.
        actor.train()
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        update_stats = ppo_update(actor, critic, actor_opt, critic_opt, batch, cfg, gen)
        # Back to eval mode: in train mode with gradient checkpointing, transformers turns the KV
        # cache off, and the next rollout (or validation) would decode without its context.
        actor.eval()
        if rollout_model is not actor:
            rollout_model.load_state_dict(actor.state_dict())
        timing["time/update_s"] = time.perf_counter() - t2
        timing["time/step_s"] = time.perf_counter() - t0

        n_tokens = sum(r.response_tokens for r in rollouts)
        metrics = {
            "rollout/score_mean": scores.mean().item(),
            "rollout/success": sum(bool(r.episode.success) for r in rollouts) / len(rollouts),
            "rollout/num_actions": sum(r.episode.num_actions for r in rollouts) / len(rollouts),
            "rollout/response_tokens": n_tokens / len(rollouts),
            "rollout/truncated_turn_rate": (sum(t.finish_reason == "length" for r in rollouts for t in r.turns)
                                            / max(1, sum(len(r.turns) for r in rollouts))),
            "rollout/generated_tokens_per_s": n_tokens / timing["time/rollout_s"],
            "rollout/logprob_gap": gap.item(),
            **{f"rollout/{k}": v for k, v in filter_stats.items()},
            **update_stats, **timing,
        }
        log.log(step + 1, metrics)
        print(f"step {step + 1}/{cfg.steps}: score {metrics['rollout/score_mean']:.3f} success "
              f"{metrics['rollout/success']:.3f} pg_loss {update_stats.get('actor/pg_loss', float('nan')):.4f} "
              f"{timing['time/step_s']:.1f}s")
        # Validate before saving: a run killed in between redoes both from the previous checkpoint.
        last = step + 1 == cfg.steps
        if last or (cfg.eval_every and (step + 1) % cfg.eval_every == 0):
            validate(rollout_model, tokenizer, cfg, step + 1, log)
        if last or (cfg.save_every and (step + 1) % cfg.save_every == 0):
            save_checkpoint(out, step + 1, actor, tokenizer, critic, actor_opt, critic_opt, cfg)
    log.writer.close()
    print(f"done: {out / 'checkpoint' / 'actor'} ; metrics in {out / 'metrics.jsonl'}")
    return 0
