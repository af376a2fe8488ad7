"""One prepared check of spa-rl on a GPU machine: does the runtime resolve the device, do the
model, the HF generation backend and an SFT-like step run there, and how fast.

    python benchmarks/gpu_check.py OUT_DIR                 # on the GPU machine (about 2-3 min)
    python benchmarks/gpu_check.py OUT_DIR --device cpu --small   # the same code paths on a CPU, in seconds

Writes OUT_DIR/gpu_check.json (every figure, every error with its traceback) and
OUT_DIR/gpu_check.txt (one line per check). The JSON is rewritten after each check, so a run cut
short still leaves what it measured. Each check catches its own failure: one that fails is
recorded and the next one runs; the script exits 0 unless it could not write its output.

Models: the GPU machine has no network and only the repository travels (no GGUF package), so
the checks use the tiny random model (`--model tiny`) and, for throughput, a random-init Llama
with SmolLM2-135M's exact shape (hidden 576, 30 layers, 9 heads, 3 kv heads, intermediate 1536,
vocabulary 49152, tied embeddings): its speed is the default model's; its outputs mean nothing.

Needs spa-rl's runtime dependencies (gymnasium among them, which the lent GPU image lacks:
docs/scaling.md, "GPU check", says how to carry its wheels).

Checks, in order:
  environment        torch / CUDA / GPU / NCCL versions and sizes; missing packages
  runtime            device and dtype resolution (auto, cpu, cuda, cuda:0, bad specs), setup()
  load_tiny          load_model_and_tokenizer("tiny", device=<device>): parameters on the device
  hf_default_generator  HFBackend as it is today (a CPU torch.Generator) on the device
  hf_generate_tiny   HFBackend with rt.generator() on the device: tokens/s, same seed -> same tokens
  generate_135m      HFBackend on the 135M-shape model in the runtime dtype: tokens/s at two batch sizes
  sft_step_135m      fp32 master weights, bf16 autocast, masked NLL, AdamW: tokens/s, peak memory
  process_group      runtime.setup(distributed=True) with torchrun's variables for one process:
                     NCCL (gloo on a CPU) init, all_reduce, all_gather_object, sync_gradients, barrier
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

# Run from a checkout without installing: src/ on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SMOLLM2_135M_SHAPE = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                          intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
                          max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5)


class Report:
    """Results of every check, rewritten to disk after each one."""

    def __init__(self, out: Path, args):
        self.out = out
        self.data = {"script": "benchmarks/gpu_check.py", "args": vars(args), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "checks": {}}
        self.t0 = time.perf_counter()

    def run(self, name: str, fn, budget_s: float):
        elapsed = time.perf_counter() - self.t0
        if elapsed > budget_s:
            self.data["checks"][name] = {"status": "skipped", "reason": f"time budget {budget_s:.0f} s used up"}
            self.write()
            return None
        t = time.perf_counter()
        try:
            result = fn()
            entry = {"status": "ok", **(result or {})}
        except Exception as e:  # a failed check is a result, not the end of the run
            entry = {"status": "failed", "error": f"{type(e).__name__}: {e}".splitlines()[0][:500],
                     "traceback": traceback.format_exc()[-4000:]}
        entry["seconds"] = round(time.perf_counter() - t, 3)
        self.data["checks"][name] = entry
        self.write()
        print(self.line(name, entry), flush=True)
        return entry

    @staticmethod
    def line(name: str, e: dict) -> str:
        keys = [k for k in ("device", "device_name", "dtype", "tokens_per_s", "tokens_per_s_by_batch",
                            "train_tokens_per_s", "peak_memory_gib", "raised", "backend", "error") if k in e]
        detail = "  ".join(f"{k}={e[k]}" for k in keys)
        return f"{name:22s} {e['status']:8s} {e.get('seconds', 0):7.2f}s  {detail}"

    def write(self) -> None:
        self.data["total_seconds"] = round(time.perf_counter() - self.t0, 2)
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / ".gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.out / "gpu_check.json")
        lines = [f"spa-rl gpu_check, {self.data['started']}, total {self.data['total_seconds']} s"]
        lines += [self.line(n, e) for n, e in self.data["checks"].items()]
        (self.out / "gpu_check.txt").write_text("\n".join(lines) + "\n")


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- checks ----------------------------------------------------------------------------------


def check_environment(args):
    import importlib.util

    import torch
    import transformers

    # spa_rl imports gymnasium on import (the games register themselves): a machine without the
    # package's dependencies fails every later check on that, so name what is missing up front.
    needed = ("gymnasium", "numpy", "yaml", "tokenizers", "transformers", "safetensors", "tqdm")
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(f"missing Python packages {missing}: carry their wheels (docs/scaling.md, 'GPU check')")
    from spa_rl import runtime

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
            "cpu_count": os.cpu_count(), "cpu_fast_bf16": runtime.cpu_has_fast_bf16(),
            "distributed_available": torch.distributed.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device_count=torch.cuda.device_count(), device_name=props.name,
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count)
        try:
            v = torch.cuda.nccl.version()
            info["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except Exception as e:  # a version probe is not worth failing the environment check
            info["nccl"] = f"unknown ({type(e).__name__})"
    return info


def check_runtime(args, state):
    from spa_rl import runtime

    resolved = {}
    for spec in ("auto", "cpu", "cuda", "cuda:0", "gpu", "cuda:99"):
        try:
            resolved[spec] = str(runtime.resolve_device(spec))
        except Exception as e:
            resolved[spec] = f"{type(e).__name__}: {e}"
    rt = runtime.setup(device=args.device, dtype=args.dtype, distributed=False)
    state["rt"] = rt
    cpu_dtype = runtime.dtype_name(runtime.resolve_dtype("auto", "cpu"))
    return {"resolve_device": resolved, "dtype_auto_for_device": runtime.dtype_name(runtime.resolve_dtype("auto", rt.device)),
            "dtype_auto_for_cpu": cpu_dtype, "setup": rt.describe(), "device": str(rt.device),
            "dtype": runtime.dtype_name(rt.dtype)}


def check_load_tiny(args, state):
    from spa_rl import runtime
    from spa_rl.models import load_model_and_tokenizer

    rt = state["rt"]
    model, tok = load_model_and_tokenizer("tiny", dtype="auto", device=rt.device, cache_dir=state["cache"])
    devices = sorted({str(p.device) for p in model.parameters()})
    dtypes = sorted({runtime.dtype_name(p.dtype) for p in model.parameters()})
    state["tiny"] = (model, tok)
    if devices != [str(rt.device)]:
        raise RuntimeError(f"parameters on {devices}, expected {rt.device}")
    return {"parameter_devices": devices, "parameter_dtypes": dtypes, "device": devices[0], "dtype": dtypes[0],
            "parameters": sum(p.numel() for p in model.parameters())}


def _tiny_prompts(tok, n):
    from spa_rl.agent import EpisodeConfig
    from spa_rl.rollout.engine import make_episodes
    from spa_rl.tokens import ChatTokenizer

    chat = ChatTokenizer(tok)
    eps = make_episodes("sokoban", "val", 0, n, 1, EpisodeConfig())
    return [chat.prompt_ids(ep.messages) for _, ep in eps]


def check_hf_default_generator(args, state):
    """HFBackend builds a CPU torch.Generator; on a GPU model torch.multinomial refuses it. This
    records what happens today, so the fix (a generator on the model's device) is measured."""
    from spa_rl.rollout.backend import HFBackend, SamplingParams

    model, tok = state["tiny"]
    backend = HFBackend(model, tok, max_batch_size=4, seed=0)
    try:
        gens = backend.generate(_tiny_prompts(tok, 2), SamplingParams(max_new_tokens=4, stop_strings=()))
        return {"raised": False, "generator_device": str(backend.generator.device),
                "tokens": sum(len(g.token_ids) for g in gens)}
    except RuntimeError as e:
        return {"raised": True, "message": str(e).splitlines()[0][:300], "generator_device": str(backend.generator.device)}


def _timed_generate(backend, prompts, params, device):
    sync(device)
    t = time.perf_counter()
    gens = backend.generate(prompts, params)
    sync(device)
    seconds = time.perf_counter() - t
    tokens = sum(len(g.token_ids) for g in gens)
    return gens, tokens, seconds


def check_hf_generate_tiny(args, state):
    from spa_rl.rollout.backend import HFBackend, SamplingParams

    rt = state["rt"]
    model, tok = state["tiny"]
    prompts = _tiny_prompts(tok, args.tiny_batch)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, stop_strings=("</answer>",))
    backend = HFBackend(model, tok, max_batch_size=args.tiny_batch, seed=0)
    backend.generator = rt.generator(0)  # what HFBackend should build itself (see hf_default_generator)
    _timed_generate(backend, prompts[:2], SamplingParams(max_new_tokens=2, stop_strings=()), rt.device)  # warm-up
    backend.generator = rt.generator(0)
    gens, tokens, seconds = _timed_generate(backend, prompts, params, rt.device)
    backend.generator = rt.generator(0)
    again = backend.generate(prompts, params)
    finish = {}
    for g in gens:
        finish[g.finish_reason] = finish.get(g.finish_reason, 0) + 1
    return {"generator_device": str(backend.generator.device), "batch": len(prompts),
            "prompt_tokens_mean": round(sum(map(len, prompts)) / len(prompts)), "generated_tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 1), "finish_reasons": finish,
            "same_seed_same_tokens": [g.token_ids for g in gens] == [g.token_ids for g in again],
            "logprobs_finite": all(lp == lp and lp <= 0 for g in gens for lp in g.logprobs)}


