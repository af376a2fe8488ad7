"""spa sft: supervised finetuning on a world-model dataset (SPA stage 2, SPEC 4).

    spa sft --data data/sokoban --model default --epochs 5 --lr 1e-4 --batch 16 --out runs/sft
    spa sft --data data/sokoban --out runs/sft --resume          # continue an interrupted run
    spa eval --model runs/sft/final                               # the last epoch's checkpoint

1. Tokenise every row with `tokens.conversation_to_sequence(prompt + completion, "last")`, the
   code path rollouts use: the prompt is the chat template + assistant header + `<think>`, the
   target is the completion after its `<think>` + the end-of-turn token. Rows longer than
   `max_length` are reported and skipped, never truncated.
2. Loss: token-level cross-entropy on the completion tokens, world-model spans included (the
   paper's method, SPEC 4.1), normalised by the number of trained tokens of the optimizer
   step: L = -(1/sum M) sum_i M_i log p(x_i | x_<i) over the global batch, whatever the
   micro-batching. `--mask-world-model` (ablation) removes the observation/prediction contents
   from M (the target tokens themselves, not their neighbours: SPEC 8 item 1).
3. Per epoch: a seeded shuffle into global batches of `batch` rows; each batch cut into
   micro-batches (at most `micro_batch` rows and `micro_batch_tokens` tokens, rows packed end to
   end without padding); gradients accumulate over the micro-batches; clip; AdamW; cosine
   schedule with linear warmup. Log-probs come from `training.token_logprobs` (packed rows, LM
   head only on trained positions, in chunks). bf16 autocast over fp32 master weights.
4. After every epoch: validation loss, then a checkpoint `checkpoint-epoch-N/` (safetensors,
   tokenizer, config.yaml, trainer_state.pt), written atomically; `final` links to the last.

A plain PyTorch loop rather than `transformers.Trainer`: exact control of the loss mask and its
normalisation, logits only where the mask needs them, and no framework overhead on CPU.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import yaml

from spa_rl.config import atomic_write_text, config_to_dict, option
from spa_rl.errors import CheckpointError, ConfigError


@dataclass
class Config:
    data: str | None = option(None, "dataset folder written by `spa generate` (train.jsonl, validation.jsonl)")
    model: str = option("default", "'default' (embedded SmolLM2-135M-Instruct), 'tiny', a local folder or a hub id")
    epochs: int = option(5, "passes over the training rows")
    lr: float = option(1e-4, "peak learning rate")
    batch: int = option(16, "rows per optimizer step (global batch)")
    micro_batch: int = option(4, "at most this many rows per forward/backward (gradient accumulation)")
    micro_batch_tokens: int = option(8192, "at most this many padded tokens per micro-batch (memory bound)")
    warmup_ratio: float = option(0.1, "share of the optimizer steps with linear warmup")
    weight_decay: float = option(0.01, "AdamW weight decay (not on biases and norms)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 = off)")
    max_length: int = option(4096, "rows with more tokens are skipped and counted (never truncated)")
    mask_world_model: bool = option(False, "ablation: no loss on the <observation>/<prediction> contents")
    lora: bool = option(False, "train LoRA adapters instead of all weights (checkpoints hold merged weights)")
    lora_rank: int = option(16, "LoRA rank")
    lora_alpha: float = option(32.0, "LoRA alpha (scale = alpha / rank)")
    lora_dropout: float = option(0.0, "LoRA dropout")
    precision: str = option("auto", "bf16 = fp32 weights with bf16 autocast; auto = bf16 where the hardware "
                                    "computes it natively", choices=("auto", "bf16", "fp32"))
    gradient_checkpointing: bool = option(False, "recompute activations in backward (less memory, slower)")
    loss_chunk: int = option(1024, "trained positions per LM-head chunk")
    max_rows: int | None = option(None, "use at most this many rows of each split (quick runs)")
    seed: int = option(0, "seed of the data order")
    out: str = option("runs/sft", "run folder: checkpoints, logs")
    resume: bool = option(False, "continue from the last checkpoint in --out (a new run if there is none yet)")

    def check(self) -> list[str]:
        errors = [] if self.data else ["data: a dataset folder is required (--data DIR, from `spa generate`)"]
        for name in ("epochs", "batch", "micro_batch", "micro_batch_tokens", "max_length", "lora_rank", "loss_chunk"):
            if getattr(self, name) < 1:
                errors.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            errors.append(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            errors.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_rows is not None and self.max_rows < 1:
            errors.append(f"max_rows must be >= 1, got {self.max_rows}")
        return errors


# ---- data ------------------------------------------------------------------------------------


def tokenize_rows(chat, rows, max_length: int, mask_world_model: bool):
    """[(input_ids, loss_mask)] of the rows that fit in `max_length`, and the skipped count."""
    from spa_rl.tokens import WORLD_MODEL_TAGS, conversation_to_sequence

    tags = WORLD_MODEL_TAGS if mask_world_model else ()
    out, skipped = [], 0
    for row in rows:
        seq = conversation_to_sequence(chat, list(row["prompt"]) + list(row["completion"]), "last", tags)
        if len(seq) > max_length:
            skipped += 1
            continue
        out.append((seq.input_ids, seq.loss_mask))
    return out, skipped


def micro_batches(examples, indices, max_rows: int, max_tokens: int):
    """Cut one global batch into micro-batches of at most `max_rows` rows and `max_tokens` tokens.

    Rows are packed end to end without padding (`training.token_logprobs` packs them), so a
    micro-batch costs the sum of its rows' lengths: rows go longest first into the first
    micro-batch that still has room (first-fit decreasing), which fills micro-batches evenly
    and keeps their number, and with it the per-forward overhead, low. A row longer than
    `max_tokens` gets a micro-batch of its own."""
    chunks: list[list[int]] = []
    room: list[int] = []
    for i in sorted(indices, key=lambda i: -len(examples[i][0])):
        n = len(examples[i][0])
        for c, chunk in enumerate(chunks):
            if len(chunk) < max_rows and room[c] >= n:
                chunk.append(i)
                room[c] -= n
                break
        else:
            chunks.append([i])
            room.append(max_tokens - n)
    return chunks


def epoch_batches(n: int, batch: int, seed: int, epoch: int):
    """The global batches of an epoch: a shuffle seeded by (seed, epoch), so a resumed run sees
    exactly the order an uninterrupted one would."""
    order = list(range(n))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return [order[i:i + batch] for i in range(0, n, batch)]


# ---- model -----------------------------------------------------------------------------------


def autocast_context(precision: str, device):
    import torch

    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def resolve_precision(precision: str) -> str:
    from spa_rl.models.loading import resolve_dtype
    import torch

    if precision != "auto":
        return precision
    return "bf16" if resolve_dtype("auto") == torch.bfloat16 else "fp32"


def load_for_training(cfg: Config, resume_from: Path | None):
    """(model, tokenizer) in fp32, LoRA-wrapped if asked, with the checkpoint's weights on resume."""
    from spa_rl.models import load_model_and_tokenizer

    source = str(resume_from) if resume_from is not None and not cfg.lora else cfg.model
    model, tokenizer = load_model_and_tokenizer(source, dtype="fp32")
    if cfg.lora:
        from peft import LoraConfig, PeftModel, get_peft_model

        if resume_from is not None:
            model = PeftModel.from_pretrained(model, resume_from / "adapter", is_trainable=True)
        else:
            model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                                     lora_dropout=cfg.lora_dropout, target_modules="all-linear",
                                                     task_type="CAUSAL_LM"))
    if cfg.gradient_checkpointing:
        from spa_rl.training import enable_activation_checkpointing
        enable_activation_checkpointing(model)
    return model, tokenizer


