"""Where and how a stage runs: device, compute dtype, ranks, and the collectives between ranks.

Every stage (eval, generate, sft, train) starts with one call and then asks the returned
`Runtime` for everything that depends on the hardware or the launch:

    from spa_rl import runtime
    with runtime.setup(device=cfg.device, dtype=cfg.dtype) as rt:
        model, tok = load_model_and_tokenizer(cfg.model, dtype="fp32", device=rt.device)
        with rt.autocast():
            loss = ...
        rt.sync_gradients(model, op="sum")        # after backward, before clipping
        rt.print("step done")                      # rank 0 only
        rt.main_only(save_checkpoint, path, model) # rank 0 writes, the others wait

Launches:
- `spa sft ...` (one process): world size 1, rank 0, no process group; every collective below
  returns its input. This is the same code path a torchrun launch takes, minus the messages.
- `torchrun --nproc-per-node N "$(which spa)" sft ...`: torchrun sets RANK, WORLD_SIZE,
  LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `setup` binds rank r to cuda:LOCAL_RANK and opens
  the process group with `init_process_group(init_method="env://")`: NCCL on GPUs, gloo on CPU.
  Several nodes work the same way: torchrun's rendezvous (--nnodes, --rdzv-endpoint) fills the
  same variables, and nothing here depends on the node count.

Data parallelism is plain: every rank holds the whole model, takes a contiguous shard of the
global batch (`shard`), and the gradients are summed across ranks before the optimizer step
(`sync_gradients`). See `sync_gradients` for why this, and not DistributedDataParallel.

torch is imported inside the functions that need it: `device_spec_error` and `DTYPE_CHOICES`
are used by config checks in the torch-free CLI (tests/test_layers.py).
"""

from __future__ import annotations

import builtins
import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from spa_rl.errors import ConfigError

if TYPE_CHECKING:  # annotations only; see the module docstring
    import torch

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
DTYPE_CHOICES = ("auto", "bf16", "fp32")
REDUCE_OPS = ("sum", "mean", "max", "min")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


# ---- device ----------------------------------------------------------------------------------


def parse_device_spec(spec: str) -> tuple[str, int | None]:
    """'auto' -> ('auto', None), 'cpu' -> ('cpu', None), 'cuda' -> ('cuda', None),
    'cuda:3' -> ('cuda', 3). Anything else -> ConfigError naming the value. Needs no torch."""
    m = _DEVICE_RE.match(str(spec).strip().lower())
    if m is None or (m.group(2) is not None and m.group(1) != "cuda"):
        raise ConfigError(f"device {spec!r} is not one of {DEVICE_CHOICES}")
    return m.group(1), (int(m.group(2)) if m.group(2) is not None else None)


def device_spec_error(spec: str) -> str | None:
    """The config-check form of `parse_device_spec`: the message, or None when the text is
    well formed (whether CUDA is present is only known when the stage starts)."""
    try:
        parse_device_spec(spec)
    except ConfigError as e:
        return str(e)
    return None


def resolve_device(spec: "str | torch.device" = "auto", local_rank: int | None = None,
                   world_size: int | None = None) -> "torch.device":
    """The device this process computes on.

    auto: cuda:LOCAL_RANK when torch sees a CUDA GPU, else cpu. cuda: cuda:LOCAL_RANK, an error
    without CUDA. cuda:N: that GPU, for one process only (under torchrun every rank would land on
    the same GPU). local_rank / world_size default to torchrun's environment (`env_ranks`).
    """
    import torch

    if isinstance(spec, torch.device):
        spec = str(spec)
    kind, index = parse_device_spec(spec)
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if local_rank is None or world_size is None:
        _, env_world, env_local = env_ranks()
        local_rank = env_local if local_rank is None else local_rank
        world_size = env_world if world_size is None else world_size
    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a CPU-only build")
        raise ConfigError(f"device {spec!r} asks for CUDA but torch sees no CUDA GPU ({build}); "
                          "use --device cpu or auto")
    count = torch.cuda.device_count()
    if index is not None:
        if world_size > 1:
            raise ConfigError(f"device {spec!r} names one GPU but {world_size} processes were launched; "
                              "use --device cuda (each rank takes cuda:LOCAL_RANK)")
        if index >= count:
            raise ConfigError(f"device {spec!r}: only {count} CUDA device(s) visible (cuda:0..cuda:{count - 1})")
        return torch.device("cuda", index)
    if local_rank >= count:
        raise ConfigError(f"LOCAL_RANK {local_rank} has no GPU: only {count} CUDA device(s) visible; "
                          f"launch at most {count} processes per node")
    return torch.device("cuda", local_rank)