def _build_135m(args, dtype, device):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(SMOLLM2_135M_SHAPE)
    if args.small:
        shape.update(num_hidden_layers=2)
    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: no CPU copy of the weights
        model = LlamaForCausalLM(config)
    return model.to(dtype), config


def check_generate_135m(args, state):
    import types

    import torch

    from spa_rl import runtime
    from spa_rl.rollout.backend import HFBackend, SamplingParams

    rt = state["rt"]
    model, config = _build_135m(args, rt.dtype, rt.device)
    model.eval()
    tok = types.SimpleNamespace(eos_token_id=2, pad_token_id=0)  # no text: stop strings are off
    gen = torch.Generator().manual_seed(1)
    by_batch, details = {}, {}
    for batch in args.batches:
        prompts = [torch.randint(3, config.vocab_size, (args.prompt_len,), generator=gen).tolist() for _ in range(batch)]
        backend = HFBackend(model, tok, max_batch_size=batch, seed=0)
        backend.generator = rt.generator(0)
        _timed_generate(backend, prompts[:2], SamplingParams(max_new_tokens=2, stop_strings=()), rt.device)  # warm-up
        params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, stop_strings=())
        _, tokens, seconds = _timed_generate(backend, prompts, params, rt.device)
        by_batch[batch] = round(tokens / seconds, 1)
        details[batch] = {"generated_tokens": tokens, "seconds": round(seconds, 3)}
    state["model_135m"] = model
    return {"shape": {k: v for k, v in SMOLLM2_135M_SHAPE.items()} | ({"num_hidden_layers": 2} if args.small else {}),
            "dtype": runtime.dtype_name(rt.dtype), "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "tokens_per_s_by_batch": by_batch, "details": details,
            "peak_memory_gib": _peak_gib(rt.device)}