def evaluate_loss(model, examples, cfg: Config, pad_id: int, device, precision: str) -> float:
    """Token-mean cross-entropy over all trained tokens of `examples`."""
    import torch

    from spa_rl.training import masked_nll_sum

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), autocast_context(precision, device):
        for mb in micro_batches(examples, range(len(examples)), cfg.micro_batch, cfg.micro_batch_tokens):
            ids, mask, attn = _tensors(examples, mb, pad_id, device)
            nll, n = masked_nll_sum(model, ids, attn, mask, cfg.loss_chunk)
            total, count = total + float(nll), count + n
    model.train()
    return total / max(count, 1)


def train_step(model, optimizer, scheduler, examples, batch, cfg: Config, pad_id: int, device, precision: str) -> dict:
    """One optimizer step on the global batch `batch` (indices into `examples`); returns its stats."""
    import torch

    from spa_rl.training import masked_nll_sum

    t0 = time.perf_counter()
    n_trained = sum(sum(examples[i][1][1:]) for i in batch)  # targets of this step (position 0 never is)
    loss_sum, tokens = 0.0, 0
    for mb in micro_batches(examples, batch, cfg.micro_batch, cfg.micro_batch_tokens):
        ids, mask, attn = _tensors(examples, mb, pad_id, device)
        with autocast_context(precision, device):
            nll, _ = masked_nll_sum(model, ids, attn, mask, cfg.loss_chunk)
        (nll / n_trained).backward()  # token mean over the whole global batch, not per micro-batch
        loss_sum += float(nll.detach())
        tokens += int(attn.sum())
    clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
    finite = bool(torch.isfinite(grad_norm))
    if finite:  # a non-finite gradient skips the update (as the reference does)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lr = scheduler.get_last_lr()[0]
    scheduler.step()
    seconds = time.perf_counter() - t0
    return {"loss": loss_sum / n_trained, "lr": lr, "grad_norm": float(grad_norm), "tokens_per_second": tokens / seconds,
            "tokens": tokens, "trained_tokens": n_trained, "seconds": seconds, "skipped_nonfinite": int(not finite)}


