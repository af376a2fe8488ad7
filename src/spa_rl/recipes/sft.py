"""spa sft: supervised finetuning on a world-model dataset (SPA stage 2, SPEC 4).

    spa sft --data data/sokoban --model default --epochs 5 --optim.lr 1e-4 --batch 16 --out runs/sft
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
4. After every epoch: validation loss, then a checkpoint `checkpoint-epoch-N/` in the layout of
   `spa_rl.artifacts` (written atomically); `final` links to the last.

Device, dtype and ranks come from `spa_rl.runtime`. Under `torchrun --nproc-per-node N` the run
is data parallel: every rank reads the same rows and draws the same epoch order, takes its
`rt.shard` of each global batch (`batch` rows over all ranks), divides its loss by the trained
tokens of the whole global batch and sums the gradients over ranks before clipping, so each
optimizer step is the one-process step up to float rounding. Rank 0 prints, logs and writes.

A plain PyTorch loop rather than `transformers.Trainer`: exact control of the loss mask and its
normalisation, logits only where the mask needs them, and no framework overhead on CPU.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

from spa_rl.config import config_to_dict, option, save_config, section
from spa_rl.errors import ConfigError
from spa_rl.sections import ModelSection, OptimSection


@dataclass
class Config:
    model: ModelSection = section(ModelSection, "the model to finetune")
    optim: OptimSection = section(OptimSection, "AdamW and the schedule")
    data: str | None = option(None, "dataset folder written by `spa generate` (train.jsonl, validation.jsonl)")
    epochs: int = option(5, "passes over the training rows")
    batch: int = option(16, "rows per optimizer step (global batch)")
    micro_batch: int = option(4, "at most this many rows per forward/backward (gradient accumulation)")
    micro_batch_tokens: int = option(8192, "at most this many padded tokens per micro-batch (memory bound)")
    max_length: int = option(4096, "rows with more tokens are skipped and counted (never truncated)")
    mask_world_model: bool = option(False, "ablation: no loss on the <observation>/<prediction> contents")
    lora: bool = option(False, "train LoRA adapters instead of all weights (checkpoints hold merged weights)")
    lora_rank: int = option(16, "LoRA rank")
    lora_alpha: float = option(32.0, "LoRA alpha (scale = alpha / rank)")
    lora_dropout: float = option(0.0, "LoRA dropout")
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


def load_for_training(cfg: Config, resume_from: Path | None, device="cpu"):
    """(model, tokenizer) in fp32 on `device`, LoRA-wrapped if asked, with the checkpoint's
    weights on resume."""
    from spa_rl.models import load_model_and_tokenizer

    source = str(resume_from) if resume_from is not None and not cfg.lora else cfg.model.name
    model, tokenizer = load_model_and_tokenizer(source, dtype="fp32", device=device)
    if cfg.lora:
        from peft import LoraConfig, PeftModel, get_peft_model

        if resume_from is not None:
            model = PeftModel.from_pretrained(model, resume_from / "adapter", is_trainable=True)
        else:
            model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                                     lora_dropout=cfg.lora_dropout, target_modules="all-linear",
                                                     task_type="CAUSAL_LM"))
        model.to(device)  # the adapters are created on the CPU
    if cfg.gradient_checkpointing:
        from spa_rl.training import enable_activation_checkpointing
        enable_activation_checkpointing(model)
    return model, tokenizer


def evaluate_loss(model, examples, cfg: Config, pad_id: int, rt) -> float:
    """Token-mean cross-entropy over all trained tokens of `examples`; each rank scores its
    shard of the rows and the sums are added over ranks."""
    import torch

    from spa_rl.training import masked_nll_sum

    model.eval()
    sums = torch.zeros(2, dtype=torch.float64)  # nll, trained tokens
    with torch.no_grad(), rt.autocast():
        for mb in micro_batches(examples, rt.shard(range(len(examples))), cfg.micro_batch, cfg.micro_batch_tokens):
            ids, mask, attn = _tensors(examples, mb, pad_id, rt.device)
            nll, n = masked_nll_sum(model, ids, attn, mask, cfg.loss_chunk)
            sums += torch.tensor([float(nll), n], dtype=torch.float64)
    model.train()
    total, count = rt.all_reduce(sums, "sum").tolist()
    return total / max(count, 1)


def train_step(model, optimizer, scheduler, examples, batch, cfg: Config, pad_id: int, rt) -> dict:
    """One optimizer step on the global batch `batch` (indices into `examples`), this rank
    computing its shard of the rows; returns the step's stats over all ranks."""
    import torch

    from spa_rl.training import masked_nll_sum

    t0 = time.perf_counter()
    # Every rank holds every row, so the global batch's trained-token count needs no message.
    n_trained = sum(sum(examples[i][1][1:]) for i in batch)  # targets of this step (position 0 never is)
    loss_sum, tokens = 0.0, 0
    for mb in micro_batches(examples, rt.shard(batch), cfg.micro_batch, cfg.micro_batch_tokens):
        ids, mask, attn = _tensors(examples, mb, pad_id, rt.device)
        with rt.autocast():
            nll, _ = masked_nll_sum(model, ids, attn, mask, cfg.loss_chunk)
        (nll / n_trained).backward()  # token mean over the whole global batch, not per micro-batch or rank
        loss_sum += float(nll.detach())
        tokens += int(attn.sum())
    # Each rank's gradient is its share of the global mean: their sum is the full-batch gradient.
    rt.sync_gradients(model, op="sum")
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
    finite = bool(torch.isfinite(grad_norm))
    if finite:  # a non-finite gradient skips the update (as the reference does)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lr = scheduler.get_last_lr()[0]
    scheduler.step()
    loss_sum, tokens = rt.all_reduce(torch.tensor([loss_sum, tokens], dtype=torch.float64), "sum").tolist()
    seconds = time.perf_counter() - t0
    return {"loss": loss_sum / n_trained, "lr": lr, "grad_norm": float(grad_norm), "tokens_per_second": tokens / seconds,
            "tokens": int(tokens), "trained_tokens": n_trained, "seconds": seconds,
            "skipped_nonfinite": int(not finite)}