# ---- dtype -----------------------------------------------------------------------------------

_DTYPE_NAMES = {
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp32": "float32", "float32": "float32",
    "fp16": "float16", "float16": "float16",
}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_has_fast_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX), where bf16 matmuls run
    ~7x faster than fp32 (MODELS.md); without them bf16 is emulated and slower than fp32."""
    import torch

    flags = _cpu_flags()
    if flags:
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    # No /proc/cpuinfo (not Linux): ask torch's private probes when they exist.
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, p, lambda: False)() for p in probes)


def cuda_has_fast_bf16(device: "torch.device") -> bool:
    """Native bf16 tensor cores: compute capability 8.0 (Ampere) and later. Older GPUs emulate
    bf16 (torch.cuda.is_bf16_supported() says True there by default), which is slower than fp32."""
    import torch

    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_dtype(name: "str | torch.dtype" = "auto", device: "str | torch.device | None" = None) -> "torch.dtype":
    """"auto" -> bf16 where `device` computes bf16 natively (a GPU from Ampere on, a CPU with
    AVX512-BF16/AMX), else fp32; "bf16"/"fp32"/"fp16" (or their torch names) explicitly.

    device: where the model runs; None means the device `resolve_device("auto")` picks, which
    is right only for code that moves its model there. The answer is for that device alone: a
    model kept on the CPU of a GPU machine gets the CPU's answer.

    bf16 weights suit generation. For training keep fp32 weights and autocast to bf16: bf16 has
    8 mantissa bits, so an AdamW step at lr 1e-6 on a weight of size ~0.05 rounds to no change.
    """
    import torch

    if isinstance(name, torch.dtype):
        return name
    key = str(name).lower()
    if key == "auto":
        dev = resolve_device("auto") if device is None else torch.device(device)
        fast = cuda_has_fast_bf16(dev) if dev.type == "cuda" else cpu_has_fast_bf16()
        return torch.bfloat16 if fast else torch.float32
    if key not in _DTYPE_NAMES:
        raise ConfigError(f"dtype {name!r} is not one of auto, bf16, fp32, fp16")
    return getattr(torch, _DTYPE_NAMES[key])


def dtype_name(dtype: "torch.dtype") -> str:
    """torch.bfloat16 -> 'bf16' (the spelling configs use)."""
    return {"torch.bfloat16": "bf16", "torch.float32": "fp32", "torch.float16": "fp16"}.get(str(dtype), str(dtype))


# ---- ranks and shards ------------------------------------------------------------------------


def _env_int(environ, var: str, default: int | None) -> int | None:
    text = environ.get(var)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"environment variable {var}={text!r} is not an integer") from None


def env_ranks(environ=None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's RANK, WORLD_SIZE, LOCAL_RANK; (0, 1, 0)
    when they are absent (a plain single-process launch)."""
    env = os.environ if environ is None else environ
    world = _env_int(env, "WORLD_SIZE", 1)
    rank = _env_int(env, "RANK", None if world > 1 else 0)
    local = _env_int(env, "LOCAL_RANK", None if world > 1 else 0)
    if world < 1:
        raise ConfigError(f"environment variable WORLD_SIZE={world} must be >= 1")
    for var, value in (("RANK", rank), ("LOCAL_RANK", local)):
        if value is None:
            raise ConfigError(f"WORLD_SIZE={world} but {var} is not set; launch the processes with torchrun")
        if value < 0:
            raise ConfigError(f"environment variable {var}={value} must be >= 0")
    if rank >= world:
        raise ConfigError(f"environment variable RANK={rank} must be < WORLD_SIZE={world}")
    return rank, world, local


