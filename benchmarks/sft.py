"""SFT throughput: spa-rl's training step against TRL's SFTTrainer, same rows, model, batch and
precision, in the same run.

    .venv/bin/python benchmarks/sft.py                       # generates a small dataset first
    .venv/bin/python benchmarks/sft.py --data data/sokoban --rows 24 --batch 4 --steps 5

Each side runs in its own subprocess (so `ru_maxrss`, a per-process high-water mark, is each
side's own peak memory) on the first `rows` training rows in file order, `batch` rows per
optimizer step, no shuffling, AdamW, bf16 autocast over fp32 weights (or fp32). The first
`--warmup-steps` steps are not timed. Sides alternate for `--repeats` rounds and each side's
best run counts, so a busy spell on a shared machine does not decide the ratio. Tokens per second counts every non-padding input token
(prompt and completion) of the timed steps over their wall time. MFU = 6 x parameters x
tokens/s against the CPU's bf16 peak of 2.5 TFLOP/s (MODELS.md); spa-rl applies the LM head
only on trained positions, so its real FLOPs are below 6N per token and this MFU is "model
FLOPs" in the usual sense, not hardware FLOPs. The 2.5 TFLOP/s figure is the AMX machines'; the
run also measures this machine's own bf16 matmul peak (best of several 2048^3 products on the
default threads) and prints MFU against both.

spa-rl's step packs the rows without padding and runs attention through a torch.compile'd block
kernel (training.py); the compile happens in its first, untimed step, whose seconds are printed
beside the result (inductor caches compiled kernels on disk, so a second process compiles less).

Sides: `spa` (our step, activation checkpointing off: the recipe's default), `spa-gc` (on),
`trl` (SFTTrainer with its defaults on CPU, which include activation checkpointing;
completion-only loss; max_length raised so no row is truncated).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PEAK_FLOPS = 2.5e12  # bf16 matmul peak of the project's CPUs on 2 threads (MODELS.md)


def child_spa(rows, args, gradient_checkpointing: bool) -> dict:
    from spa_rl import runtime
    from spa_rl.recipes import sft
    from spa_rl.tokens import ChatTokenizer
    from spa_rl.training import adamw, cosine_schedule

    from spa_rl.config import load_config

    cfg = load_config(sft.Config, dict(data="unused", model={"name": args.model, "dtype": args.precision},
                                       batch=args.batch, micro_batch=args.batch, micro_batch_tokens=1 << 30,
                                       max_length=args.max_length, gradient_checkpointing=gradient_checkpointing))
    model, tokenizer = sft.load_for_training(cfg, None)
    model.train()
    examples, skipped = sft.tokenize_rows(ChatTokenizer(tokenizer), rows, args.max_length, False)
    assert not skipped
    optimizer = adamw(model, cfg.optim.lr, (cfg.optim.beta1, cfg.optim.beta2), cfg.optim.weight_decay)
    scheduler = cosine_schedule(optimizer, args.steps, 0)
    timed_tokens, timed_seconds, warmup_seconds, losses = 0, 0.0, 0.0, []
    rt = runtime.setup(device="cpu", dtype=args.precision, distributed=False)  # what `spa sft` runs under
    for k in range(args.steps):
        batch = list(range(k * args.batch, (k + 1) * args.batch))
        stats = sft.train_step(model, optimizer, scheduler, examples, batch, cfg, tokenizer.pad_token_id, rt)
        losses.append(stats["loss"])
        if k >= args.warmup_steps:
            timed_tokens += stats["tokens"]
            timed_seconds += stats["seconds"]
        else:
            warmup_seconds += stats["seconds"]
    return {"tokens": timed_tokens, "seconds": timed_seconds, "warmup_seconds": warmup_seconds, "losses": losses,
            "params": model.num_parameters(), "rows_tokens": [len(x) for x, _ in examples]}


def child_trl(rows, args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    folder = model_folder(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, *a, **kw):
            self.ends.append(time.perf_counter())

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(output_dir=out, use_cpu=True, bf16=args.precision == "bf16",
                           per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
                           max_steps=args.steps, learning_rate=1e-4, lr_scheduler_type="cosine", weight_decay=0.01,
                           adam_beta2=0.95, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[],
                           max_length=args.max_length, train_sampling_strategy="sequential", seed=0,
                           dataloader_num_workers=0)
        trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                             callbacks=[timer])
        start = time.perf_counter()
        trainer.train()
        lengths = [len(x) for x in trainer.train_dataset["input_ids"]]
    marks = [start] + timer.ends
    warmup_seconds = marks[args.warmup_steps] - marks[0]
    step_tokens = [sum(lengths[k * args.batch:(k + 1) * args.batch]) for k in range(args.steps)]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    timed = range(args.warmup_steps, args.steps)
    return {"tokens": sum(step_tokens[k] for k in timed), "seconds": sum(marks[k + 1] - marks[k] for k in timed),
            "warmup_seconds": warmup_seconds, "losses": losses, "params": model.num_parameters(), "rows_tokens": lengths,
            "gradient_checkpointing": bool(config.gradient_checkpointing)}


def measured_peak_flops(size: int = 2048, repeats: int = 5) -> float:
    """This machine's bf16 matmul throughput (FLOP/s), best of `repeats` size^3 products: the
    ceiling any training step's matmuls can reach here, measured in the same run."""
    import torch

    a = torch.randn(size, size, dtype=torch.bfloat16)
    b = torch.randn(size, size, dtype=torch.bfloat16)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best