def _tensors(examples, mb, pad_id, device):
    from spa_rl.training import pad_batch

    ids, attn, mask = pad_batch([examples[i][0] for i in mb], [examples[i][1] for i in mb], pad_id)
    return ids.to(device), mask.to(device), attn.to(device)


def latest_checkpoint_path(run_dir: str | os.PathLike, values: dict | None = None) -> Path:
    """Where the last checkpoint of an SFT run with these config values is (or will be):
    `run_dir/checkpoint-epoch-{epochs}`. It exists only once the run has finished; while it
    runs, `training.latest_checkpoint(run_dir)` is the newest complete epoch."""
    epochs = int((values or {}).get("epochs", Config.epochs))
    from spa_rl.training import checkpoint_dir

    return checkpoint_dir(run_dir, epochs)


def save_epoch(cfg: Config, run: Path, epoch: int, model, tokenizer, state: dict) -> Path:
    from spa_rl.training import checkpoint_dir, prune_trainer_states, save_checkpoint

    config_yaml = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    if cfg.lora:  # a full model for eval/PPO (merged copy) + the adapter for resuming
        merged = copy.deepcopy(model).merge_and_unload()
        path = save_checkpoint(checkpoint_dir(run, epoch), merged, tokenizer, state, config_yaml, adapter_model=model)
        del merged
    else:
        path = save_checkpoint(checkpoint_dir(run, epoch), model, tokenizer, state, config_yaml)
    prune_trainer_states(run, keep=path)
    link = run / "final"
    tmp = run / ".final.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(path.name, tmp)
    os.replace(tmp, link)
    return path


# ---- the recipe ------------------------------------------------------------------------------


