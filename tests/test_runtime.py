"""spa_rl.runtime: device and dtype resolution, rank environment, shards, the single-process
path, and real 2-process gloo collectives on the CPU.

The 2-process tests launch this file itself with `torchrun --standalone --nproc-per-node 2`
(the launch users run), once per session: each rank runs `_worker`, which exercises the
collectives and writes what it saw to a JSON file; the tests below read those files.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from spa_rl import runtime
from spa_rl.errors import ConfigError

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def no_launch_env(monkeypatch):
    """A plain single-process launch, whatever the shell running pytest exported."""
    for var in TORCHRUN_ENV:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def fake_gpus(monkeypatch):
    """torch sees `n` CUDA GPUs of compute capability `cap` (no GPU is touched)."""
    def install(n: int, cap=(9, 0)):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    return install


# ---- device ----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec,expected", [("auto", ("auto", None)), ("cpu", ("cpu", None)),
                                           ("CUDA", ("cuda", None)), ("cuda:3", ("cuda", 3)), (" cuda:0 ", ("cuda", 0))])
def test_parse_device_spec(spec, expected):
    assert runtime.parse_device_spec(spec) == expected
    assert runtime.device_spec_error(spec) is None


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:x", "cpu:0", "auto:1", "cuda:-1", "mps", ""])
def test_bad_device_spec_is_one_line_naming_the_value(spec):
    with pytest.raises(ConfigError) as e:
        runtime.parse_device_spec(spec)
    msg = str(e.value)
    assert repr(spec) in msg and "auto, cpu, cuda or cuda:N" in msg and "\n" not in msg
    assert runtime.device_spec_error(spec) == msg


def test_device_spec_check_needs_no_torch():
    # Config checks run in the torch-free CLI (tests/test_layers.py): the spec check must not pull torch in.
    code = ("import sys; from spa_rl.runtime import device_spec_error, DTYPE_CHOICES; "
            "assert device_spec_error('gpu'); assert device_spec_error('cuda:1') is None; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_child_env())
    assert res.returncode == 0, res.stderr


def test_auto_is_cpu_without_cuda(fake_gpus, no_launch_env):
    fake_gpus(0)
    assert runtime.resolve_device("auto") == torch.device("cpu")
    assert runtime.resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_a_clear_error(fake_gpus, no_launch_env, spec):
    fake_gpus(0)
    with pytest.raises(ConfigError, match=f"device '{spec}' asks for CUDA but torch sees no CUDA GPU") as e:
        runtime.resolve_device(spec)
    assert "--device cpu" in str(e.value) and "\n" not in str(e.value)


def test_each_rank_takes_cuda_local_rank(fake_gpus):
    fake_gpus(4)
    assert runtime.resolve_device("auto", local_rank=0, world_size=1) == torch.device("cuda", 0)
    assert runtime.resolve_device("auto", local_rank=3, world_size=8) == torch.device("cuda", 3)
    assert runtime.resolve_device("cuda", local_rank=2, world_size=8) == torch.device("cuda", 2)
    assert runtime.resolve_device("cuda:1", local_rank=0, world_size=1) == torch.device("cuda", 1)
    assert runtime.resolve_device("cpu", local_rank=3, world_size=8) == torch.device("cpu")


def test_device_reads_local_rank_from_the_environment(fake_gpus, monkeypatch):
    fake_gpus(2)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")  # second node, second GPU
    assert runtime.resolve_device("auto") == torch.device("cuda", 1)


def test_cuda_device_errors(fake_gpus):
    fake_gpus(2)
    with pytest.raises(ConfigError, match=r"device 'cuda:1' names one GPU but 2 processes"):
        runtime.resolve_device("cuda:1", local_rank=0, world_size=2)
    with pytest.raises(ConfigError, match=r"device 'cuda:5': only 2 CUDA device\(s\) visible"):
        runtime.resolve_device("cuda:5", local_rank=0, world_size=1)
    with pytest.raises(ConfigError, match="LOCAL_RANK 2 has no GPU"):
        runtime.resolve_device("auto", local_rank=2, world_size=3)


# ---- dtype -----------------------------------------------------------------------------------


@pytest.mark.parametrize("flags,expected", [({"avx512f", "avx512_bf16"}, torch.bfloat16),
                                            ({"amx_bf16", "amx_tile"}, torch.bfloat16),
                                            ({"avx2", "avx512f"}, torch.float32)])
def test_cpu_dtype_follows_cpu_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: flags)
    assert runtime.resolve_dtype("auto", "cpu") is expected


@pytest.mark.parametrize("cap,expected", [((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16),
                                          ((7, 5), torch.float32)])
def test_gpu_dtype_follows_compute_capability(fake_gpus, monkeypatch, cap, expected):
    fake_gpus(1, cap)
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: {"avx2"})  # the CPU has no say for a GPU model
    assert runtime.resolve_dtype("auto", torch.device("cuda", 0)) is expected


def test_cpu_model_on_a_gpu_machine_gets_the_cpu_dtype(fake_gpus, monkeypatch):
    # The old rule: "bf16 because a GPU exists", even for a model that runs on this CPU.
    fake_gpus(1, (9, 0))
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: {"avx2"})
    assert runtime.resolve_dtype("auto", "cpu") is torch.float32


def test_explicit_dtypes_and_errors():
    assert runtime.resolve_dtype("bf16", "cpu") is torch.bfloat16
    assert runtime.resolve_dtype("float32") is torch.float32
    assert runtime.resolve_dtype("fp16") is torch.float16
    assert runtime.resolve_dtype(torch.float64) is torch.float64
    with pytest.raises(ConfigError, match="dtype 'int8' is not one of"):
        runtime.resolve_dtype("int8")
    assert runtime.dtype_name(torch.bfloat16) == "bf16"


def test_setup_refuses_fp16_compute(no_launch_env):
    with pytest.raises(ConfigError, match="dtype 'fp16'.*loss scaling"):
        runtime.setup(device="cpu", dtype="fp16")


# ---- rank environment ------------------------------------------------------------------------


def test_env_ranks():
    assert runtime.env_ranks({}) == (0, 1, 0)
    assert runtime.env_ranks({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == (5, 8, 1)
    bad = [({"WORLD_SIZE": "2"}, "RANK is not set"),
           ({"WORLD_SIZE": "2", "RANK": "1"}, "LOCAL_RANK is not set"),
           ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
           ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"}, "RANK=2 must be < WORLD_SIZE=2"),
           ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be >= 1"),
           ({"WORLD_SIZE": "2", "RANK": "-1", "LOCAL_RANK": "0"}, "RANK=-1 must be >= 0")]
    for env, message in bad:
        with pytest.raises(ConfigError, match=message):
            runtime.env_ranks(env)


def test_setup_without_torchrun_rendezvous_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ConfigError, match="MASTER_ADDR is not set; launch the processes with torchrun"):
        runtime.setup(device="cpu")


# ---- shards ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n,world,unit", [(10, 3, 1), (7, 8, 1), (0, 2, 1), (12, 5, 2), (32 * 8, 8, 8), (24, 4, 3)])
def test_shards_cover_the_items_in_order(n, world, unit):
    ranges = [runtime.shard_range(n, r, world, unit) for r in range(world)]
    assert [i for r in ranges for i in r] == list(range(n))  # union, in rank order = 1-process order
    sizes = [len(r) for r in ranges]
    assert all(s % unit == 0 for s in sizes)  # whole units only
    assert max(sizes) - min(sizes) <= unit  # balanced to one unit


def test_shard_errors():
    with pytest.raises(ConfigError, match="cannot shard 10 items into whole units of 4"):
        runtime.shard_range(10, 0, 2, unit=4)
    with pytest.raises(ConfigError, match="rank 2 is not in"):
        runtime.shard_range(10, 2, 2)
    with pytest.raises(ConfigError, match="unit must be >= 1"):
        runtime.shard_range(10, 0, 2, unit=0)


def test_rank_seeds():
    assert runtime.rank_seed(7, 0) == 7  # a single process draws what it drew before ranks existed
    seeds = {runtime.rank_seed(s, r) for s in range(20) for r in range(1, 9)}
    assert len(seeds) == 20 * 8 and not seeds & set(range(100))
    assert all(0 <= s < 2**63 for s in seeds)


# ---- the single-process path -----------------------------------------------------------------


def test_single_process_runtime_is_a_no_op(no_launch_env):
    with runtime.setup(device="cpu", dtype="fp32") as rt:
        assert (rt.rank, rt.world_size, rt.local_rank, rt.backend, rt.distributed) == (0, 1, 0, None, False)
        assert rt.is_main and rt.device == torch.device("cpu") and rt.dtype is torch.float32
        assert not torch.distributed.is_initialized()  # no process group was opened
        t = torch.tensor([1.0, 2.0])
        assert rt.all_reduce(t, "mean") is t and t.tolist() == [1.0, 2.0]
        assert rt.all_reduce_float(2.5) == 2.5
        assert rt.reduce_metrics({"a": 1}, weight=3) == {"a": 1.0}
        assert rt.all_gather_object({"x": 1}) == [{"x": 1}]
        assert rt.broadcast_object("s") == "s"
        items = list(range(9))
        assert rt.shard(items) == items and rt.gather_shards(rt.shard(items)) == items
        model = torch.nn.Linear(3, 2)
        model(torch.ones(1, 3)).sum().backward()
        before = model.weight.grad.clone()
        rt.sync_gradients(model, op="sum")
        assert torch.equal(model.weight.grad, before)
        rt.barrier()
        assert rt.main_only(lambda: 42) == 42
        with rt.main_first():
            pass
        with pytest.raises(ConfigError, match="op must be 'sum' or 'mean'"):
            rt.sync_gradients(model, op="avg")
        with pytest.raises(ConfigError, match="reduce op 'avg'"):
            rt.all_reduce(t, "avg")
        with pytest.raises(ConfigError, match="'mean' needs a floating-point tensor"):
            rt.all_reduce(torch.tensor([1]), "mean")
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rt.print("hello")
        assert buf.getvalue() == "hello\n"
        assert rt.describe() == {"device": "cpu", "dtype": "fp32", "rank": 0, "world_size": 1, "local_rank": 0,
                                 "backend": None}


def test_autocast_and_generator_follow_the_runtime(no_launch_env):
    a = torch.randn(4, 4)
    with runtime.setup(device="cpu", dtype="bf16") as rt:
        with rt.autocast():
            assert (a @ a).dtype is torch.bfloat16
        g = rt.generator(3)
        assert g.device == torch.device("cpu")
        assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=torch.Generator().manual_seed(3)))
    with runtime.setup(device="cpu", dtype="fp32") as rt:
        with rt.autocast():
            assert (a @ a).dtype is torch.float32


# ---- two processes (gloo) --------------------------------------------------------------------


def _child_env() -> dict:
    # Children import the same spa_rl as this test process (a worktree or an installed copy).
    env = dict(os.environ)
    src = str(Path(runtime.__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for var in TORCHRUN_ENV:
        env.pop(var, None)
    return env


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run `_worker` on 2 ranks under torchrun (gloo on the CPU); return each rank's record."""
    out = tmp_path_factory.mktemp("ranks")
    env = _child_env()
    env["SPA_RL_TEST_OUT"] = str(out)
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(Path(__file__).resolve())]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    seconds = time.perf_counter() - t0
    assert res.returncode == 0, f"torchrun failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r in range(2):
        records[r]["_closed"] = json.loads((out / f"rank{r}-closed.json").read_text())
    records[0]["_stdout"] = res.stdout
    records[0]["_seconds"] = seconds
    return records