def model_folder(name: str) -> str:
    from spa_rl.models import ensure_default_model, ensure_tiny_model

    return str(ensure_default_model() if name == "default" else ensure_tiny_model() if name == "tiny" else name)


def run_child(side: str, rows_file: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--rows-file", str(rows_file), "--model", args.model,
           "--batch", str(args.batch), "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps),
           "--precision", args.precision, "--max-length", str(args.max_length)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{side} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def prepare_rows(args, tmp: str) -> list[dict]:
    from spa_rl.data import load_rows

    data = args.data
    if data is None:
        from spa_rl.config import load_config
        from spa_rl.recipes.generate import Config, main

        data = str(Path(tmp) / "data")
        print(f"generating a dataset in {data} (sokoban, random policy: same row shapes as self-play)")
        main(load_config(Config, dict(env="sokoban", policy="random", episodes=32, group_size=2, out=data,
                                      val_fraction=0.0)))
    rows = load_rows(data, "train")
    need = args.batch * args.steps
    if len(rows) < need:
        raise SystemExit(f"{data} has {len(rows)} training rows; --batch {args.batch} x --steps {args.steps} needs {need}")
    return rows[:need]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="dataset folder (default: generate one)")
    p.add_argument("--model", default="default")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per side (the first warmup ones untimed)")
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--max-length", type=int, default=4096)
    p.add_argument("--sides", default="spa,trl,spa-gc", help="comma-separated: spa, spa-gc, trl")
    p.add_argument("--repeats", type=int, default=2, help="runs per side, alternating; the best one counts "
                                                            "(the machine may be shared)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rows-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        rows = [json.loads(line) for line in Path(args.rows_file).read_text().splitlines()]
        result = child_trl(rows, args) if args.child == "trl" else child_spa(rows, args, args.child == "spa-gc")
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as tmp:
        rows = prepare_rows(args, tmp)
        rows_file = Path(tmp) / "rows.jsonl"
        rows_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        model_folder(args.model)  # convert the default model once, outside the timed children
        load_start = os.getloadavg()
        peak = measured_peak_flops()
        print(f"this machine's bf16 matmul peak: {peak / 1e9:.0f} GFLOP/s (2048^3, best of 5); "
              f"load average {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}", flush=True)
        results, runs = {}, []
        for repeat in range(args.repeats):  # sides alternate, so a busy spell hits both
            for side in args.sides.split(","):
                print(f"running {side} ({repeat + 1}/{args.repeats}) ...", flush=True)
                r = run_child(side, rows_file, args)
                r["tokens_per_second"] = r["tokens"] / r["seconds"]
                r["mfu"] = 6 * r["params"] * r["tokens_per_second"] / PEAK_FLOPS
                r["mfu_measured_peak"] = 6 * r["params"] * r["tokens_per_second"] / peak
                runs.append({"side": side, "tokens_per_second": r["tokens_per_second"], "peak_rss_gib": r["peak_rss_gib"],
                             "warmup_seconds": r["warmup_seconds"], "load": os.getloadavg()[0]})
                print(f"  {r['tokens_per_second']:.1f} tokens/s, peak {r['peak_rss_gib']:.2f} GiB, untimed warm-up "
                      f"{r['warmup_seconds']:.1f} s, load {os.getloadavg()[0]:.2f}", flush=True)
                if side not in results or r["tokens_per_second"] > results[side]["tokens_per_second"]:
                    results[side] = r
    lengths = results[next(iter(results))]["rows_tokens"]
    print(f"\n{len(rows)} rows, {args.batch} per step, {args.steps} steps ({args.warmup_steps} untimed), "
          f"{args.precision}, model {args.model}, {os.cpu_count()} CPUs, torch threads default; "
          f"tokens/row mean {sum(lengths) / len(lengths):.0f} (min {min(lengths)}, max {max(lengths)})")
    load_end = os.getloadavg()
    print(f"best of {args.repeats} run(s) per side; load average at the start {load_start[0]:.2f} {load_start[1]:.2f} "
          f"{load_start[2]:.2f}, at the end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    print(f"MFU = 6 x params x tokens/s over {PEAK_FLOPS / 1e12:.1f} TFLOP/s (MODELS.md) and over this machine's "
          f"measured bf16 peak {peak / 1e12:.2f} TFLOP/s")
    print(f"{'side':8} {'tokens/s':>9} {'peak GiB':>9} {'MFU':>6} {'MFU-here':>8} {'warm-up s':>9}  losses")
    for side, r in results.items():
        print(f"{side:8} {r['tokens_per_second']:9.1f} {r['peak_rss_gib']:9.2f} {r['mfu']:6.1%} "
              f"{r['mfu_measured_peak']:8.1%} {r['warmup_seconds']:9.1f}  " + " ".join(f"{x:.3f}" for x in r["losses"]))
    if "spa" in results and "trl" in results:
        print(f"ratio spa / trl tokens per second: {results['spa']['tokens_per_second'] / results['trl']['tokens_per_second']:.2f}x"
              f"; peak memory {results['spa']['peak_rss_gib'] / results['trl']['peak_rss_gib']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "measured_peak_flops": peak, "results": results,
                                               "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