def _peak_gib(device):
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def check_sft_step_135m(args, state):
    import torch

    from spa_rl.training import masked_nll_sum, pad_batch

    rt = state["rt"]
    state.pop("model_135m", None)  # the bf16 generation copy is not needed any more
    if rt.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(rt.device)
    model, config = _build_135m(args, torch.float32, rt.device)  # fp32 master weights, bf16 autocast
    model.train()
    gen = torch.Generator().manual_seed(2)
    rows = [torch.randint(3, config.vocab_size, (args.sft_len,), generator=gen).tolist() for _ in range(args.sft_rows)]
    masks = [[0] * (args.sft_len // 2) + [1] * (args.sft_len - args.sft_len // 2) for _ in rows]
    ids, attn, mask = (t.to(rt.device) for t in pad_batch(rows, masks, 0))
    n_trained = int(mask[:, 1:].sum())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01)

    def step():
        with rt.autocast():
            nll, _ = masked_nll_sum(model, ids, attn, mask)
        loss = nll / n_trained
        loss.backward()
        rt.sync_gradients(model, op="sum")  # a no-op in one process; the call stages will make
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach()), float(norm)

    losses = [step()[0]]  # warm-up (kernel selection, allocator)
    sync(rt.device)
    t = time.perf_counter()
    for _ in range(args.steps):
        losses.append(step()[0])
    sync(rt.device)
    seconds = time.perf_counter() - t
    tokens = args.steps * int(attn.sum())
    with torch.autocast(device_type=rt.device.type, dtype=torch.bfloat16, enabled=rt.dtype == torch.bfloat16):
        probe = model.model.embed_tokens.weight[:2] @ model.model.embed_tokens.weight[:2].T
    return {"rows": args.sft_rows, "row_tokens": args.sft_len, "steps_timed": args.steps,
            "train_tokens_per_s": round(tokens / seconds, 1), "seconds_per_step": round(seconds / args.steps, 3),
            "losses": [round(x, 4) for x in losses], "loss_finite": all(x == x for x in losses),
            "loss_went_down": losses[-1] < losses[0], "autocast_dtype": str(probe.dtype),
            "master_weight_dtype": str(next(model.parameters()).dtype), "peak_memory_gib": _peak_gib(rt.device)}