def test_two_ranks_see_their_place(two_ranks):
    for r, rec in enumerate(two_ranks):
        assert rec["describe"] == {"device": "cpu", "dtype": "fp32", "rank": r, "world_size": 2, "local_rank": r,
                                   "backend": "gloo"}
        assert rec["distributed"] is True


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc to list threads")
def test_close_frees_the_process_group(two_ranks):
    # the models' imports (transformers -> torch._dynamo) ran after setup in the worker
    for rec in two_ranks:
        assert rec["_closed"]["initialized"] is False
        assert not [t for t in rec["_closed"]["threads"] if "gloo" in t], rec["_closed"]["threads"]


def test_all_reduce(two_ranks):
    for rec in two_ranks:  # rank r contributes [r + 1, 10 (r + 1)]
        assert rec["sum"] == [3.0, 30.0]
        assert rec["mean"] == [1.5, 15.0]
        assert rec["max"] == [2.0, 20.0]
        assert rec["min"] == [1.0, 10.0]
        assert rec["int_sum"] == [1, 3]
        assert rec["float_sum"] == 2.0  # 0.5 + 1.5
        # rank 0: {a: 1, b: 2} weight 1; rank 1: {a: 3} weight 3 -> a = (1 + 9) / 4, b from rank 0 only
        assert rec["metrics"] == {"a": 2.5, "b": 2.0}