def shard_range(n: int, rank: int, world_size: int, unit: int = 1) -> range:
    """The indices of rank `rank`'s share of n items: a contiguous block of whole units of
    `unit` items (a PPO group, a micro-batch), block sizes differing by at most one unit.

    Rank r's block comes right after rank r-1's, so concatenating the ranks' shards in rank
    order gives back range(n), the order a single process uses. A rank may get an empty range
    (fewer units than ranks); it must still take part in every collective.
    """
    if unit < 1:
        raise ConfigError(f"shard unit must be >= 1, got {unit}")
    if n < 0 or n % unit:
        raise ConfigError(f"cannot shard {n} items into whole units of {unit}")
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in [0, {world_size})")
    units = n // unit
    lo, hi = rank * units // world_size, (rank + 1) * units // world_size
    return range(lo * unit, hi * unit)


def rank_seed(seed: int, rank: int) -> int:
    """A seed for rank `rank`'s random streams: `seed` itself on rank 0 (so a single-process run
    draws exactly what it drew before ranks existed) and a well-mixed, distinct 63-bit seed on
    every other rank (seed + rank would collide with seeds other runs derive by adding)."""
    if rank == 0:
        return int(seed)
    import numpy as np

    return int(np.random.SeedSequence([int(seed) & (2**63 - 1), rank]).generate_state(1, np.uint64)[0] >> 1)