def _tensors(examples, mb, pad_id, device):
    from spa_rl.training import pad_batch

    ids, attn, mask = pad_batch([examples[i][0] for i in mb], [examples[i][1] for i in mb], pad_id)
    return ids.to(device), mask.to(device), attn.to(device)


def save_epoch(cfg: Config, run: Path, epoch: int, model, tokenizer, state: dict) -> Path:
    from spa_rl.artifacts import checkpoint_dir, finish_checkpoint, save_checkpoint

    path = checkpoint_dir(run, "epoch", epoch)
    if cfg.lora:  # a full model for eval/PPO (merged copy) + the adapter for resuming
        merged = copy.deepcopy(model).merge_and_unload()
        save_checkpoint(path, merged, tokenizer, config_to_dict(cfg), state, adapter_model=model)
        del merged
    else:
        save_checkpoint(path, model, tokenizer, config_to_dict(cfg), state)
    finish_checkpoint(run, path)
    return path


# ---- the recipe ------------------------------------------------------------------------------


def main(cfg: Config) -> int:
    import torch

    from spa_rl import runtime
    from spa_rl.artifacts import MetricsLog, check_new_or_resume, load_trainer_state
    from spa_rl.data import load_rows
    from spa_rl.tokens import ChatTokenizer
    from spa_rl.training import optimizer_and_schedule, rng_state, set_rng_state

    rt = runtime.setup(device=cfg.model.device, dtype=cfg.model.dtype)
    run = Path(cfg.out)
    resume_from = check_new_or_resume(run, cfg.resume)
    rt.barrier()  # every rank has looked at --out before rank 0 writes into it
    if resume_from is not None and rt.is_main:
        _warn_config_changes(cfg, resume_from)
    # the data first: a bad dataset fails in a second, before any model is loaded
    splits = {s: load_rows(cfg.data, s)[:cfg.max_rows] for s in ("train", "validation")}
    rt.main_only(_write_config, cfg, run, rt)
    torch.manual_seed(cfg.seed)

    # 1. data -> token ids and loss masks (the rollout's token path)
    with rt.main_first():  # rank 0 builds a model cache (tiny, default) once; the others load it
        model, tokenizer = load_for_training(cfg, resume_from, rt.device)
    rt.broadcast_parameters(model)  # every rank starts from rank 0's weights (LoRA's random init)
    model.train()
    chat = ChatTokenizer(tokenizer)
    pad_id = tokenizer.pad_token_id
    train, skipped = tokenize_rows(chat, splits["train"], cfg.max_length, cfg.mask_world_model)
    val, val_skipped = tokenize_rows(chat, splits["validation"], cfg.max_length, cfg.mask_world_model)
    if not train:
        raise ConfigError(f"data: no training row fits max_length {cfg.max_length} ({skipped} skipped)")
    steps_per_epoch = math.ceil(len(train) / cfg.batch)
    total_steps = cfg.epochs * steps_per_epoch
    lengths = [len(x) for x, _ in train]
    rt.print(f"spa sft: {len(train)} train rows ({skipped} over max_length {cfg.max_length} skipped), {len(val)} "
             f"validation rows ({val_skipped} skipped); tokens/row mean {sum(lengths) / len(lengths):.0f} max "
             f"{max(lengths)}; trained tokens {sum(sum(m) for _, m in train)}")
    rt.print(f"{cfg.epochs} epochs x {steps_per_epoch} steps of {cfg.batch} rows = {total_steps} steps; "
             f"{'LoRA' if cfg.lora else 'full'} finetuning, {runtime.dtype_name(rt.dtype)}, device {rt.device}"
             + (f" x {rt.world_size} ranks ({rt.backend})" if rt.distributed else "") + f", model {cfg.model.name}"
             + (", world-model spans masked (ablation)" if cfg.mask_world_model else ""))

    # 2. optimizer, schedule, and the resumed state
    optimizer, scheduler = optimizer_and_schedule(model, cfg.optim, total_steps)
    step, start_epoch = 0, 1
    if resume_from is not None:
        state = load_trainer_state(resume_from)
        optimizer.load_state_dict(state["optimizers"]["model"])
        scheduler.load_state_dict(state["schedulers"]["model"])
        set_rng_state(state["rng"])
        step, start_epoch = state["counters"]["step"], state["counters"]["epoch"] + 1
        rt.print(f"resumed from {resume_from} (epoch {start_epoch - 1}, step {step})")
    log = MetricsLog(run, resume_step=step if resume_from is not None else None, tb_prefix="sft/",
                     enabled=rt.is_main)

    # 3. epochs of accumulated micro-batches
    bar = rt.progress(total=total_steps, initial=step, desc="sft", unit="step")
    for epoch in range(start_epoch, cfg.epochs + 1):
        for batch in epoch_batches(len(train), cfg.batch, cfg.seed, epoch):
            record = {"epoch": epoch, **train_step(model, optimizer, scheduler, train, batch, cfg, pad_id, rt),
                      "runtime/world_size": rt.world_size}
            step += 1
            log.log(step, record)
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                            tok_s=f"{record['tokens_per_second']:.0f}")

        # 4. validation loss and an atomic checkpoint after every epoch
        val_loss = evaluate_loss(model, val, cfg, pad_id, rt) if val else None
        if val_loss is not None:
            log.log(step, {"epoch": epoch, "val_loss": val_loss})
        state = {"counters": {"step": step, "epoch": epoch}, "optimizers": {"model": optimizer.state_dict()},
                 "schedulers": {"model": scheduler.state_dict()}, "rng": rng_state()}
        path = rt.main_only(save_epoch, cfg, run, epoch, model, tokenizer, state)
        if rt.is_main:
            bar.write(f"epoch {epoch}: " + (f"val_loss {val_loss:.4f}; " if val else "") + f"saved {path}")
    bar.close()
    log.close()
    rt.print(f"done: {run / 'final'}; evaluate with `spa eval --model {run / 'final'}`")
    rt.close()
    return 0


def _write_config(cfg: Config, run: Path, rt) -> None:
    """config.yaml, with how the run ran (rank 0's device type stands for every rank's)."""
    from spa_rl.runtime import dtype_name

    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run, runtime={"world_size": rt.world_size, "backend": rt.backend, "device": rt.device.type,
                                   "dtype": dtype_name(rt.dtype)})


def _warn_config_changes(cfg: Config, checkpoint: Path) -> None:
    saved_file = checkpoint / "config.yaml"
    if not saved_file.is_file():
        return
    import yaml

    from spa_rl.config import flatten_values

    try:
        saved = flatten_values(Config, yaml.safe_load(saved_file.read_text()) or {})
    except ConfigError:  # written by another version: nothing to compare
        return
    now = flatten_values(Config, config_to_dict(cfg))
    changed = {k: (saved[k], v) for k, v in now.items() if k in saved and saved[k] != v and k != "resume"}
    for k, (old, new) in changed.items():
        print(f"warning: {k} was {old!r} in {checkpoint.name}, now {new!r}; the new value is used")