@contextlib.contextmanager
def torchrun_env_for_one_process():
    """The variables torchrun sets, for a single rank (restored afterwards)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    new = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    old = {k: os.environ.get(k) for k in new}
    os.environ.update(new)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_process_group(args, state):
    import torch

    from spa_rl import runtime

    with torchrun_env_for_one_process():
        t = time.perf_counter()
        rt = runtime.setup(device=args.device, dtype=args.dtype, distributed=True)
        init_s = time.perf_counter() - t
        try:
            out = {"backend": rt.backend, "distributed": rt.distributed, "init_seconds": round(init_s, 3),
                   "describe": rt.describe()}
            x = torch.arange(4, dtype=torch.float32, device=rt.device)
            out["all_reduce_sum_on_device"] = rt.all_reduce(x.clone(), "sum").tolist()
            out["all_reduce_mean_cpu_tensor"] = rt.all_reduce(torch.tensor([3.0]), "mean").tolist()
            out["all_reduce_float"] = rt.all_reduce_float(1.25)
            out["reduce_metrics"] = rt.reduce_metrics({"loss": 0.5}, weight=2)
            out["all_gather_object"] = rt.all_gather_object({"rank": rt.rank})
            out["broadcast_object"] = rt.broadcast_object("hello")
            lin = torch.nn.Linear(8, 8).to(rt.device)
            lin(torch.ones(2, 8, device=rt.device)).sum().backward()
            before = lin.weight.grad.clone()
            rt.sync_gradients(lin, op="sum")
            out["sync_gradients_unchanged_for_one_rank"] = bool(torch.equal(before, lin.weight.grad))
            rt.broadcast_parameters(lin)
            rt.assert_in_sync(lin)
            big = torch.ones(64 * 2**20 // 4, device=rt.device)  # 64 MiB: the bucket size sync_gradients uses
            rt.all_reduce(big)
            sync(rt.device)
            t = time.perf_counter()
            for _ in range(5):
                rt.all_reduce(big)
            sync(rt.device)
            out["all_reduce_64mib_ms"] = round((time.perf_counter() - t) / 5 * 1000, 3)
            rt.barrier()
            out["barrier"] = True
        finally:
            rt.close()
        out["closed"] = not torch.distributed.is_initialized()
        return out


# ---- main ------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="folder for gpu_check.json and gpu_check.txt")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    ap.add_argument("--dtype", default="auto", help="auto, bf16 or fp32 (default auto)")
    ap.add_argument("--small", action="store_true", help="CPU-sized run: 2 layers, small batches (a smoke test)")
    ap.add_argument("--budget-s", type=float, default=210.0, help="skip the remaining checks after this many seconds")
    args = ap.parse_args()
    sizes = dict(tiny_batch=2, batches=[2, 3], prompt_len=32, new_tokens=8, sft_rows=2, sft_len=32, steps=1) if args.small \
        else dict(tiny_batch=32, batches=[16, 64], prompt_len=665, new_tokens=128, sft_rows=8, sft_len=1024, steps=5)
    for k, v in sizes.items():
        setattr(args, k, v)
    report = Report(Path(args.out), args)
    state = {"cache": tempfile.mkdtemp(prefix="spa-gpu-check-")}
    os.environ.setdefault("SPA_RL_CACHE", state["cache"])
    report.run("environment", lambda: check_environment(args), args.budget_s)
    report.run("runtime", lambda: check_runtime(args, state), args.budget_s)
    if "rt" not in state:  # nothing below can run without a device
        return 0
    for name, fn in (("load_tiny", check_load_tiny), ("hf_default_generator", check_hf_default_generator),
                     ("hf_generate_tiny", check_hf_generate_tiny), ("generate_135m", check_generate_135m),
                     ("sft_step_135m", check_sft_step_135m), ("process_group", check_process_group)):
        needs_tiny = name in ("hf_default_generator", "hf_generate_tiny")
        if needs_tiny and "tiny" not in state:
            report.data["checks"][name] = {"status": "skipped", "reason": "load_tiny failed"}
            report.write()
            continue
        report.run(name, lambda fn=fn: fn(args, state), args.budget_s)
    report.write()
    print(f"wrote {report.out / 'gpu_check.json'} and {report.out / 'gpu_check.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