def test_all_gather_broadcast_and_shards(two_ranks):
    for r, rec in enumerate(two_ranks):
        assert rec["gathered"] == [{"rank": 0, "tag": "r0"}, {"rank": 1, "tag": "r1"}]
        assert rec["broadcast"] == "from rank 0"
        assert rec["my_shard"] == list(range(11))[[slice(0, 5), slice(5, 11)][r]]
        assert rec["rejoined"] == list(range(11))
        assert rec["rejoined_groups"] == list(range(24))
        assert rec["group_shard_starts_whole"] is True


def test_rank_zero_prints_and_writes_first(two_ranks):
    assert two_ranks[0]["printed"] == "only rank 0\n"
    assert two_ranks[1]["printed"] == ""
    assert all(rec["saved_file_seen"] for rec in two_ranks)  # main_only's barrier: rank 1 sees the file
    assert two_ranks[1]["main_only_result"] is None and two_ranks[0]["main_only_result"] == "written"
    assert all(rec["main_first_order"] == ["rank0", "rank1"] for rec in two_ranks)
    assert two_ranks[0]["bar_disabled"] is False and two_ranks[1]["bar_disabled"] is True


def test_generators_differ_across_ranks(two_ranks):
    assert two_ranks[0]["draw"] != two_ranks[1]["draw"]
    assert two_ranks[0]["draw_shared"] == two_ranks[1]["draw_shared"]  # per_rank=False: one stream