# ---- the runtime -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    """The resolved launch: this process's device, compute dtype and place among the ranks.

    With world_size 1 and no process group every collective returns its input unchanged; the
    methods are the same, so stages have one code path for a laptop and for eight GPUs.
    """

    device: "torch.device"
    dtype: "torch.dtype"  # compute dtype: bf16 (autocast, rollout weights) or fp32
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # "nccl" / "gloo" while a process group is open, else None
    owns_process_group: bool = False  # setup() opened it, so close() destroys it

    # -- identity --

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints, shows progress and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True while a process group is open (collectives really communicate)."""
        import torch.distributed as dist

        return self.backend is not None and dist.is_available() and dist.is_initialized()

    def describe(self) -> dict:
        """Plain values for logs and config files."""
        return {"device": str(self.device), "dtype": dtype_name(self.dtype), "rank": self.rank,
                "world_size": self.world_size, "local_rank": self.local_rank, "backend": self.backend}

    # -- compute --

    def autocast(self):
        """bf16 autocast on this device when the compute dtype is bf16, else a no-op context.
        Use it around training and scoring forwards over fp32 master weights."""
        import torch

        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                              enabled=self.dtype == torch.bfloat16)

    def generator(self, seed: int, per_rank: bool = True) -> "torch.Generator":
        """A torch.Generator on this device (torch.multinomial needs the generator on the
        probabilities' device), seeded with `rank_seed(seed, rank)` unless per_rank=False.
        CUDA and CPU generators give different streams for the same seed."""
        import torch

        return torch.Generator(device=self.device).manual_seed(rank_seed(seed, self.rank) if per_rank else int(seed))

    def to_device(self, obj):
        """Tensors (also inside dicts, lists, tuples) moved to this device."""
        import torch

        if isinstance(obj, torch.Tensor):
            return obj.to(self.device)
        if isinstance(obj, dict):
            return {k: self.to_device(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.to_device(v) for v in obj)
        return obj

    # -- rank 0 only --

    def print(self, *args, **kwargs) -> None:
        """print() on rank 0; nothing elsewhere."""
        if self.is_main:
            kwargs.setdefault("flush", True)
            builtins.print(*args, **kwargs)

    def progress(self, *args, **kwargs):
        """A tqdm bar shown on rank 0 only (the other ranks get a disabled bar with the same API)."""
        from tqdm.auto import tqdm

        kwargs["disable"] = bool(kwargs.get("disable", False)) or not self.is_main
        return tqdm(*args, **kwargs)

    def main_only(self, fn: Callable, *args, barrier: bool = True, **kwargs):
        """fn(*args, **kwargs) on rank 0 (checkpoints, metrics files, reports); with barrier, the
        other ranks wait until it returned, so none reads a file rank 0 is still writing.
        Returns fn's result on rank 0 and None elsewhere."""
        result = fn(*args, **kwargs) if self.is_main else None
        if barrier:
            self.barrier()
        return result

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first, then the others (e.g. converting the default model into
        the shared cache once, which the other ranks then only load)."""
        if not self.is_main:
            self.barrier()
        try:
            yield
        finally:
            if self.is_main:
                self.barrier()

    # -- collectives --

    def barrier(self) -> None:
        import torch.distributed as dist

        if not self.distributed:
            return
        if self.backend == "nccl":  # names the GPU, so NCCL does not guess one per rank
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def _comm_device(self) -> "torch.device":
        import torch

        return self.device if self.backend == "nccl" else torch.device("cpu")

    def all_reduce(self, tensor: "torch.Tensor", op: str = "sum") -> "torch.Tensor":
        """Reduce `tensor` across ranks in place (sum, mean, max or min) and return it. A tensor
        not on the communication device (NCCL: this GPU; gloo: the CPU) goes through a copy."""
        import torch
        import torch.distributed as dist

        if op not in REDUCE_OPS:
            raise ConfigError(f"reduce op {op!r} is not one of {', '.join(REDUCE_OPS)}")
        if op == "mean" and not (tensor.is_floating_point() or tensor.is_complex()):
            raise ConfigError(f"reduce op 'mean' needs a floating-point tensor, got {tensor.dtype}")
        if not self.distributed:
            return tensor
        comm = self._comm_device()
        work = tensor if tensor.device == comm else tensor.to(comm)
        # ReduceOp.AVG exists for NCCL only: a sum divided by the world size works everywhere.
        dist_op = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM,
                   "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
        dist.all_reduce(work, op=dist_op)
        if op == "mean":
            work.div_(self.world_size)
        if work is not tensor:
            with torch.no_grad():
                tensor.copy_(work)
        return tensor

    def all_reduce_float(self, value: float, op: str = "sum") -> float:
        """A python number reduced across ranks (in float64)."""
        import torch

        return float(self.all_reduce(torch.tensor([float(value)], dtype=torch.float64), op)[0])

    def reduce_metrics(self, metrics: dict[str, float], weight: float = 1.0) -> dict[str, float]:
        """Weighted mean across ranks of each metric: sum_r w_r m_r / sum_r w_r over the ranks
        that report it (a rank without the key, e.g. with no kept episode, does not count).
        weight: how much this rank's values stand for, e.g. its number of episodes or tokens,
        so that a mean of per-rank means equals the mean over all items."""
        import torch

        if not self.distributed:
            return {k: float(v) for k, v in metrics.items()}
        keys = sorted(set().union(*self.all_gather_object(sorted(metrics))))
        vec = torch.zeros(2 * len(keys), dtype=torch.float64)
        for i, k in enumerate(keys):
            if k in metrics:
                vec[2 * i] = float(weight) * float(metrics[k])
                vec[2 * i + 1] = float(weight)
        self.all_reduce(vec, "sum")
        return {k: float(vec[2 * i] / vec[2 * i + 1]) if vec[2 * i + 1] != 0 else float("nan")
                for i, k in enumerate(keys)}

    def all_gather_object(self, obj: Any) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank (pickled; for small objects: scores,
        token id lists, metrics). World size 1: [obj]."""
        import torch.distributed as dist

        if not self.distributed:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank `src`'s obj on every rank."""
        import torch.distributed as dist

        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    # -- shards --

    def shard_range(self, n: int, unit: int = 1) -> range:
        """This rank's indices of n items (see the module function `shard_range`)."""
        return shard_range(n, self.rank, self.world_size, unit)

    def shard(self, items: Sequence, unit: int = 1) -> list:
        """This rank's contiguous share of `items`; `gather_shards` puts the shares back together."""
        r = self.shard_range(len(items), unit)
        return list(items[r.start:r.stop])

    def gather_shards(self, local_items: Iterable) -> list:
        """Every rank's list, concatenated in rank order: the inverse of `shard`, so the result
        is in the order a single process would have produced."""
        out: list = []
        for part in self.all_gather_object(list(local_items)):
            out.extend(part)
        return out

    # -- models --

    def sync_gradients(self, params, *, op: str, bucket_mb: float = 64.0) -> None:
        """All-reduce the .grad of `params` (a module or an iterable of parameters) across ranks.

        op="sum": each rank's loss was already divided by the *global* denominator (the trained
        tokens of the whole global batch, or the number of micro-batches over all ranks); then
        the sum over ranks is exactly the gradient one process computes on the whole batch, up
        to the order of floating-point additions. op="mean": each rank's loss is a mean over its
        own shard (DistributedDataParallel's convention); equal to the one-process gradient only
        when all shards have the same denominator.

        Why not DistributedDataParallel: spa-rl's log-probs (`training.token_logprobs`) call the
        backbone and the LM head directly instead of `model.forward`, so DDP's forward hook,
        which prepares its gradient buckets, would never run; gradient accumulation would also
        need `no_sync()` around every micro-batch but the last. One all-reduce per optimizer step
        keeps the micro-batch loops unchanged. After it every rank holds the same gradient, so
        clipping and the optimizer step give bitwise-identical weights on all ranks, and weights
        within float rounding of a single-process run with the same global batch. The price: the
        reduction does not overlap the backward pass (DDP's bucketed overlap), one extra gradient-
        sized buffer per bucket. A parameter with no gradient on any rank keeps .grad None (the
        optimizer skips it, as in one process); one with a gradient on some ranks only gets
        zeros on the others, so every rank takes part in the same reductions.
        """
        import torch

        if op not in ("sum", "mean"):
            raise ConfigError(f"sync_gradients op must be 'sum' or 'mean', got {op!r}")
        params = list(params.parameters()) if isinstance(params, torch.nn.Module) else list(params)
        params = [p for p in params if p.requires_grad]
        if not self.distributed or not params:
            return
        has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32)
        self.all_reduce(has_grad, "max")
        live = []
        for p, any_rank in zip(params, has_grad.tolist()):
            if any_rank:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                live.append(p)
        limit = int(bucket_mb * 2**20)
        bucket: list = []
        size = 0
        for p in live:
            nbytes = p.grad.numel() * p.grad.element_size()
            if bucket and (size + nbytes > limit or p.grad.dtype != bucket[0].grad.dtype
                           or p.grad.device != bucket[0].grad.device):
                self._reduce_bucket(bucket, op)
                bucket, size = [], 0
            bucket.append(p)
            size += nbytes
        if bucket:
            self._reduce_bucket(bucket, op)

    def _reduce_bucket(self, bucket: list, op: str) -> None:
        # One flat buffer per bucket: a few large all-reduces instead of one per tensor.
        import torch

        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        self.all_reduce(flat, op)
        offset = 0
        for p in bucket:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n

    def broadcast_parameters(self, module, src: int = 0) -> None:
        """Copy rank `src`'s parameters and buffers into every rank's `module` (a start from the
        same weights even where initialisation drew random numbers differently)."""
        import torch
        import torch.distributed as dist

        if not self.distributed:
            return
        comm = self._comm_device()
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                work = t.data if t.device == comm else t.data.to(comm)
                dist.broadcast(work, src=src)
                if work is not t.data:
                    t.data.copy_(work)

    def parameters_checksum(self, module) -> list[float]:
        """Per-tensor float64 sums of `module`'s parameters (a cheap fingerprint of the weights)."""
        import torch

        with torch.no_grad():
            return [float(p.detach().double().sum()) for p in module.parameters()]

    def assert_in_sync(self, module, what: str = "model") -> None:
        """Raise RuntimeError unless every rank holds bitwise the same parameter fingerprint
        (a debugging check: data-parallel ranks must never drift apart)."""
        sums = self.all_gather_object(self.parameters_checksum(module))
        bad = [r for r, s in enumerate(sums) if s != sums[0]]
        if bad:
            raise RuntimeError(f"{what}: parameters of rank(s) {bad} differ from rank 0's")

    # -- lifetime --

    def close(self) -> None:
        """Destroy the process group if `setup` opened it (idempotent)."""
        import torch.distributed as dist

        if self.owns_process_group and dist.is_available() and dist.is_initialized():
            # every rank is done with its last collective before any rank closes its connections
            self.barrier()
            dist.destroy_process_group()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def setup(device: "str | torch.device" = "auto", dtype: "str | torch.dtype" = "auto",
          distributed: "str | bool" = "auto", timeout_s: float = 1800.0) -> Runtime:
    """Resolve this process's device and compute dtype and, for a multi-process launch, open the
    process group. Call once per process, at the start of a stage.

    device: auto | cpu | cuda | cuda:N (see `resolve_device`); under torchrun rank r uses
    cuda:LOCAL_RANK. dtype: auto | bf16 | fp32, the compute dtype for that device (fp16 is
    refused: training in fp16 needs loss scaling, which spa-rl does not do).
    distributed: "auto" opens a process group when WORLD_SIZE > 1; True opens one even for a
    single process (a launch test of NCCL/gloo); False never does. A process group already
    opened by the caller is reused and left open by `close`.
    timeout_s: how long a collective waits for the slowest rank before failing.
    """
    import datetime

    import torch
    import torch.distributed as dist

    if distributed not in ("auto", True, False):
        raise ConfigError(f"distributed must be 'auto', True or False, got {distributed!r}")
    rank, world, local = env_ranks()
    dev = resolve_device(device, local_rank=local, world_size=world)
    compute = resolve_dtype(dtype, dev)
    if compute not in (torch.bfloat16, torch.float32):
        raise ConfigError(f"dtype {dtype!r}: the compute dtype must be auto, bf16 or fp32 "
                          "(fp16 training needs loss scaling, which spa-rl does not do)")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # NCCL and all_gather_object use the current device
    want = world > 1 if distributed == "auto" else bool(distributed)
    if not want:
        return Runtime(dev, compute, rank, world, local)
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; run a single process")
    if dist.is_initialized():
        return Runtime(dev, compute, dist.get_rank(), dist.get_world_size(), local, dist.get_backend(), False)
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(var):
            raise ConfigError(f"WORLD_SIZE={world} but {var} is not set; launch the processes with torchrun")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    # torch._dynamo (imported by transformers' model code and by torch.compile) keeps a
    # reference to a default process group that exists when it is first imported; then
    # destroy_process_group cannot free it, gloo's worker threads outlive `close`, and the
    # interpreter aborts at exit now and then ("terminate called without an active exception").
    # Importing it first keeps it from ever seeing the group.
    import torch._dynamo  # noqa: F401

    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=dev if dev.type == "cuda" else None)
    return Runtime(dev, compute, rank, world, local, backend, True)