def main(cfg: Config) -> int:
    import torch
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    from spa_rl.data import load_rows
    from spa_rl.tokens import ChatTokenizer
    from spa_rl.training import (adamw, cosine_schedule, latest_checkpoint, list_checkpoints, load_trainer_state,
                                 rng_state, set_rng_state)

    run = Path(cfg.out)
    resume_from = None
    if cfg.resume and not list_checkpoints(run):
        print(f"--resume: {run} has no checkpoint yet; starting a new run")
    elif cfg.resume:
        resume_from = latest_checkpoint(run, resumable=True)
        if resume_from is None:
            raise CheckpointError(f"--resume: no checkpoint in {run} holds a trainer state (trainer_state.pt)")
        _warn_config_changes(cfg, resume_from)
    elif list_checkpoints(run):
        raise ConfigError(f"out: {run} already holds checkpoints; pass --resume to continue that run or choose "
                          "another --out")
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(cfg.precision)
    torch.manual_seed(cfg.seed)

    # 1. data -> token ids and loss masks (the rollout's token path)
    model, tokenizer = load_for_training(cfg, resume_from)
    model.to(device).train()
    chat = ChatTokenizer(tokenizer)
    pad_id = tokenizer.pad_token_id
    splits = {s: load_rows(cfg.data, s)[:cfg.max_rows] for s in ("train", "validation")}
    train, skipped = tokenize_rows(chat, splits["train"], cfg.max_length, cfg.mask_world_model)
    val, val_skipped = tokenize_rows(chat, splits["validation"], cfg.max_length, cfg.mask_world_model)
    if not train:
        raise ConfigError(f"data: no training row fits max_length {cfg.max_length} ({skipped} skipped)")
    steps_per_epoch = math.ceil(len(train) / cfg.batch)
    total_steps = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_ratio * total_steps)
    lengths = [len(x) for x, _ in train]
    print(f"spa sft: {len(train)} train rows ({skipped} over max_length {cfg.max_length} skipped), {len(val)} "
          f"validation rows ({val_skipped} skipped); tokens/row mean {sum(lengths) / len(lengths):.0f} max "
          f"{max(lengths)}; trained tokens {sum(sum(m) for _, m in train)}")
    print(f"{cfg.epochs} epochs x {steps_per_epoch} steps of {cfg.batch} rows = {total_steps} steps, warmup "
          f"{warmup}; {'LoRA' if cfg.lora else 'full'} finetuning, {precision}, device {device}, model {cfg.model}"
          + (", world-model spans masked (ablation)" if cfg.mask_world_model else ""))

    # 2. optimizer, schedule, and the resumed state
    optimizer = adamw(model, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay)
    scheduler = cosine_schedule(optimizer, total_steps, warmup)
    step, start_epoch = 0, 1
    if resume_from is not None:
        state = load_trainer_state(resume_from)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        step, start_epoch = state["step"], state["epoch"] + 1
        print(f"resumed from {resume_from} (epoch {state['epoch']}, step {step})")
    writer = SummaryWriter(str(run / "tb"))
    log_path = run / "metrics.jsonl"
    _truncate_log(log_path, step)

    def log(record: dict) -> None:
        with open(log_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if k not in ("step", "epoch") and isinstance(v, (int, float)):
                writer.add_scalar(f"sft/{k}", v, record["step"])

    # 3. epochs of accumulated micro-batches
    bar = tqdm(total=total_steps, initial=step, desc="sft", unit="step")
    for epoch in range(start_epoch, cfg.epochs + 1):
        for batch in epoch_batches(len(train), cfg.batch, cfg.seed, epoch):
            record = {"step": step + 1, "epoch": epoch,
                      **train_step(model, optimizer, scheduler, train, batch, cfg, pad_id, device, precision)}
            step += 1
            log(record)
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                            tok_s=f"{record['tokens_per_second']:.0f}")

        # 4. validation loss and an atomic checkpoint after every epoch
        val_loss = evaluate_loss(model, val, cfg, pad_id, device, precision) if val else None
        if val_loss is not None:
            log({"step": step, "epoch": epoch, "val_loss": val_loss})
        state = {"epoch": epoch, "step": step, "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "rng": rng_state()}
        path = save_epoch(cfg, run, epoch, model, tokenizer, state)
        bar.write(f"epoch {epoch}: " + (f"val_loss {val_loss:.4f}; " if val else "") + f"saved {path}")
    bar.close()
    writer.close()
    final = latest_checkpoint(run)
    print(f"done: {final} (also {run / 'final'}); evaluate with `spa eval --model {run / 'final'}`")
    return 0


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop log records written after the checkpoint (the interrupted epoch)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def _warn_config_changes(cfg: Config, checkpoint: Path) -> None:
    saved_file = checkpoint / "config.yaml"
    if not saved_file.is_file():
        return
    saved = yaml.safe_load(saved_file.read_text()) or {}
    changed = {k: (saved[k], v) for k, v in config_to_dict(cfg).items() if k in saved and saved[k] != v and k != "resume"}
    for k, (old, new) in changed.items():
        print(f"warning: {k} was {old!r} in {checkpoint.name}, now {new!r}; the new value is used")