def test_sharded_sft_gradient_equals_the_one_process_gradient(two_ranks):
    # Tiny Llama, 4 rows of different lengths: each rank runs 2 rows with the loss divided by the
    # global trained-token count; sync_gradients(op="sum") must give the full-batch gradient.
    for rec in two_ranks:
        assert rec["grad_max_abs_err"] < 1e-6 * max(1.0, rec["grad_max_abs"]), rec
        assert rec["grad_max_abs"] > 0
        assert rec["local_grad_differs"] is True  # the check is not vacuous: a shard's own gradient is not the answer
        assert rec["mean_grad_max_abs_err"] < 1e-6 * max(1.0, rec["grad_max_abs"])


def test_weights_stay_in_sync_and_close_to_one_process(two_ranks):
    for rec in two_ranks:
        assert rec["in_sync_after_step"] is True
        # The gradients differ from the one-process ones by float rounding only (a sum of two
        # shard sums instead of one sum); Adam divides by sqrt(v) + eps, which magnifies that
        # rounding in near-zero gradient entries by up to lr / eps on the first step.
        assert rec["final_grad_err"] < 1e-6 * max(1.0, rec["grad_max_abs"])
        bound = 2 * rec["lr"] * rec["final_grad_err"] / rec["eps"] + 1e-9
        assert rec["weight_max_abs_diff_vs_one_process"] <= bound, rec
        assert rec["weight_max_abs_diff_vs_one_process"] < 0.01 * rec["weights_moved"]
        assert rec["weights_moved"] > 0
        assert rec["desync_detected"] is True  # assert_in_sync catches a rank that drifted
    assert two_ranks[0]["checksum"] == two_ranks[1]["checksum"]  # bitwise-identical weights on both ranks


def test_gradients_present_on_some_ranks_only(two_ranks):
    for rec in two_ranks:
        assert rec["partial_grad"] == [2.0, 2.0]  # rank 0's gradient, zeros from rank 1
        assert rec["unused_grad_is_none"] is True  # no gradient anywhere: stays None, the optimizer skips it


def test_broadcast_parameters(two_ranks):
    for rec in two_ranks:
        assert rec["broadcast_weight"] == two_ranks[0]["broadcast_weight"]
        assert rec["broadcast_differed_before"] is True


def test_two_process_tests_are_fast(two_ranks):
    assert two_ranks[0]["_seconds"] < 60  # ~10 s on 2 shared cores; a hang would hit the 120 s timeout


# ---- the GPU check script, on the CPU ---------------------------------------------------------


def test_gpu_check_runs_on_the_cpu(tmp_path):
    # benchmarks/gpu_check.py runs once on a lent GPU machine with little time: its code paths are
    # exercised here first (--device cpu --small), so a GPU run does not die on a typo.
    script = Path(runtime.__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
    env = _child_env()
    env["OMP_NUM_THREADS"] = "2"
    res = subprocess.run([sys.executable, str(script), str(tmp_path), "--device", "cpu", "--small"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    checks = report["checks"]
    expected = ["environment", "runtime", "load_tiny", "hf_default_generator", "hf_generate_tiny", "generate_135m",
                "sft_step_135m", "process_group"]
    assert list(checks) == expected
    failed = {k: v.get("error") for k, v in checks.items() if v["status"] != "ok"}
    assert not failed, failed
    assert checks["runtime"]["setup"]["device"] == "cpu"
    assert "is not one of" in checks["runtime"]["resolve_device"]["gpu"]
    assert checks["load_tiny"]["parameter_devices"] == ["cpu"]
    assert checks["hf_generate_tiny"]["same_seed_same_tokens"] is True
    assert checks["hf_generate_tiny"]["tokens_per_s"] > 0
    assert all(v > 0 for v in checks["generate_135m"]["tokens_per_s_by_batch"].values())
    assert checks["sft_step_135m"]["loss_finite"] and checks["sft_step_135m"]["master_weight_dtype"] == "torch.float32"
    pg = checks["process_group"]
    assert pg["backend"] == "gloo" and pg["closed"] is True and pg["all_reduce_sum_on_device"] == [0.0, 1.0, 2.0, 3.0]
    lines = (tmp_path / "gpu_check.txt").read_text().splitlines()
    assert len(lines) == 1 + len(expected) and all(" ok " in line for line in lines[1:])


# ---- the worker (run by torchrun on each rank) -----------------------------------------------


def _worker() -> None:
    torch.set_num_threads(1)
    out = Path(os.environ["SPA_RL_TEST_OUT"])
    rt = runtime.setup(device="cpu", dtype="fp32")
    r = rt.rank
    rec: dict = {"describe": rt.describe(), "distributed": rt.distributed}

    base = torch.tensor([r + 1.0, 10.0 * (r + 1)])
    for op in ("sum", "mean", "max", "min"):
        rec[op] = rt.all_reduce(base.clone(), op).tolist()
    rec["int_sum"] = rt.all_reduce(torch.tensor([r, r + 1]), "sum").tolist()
    rec["float_sum"] = rt.all_reduce_float(r + 0.5)
    rec["metrics"] = rt.reduce_metrics({"a": 1.0, "b": 2.0} if r == 0 else {"a": 3.0}, weight=1.0 if r == 0 else 3.0)
    rec["gathered"] = rt.all_gather_object({"rank": r, "tag": f"r{r}"})
    rec["broadcast"] = rt.broadcast_object("from rank 0" if r == 0 else "not this")
    items = list(range(11))
    rec["my_shard"] = rt.shard(items)
    rec["rejoined"] = rt.gather_shards(rec["my_shard"])
    groups = rt.shard(list(range(24)), unit=8)  # 3 groups of 8 over 2 ranks: 1 and 2 groups
    rec["group_shard_starts_whole"] = groups[0] % 8 == 0 and len(groups) % 8 == 0
    rec["rejoined_groups"] = rt.gather_shards(groups)

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rt.print("only rank 0")
    rec["printed"] = buf.getvalue()
    bar = rt.progress(total=3)
    rec["bar_disabled"] = bool(bar.disable)
    bar.close()
    target = out / "written.txt"

    def write():
        time.sleep(0.3)  # rank 1 would race ahead without the barrier
        target.write_text("ok")
        return "written"

    rec["main_only_result"] = rt.main_only(write)
    rec["saved_file_seen"] = target.read_text() == "ok"
    order_file = out / "order.txt"
    with rt.main_first():
        if r == 0:
            time.sleep(0.3)
        with open(order_file, "a") as fh:
            fh.write(f"rank{r}\n")
    rt.barrier()
    rec["main_first_order"] = order_file.read_text().split()

    rec["draw"] = torch.rand(2, generator=rt.generator(0)).tolist()
    rec["draw_shared"] = torch.rand(2, generator=rt.generator(0, per_rank=False)).tolist()

    _gradient_checks(rt, rec)
    _partial_gradient_checks(rt, rec)

    lin = torch.nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.fill_(float(r + 1))
    before = rt.all_gather_object(lin.weight.tolist())
    rt.broadcast_parameters(lin)
    rec["broadcast_differed_before"] = before[0] != before[1]
    rec["broadcast_weight"] = lin.weight.tolist()

    (out / f"rank{r}.json").write_text(json.dumps(rec))
    rt.close()
    # close must free gloo's worker threads: threads that outlive it abort the interpreter at
    # exit now and then (the process-group reference torch._dynamo takes; see runtime.setup)
    threads = [Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task")]
    (out / f"rank{r}-closed.json").write_text(json.dumps({"threads": threads, "initialized": dist_initialized()}))


def dist_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_initialized()


def _gradient_checks(rt, rec) -> None:
    from spa_rl.models import build_byte_tokenizer, build_tiny_model
    from spa_rl.training import masked_nll_sum, pad_batch

    tok = build_byte_tokenizer()
    model = build_tiny_model(tok, seed=0)  # same seed, same weights on both ranks
    model.train()
    gen = torch.Generator().manual_seed(1)
    lengths = [9, 17, 12, 20]
    rows = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in lengths]
    masks = [[0] * 3 + [1] * (n - 3) for n in lengths]
    n_global = sum(sum(m[1:]) for m in masks)
    params = [p for p in model.parameters() if p.requires_grad]

    def backward(idx, denominator):
        ids, attn, mask = pad_batch([rows[i] for i in idx], [masks[i] for i in idx], tok.pad_token_id)
        nll, _ = masked_nll_sum(model, ids, attn, mask)
        (nll / denominator).backward()

    # the one-process reference: the whole global batch in one process
    backward(range(4), n_global)
    reference = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    mine = rt.shard_range(4)
    backward(mine, n_global)
    local = [p.grad.clone() for p in params]
    rt.sync_gradients(model, op="sum")
    rec["grad_max_abs"] = max(float(g.abs().max()) for g in reference)
    rec["grad_max_abs_err"] = max(float((p.grad - g).abs().max()) for p, g in zip(params, reference))
    rec["local_grad_differs"] = max(float((a - b).abs().max()) for a, b in zip(local, reference)) > 1e-4

    # op="mean": each rank's loss is a mean over its own rows (equal shard sizes of 2 rows each)
    model.zero_grad(set_to_none=True)
    backward(range(4), 4.0)  # reference: sum of per-row nll sums / 4 rows
    reference_mean = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    backward(mine, float(len(mine)))
    rt.sync_gradients(model, op="mean")
    rec["mean_grad_max_abs_err"] = max(float((p.grad - g).abs().max()) for p, g in zip(params, reference_mean))

    # one AdamW step from the synced gradient vs from the reference gradient (a one-process run)
    model.zero_grad(set_to_none=True)
    backward(mine, n_global)
    rt.sync_gradients(model, op="sum")
    rec["final_grad_err"] = max(float((p.grad - g).abs().max()) for p, g in zip(params, reference))
    start = [p.detach().clone() for p in params]
    single = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for s, g in zip(single, reference):
        s.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    torch.nn.utils.clip_grad_norm_(single, 1.0)
    rec["lr"], rec["eps"] = 1e-3, 1e-8
    torch.optim.AdamW(params, lr=rec["lr"], eps=rec["eps"]).step()
    torch.optim.AdamW(single, lr=rec["lr"], eps=rec["eps"]).step()
    rt.assert_in_sync(model)
    rec["in_sync_after_step"] = True
    rec["checksum"] = rt.parameters_checksum(model)
    rec["weight_max_abs_diff_vs_one_process"] = max(float((p.detach() - s.detach()).abs().max()) for p, s in zip(params, single))
    rec["weights_moved"] = max(float((p.detach() - s0).abs().max()) for p, s0 in zip(params, start))
    with torch.no_grad():
        if rt.rank == 1:
            params[0][0, 0] += 1e-3
    try:
        rt.assert_in_sync(model, "tiny")
        rec["desync_detected"] = False
    except RuntimeError as e:
        rec["desync_detected"] = "rank(s) [1]" in str(e)


def _partial_gradient_checks(rt, rec) -> None:
    used = torch.nn.Parameter(torch.zeros(2))
    unused = torch.nn.Parameter(torch.zeros(2))
    if rt.rank == 0:  # e.g. a rank whose shard held the only episode that reaches this branch
        (used * 2.0).sum().backward()
    rt.sync_gradients([used, unused], op="sum")
    rec["partial_grad"] = used.grad.tolist()
    rec["unused_grad_is_none"] = unused.grad is None


if __name__ == "__main__":
    _worker()
