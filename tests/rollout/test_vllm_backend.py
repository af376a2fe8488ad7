"""The vLLM backend against a fake `vllm` module that records every call (vLLM itself is not
installable here). What these tests check: the token ids and sampling settings sent to vLLM,
how vLLM's outputs become Generations, the log-prob mode checks, and the order of the weight
update and sleep/wake calls. What they cannot check: that a real vLLM accepts these calls and
returns matching log-probs (docs/scaling.md, "not measured yet")."""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch

from spa_rl.errors import ConfigError
from spa_rl.models import build_byte_tokenizer, build_tiny_model, tiny_model_dir
from spa_rl.rollout.backend import Generation, SamplingParams

EOS = 258  # the byte tokenizer's <|im_end|>


# ---- the fake vllm ---------------------------------------------------------------------------


class FakeLogprob:
    def __init__(self, logprob):
        self.logprob = logprob


class FakeCompletion:
    def __init__(self, token_ids, logprobs, finish_reason, stop_reason=None):
        self.token_ids, self.logprobs = token_ids, logprobs
        self.finish_reason, self.stop_reason = finish_reason, stop_reason


class FakeRequestOutput:
    def __init__(self, request_id, completion):
        self.request_id, self.outputs = request_id, [completion]


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class FakeWorkerModel:
    def __init__(self, events):
        self.events, self.loaded = events, []

    def load_weights(self, weights):
        self.loaded.append(list(weights))
        self.events.append(("load_weights", len(weights)))


class FakeLLM:
    """Records calls in `events`; `respond(prompt_ids, kwargs)` scripts each request's output as
    (token_ids, logprob values, finish_reason, stop_reason)."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.events: list = [("init",)]
        self.generate_calls: list = []
        self.respond = lambda ids, kw: ([7, 8, EOS], [-0.1, -0.2, -0.3], "stop", None)
        runner = types.SimpleNamespace(model=FakeWorkerModel(self.events))
        self.worker = types.SimpleNamespace(model_runner=runner)
        FAKE.instances.append(self)

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.events.append(("generate", len(prompts)))
        self.generate_calls.append((prompts, sampling_params, use_tqdm))
        outs = []
        for i, (prompt, sp) in enumerate(zip(prompts, sampling_params)):
            ids, lps, finish, stop_reason = self.respond(prompt["prompt_token_ids"], sp.kwargs)
            # each step's dict holds the sampled token and, first, a decoy: a higher-ranked token
            steps = [{(t + 1) % 259: FakeLogprob(-0.01), t: FakeLogprob(lp)} for t, lp in zip(ids, lps)]
            outs.append(FakeRequestOutput(str(i), FakeCompletion(list(ids), steps, finish, stop_reason)))
        return outs

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.events.append(("collective_rpc", getattr(method, "__name__", method)))
        return [method(self.worker, *args, **(kwargs or {}))]

    def sleep(self, level=1):
        self.events.append(("sleep", level))

    def wake_up(self, tags=None):
        self.events.append(("wake_up", tags))

    def reset_prefix_cache(self):
        self.events.append(("reset_prefix_cache",))


FAKE = types.SimpleNamespace(instances=[])


@pytest.fixture
def fake_vllm(install_fake_vllm):
    FAKE.instances.clear()
    install_fake_vllm(FakeLLM, FakeSamplingParams)
    return FAKE


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def make_backend(tok, tmp_path, **kw):
    from spa_rl.rollout.vllm_backend import VLLMBackend

    kw.setdefault("dtype", "bf16")
    return VLLMBackend("tiny", tok, cache_dir=tmp_path, **kw)


# ---- construction ----------------------------------------------------------------------------


def test_without_vllm_the_error_names_the_install_command(monkeypatch, tok, tmp_path):
    from spa_rl.rollout.vllm_backend import VLLMBackend

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(ConfigError) as e:
        VLLMBackend("tiny", tok, dtype="bf16", cache_dir=tmp_path)
    msg = str(e.value)
    assert "pip install 'spa-rl[vllm]'" in msg and "\n" not in msg


def test_importing_the_module_does_not_import_vllm():
    import importlib

    sys.modules.pop("vllm", None)
    importlib.reload(importlib.import_module("spa_rl.rollout.vllm_backend"))
    assert "vllm" not in sys.modules


def test_engine_arguments(fake_vllm, tok, tmp_path):
    backend = make_backend(tok, tmp_path, seed=3, gpu_memory_utilization=0.3, max_model_len=4096,
                           llm_kwargs={"enforce_eager": True})
    (llm,) = fake_vllm.instances
    assert llm.kwargs == {
        "model": str(tiny_model_dir(tmp_path)),  # "tiny" resolved to its converted folder
        "dtype": "bfloat16", "seed": 3, "tensor_parallel_size": 1,
        "distributed_executor_backend": "external_launcher",  # in this process: weights by reference
        "enable_prefix_caching": True, "enable_sleep_mode": True, "gpu_memory_utilization": 0.3,
        "logprobs_mode": "processed_logprobs", "generation_config": "vllm", "max_model_len": 4096,
        "enforce_eager": True,
    }
    assert backend.eos_token_ids == (EOS,)
    # a single process gets the variables torchrun would set for one rank
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("0", "1", "0")
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and int(os.environ["MASTER_PORT"]) > 0


def test_engine_seed_differs_per_rank_and_dtype_is_resolved(fake_vllm, tok, tmp_path):
    make_backend(tok, tmp_path, seed=3, rank=1, dtype="fp32")
    llm = fake_vllm.instances[-1]
    assert llm.kwargs["seed"] != 3 and llm.kwargs["dtype"] == "float32"


@pytest.mark.parametrize("kw,message", [({"logprobs_mode": "raw_logits"}, "logprobs_mode 'raw_logits' is not one of"),
                                        ({"gpu_memory_utilization": 0.0}, "gpu_memory_utilization must be in"),
                                        ({"dtype": "int4"}, "dtype 'int4' is not one of")])
def test_bad_arguments(fake_vllm, tok, tmp_path, kw, message):
    with pytest.raises(ConfigError, match=message):
        make_backend(tok, tmp_path, **kw)


# ---- generation ------------------------------------------------------------------------------


def test_prompts_are_token_ids_and_sampling_params_map(fake_vllm, tok, tmp_path):
    backend = make_backend(tok, tmp_path, seed=5, eos_token_ids=(256,))
    params = SamplingParams(max_new_tokens=7, temperature=0.7, top_p=1.0, top_k=0, stop_strings=("</answer>",))
    prompts = [[1, 2, 3], (4, 5)]
    backend.generate(prompts, params)
    (llm,) = fake_vllm.instances
    sent, sps, use_tqdm = llm.generate_calls[0]
    assert sent == [{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": [4, 5]}]  # ids, never text
    assert all(type(t) is int for p in sent for t in p["prompt_token_ids"])
    assert use_tqdm is False
    for sp in sps:
        kw = dict(sp.kwargs)
        kw.pop("seed")
        assert kw == {"temperature": 0.7, "top_p": 1.0, "top_k": -1, "max_tokens": 7, "stop": ["</answer>"],
                      "stop_token_ids": [256, EOS], "include_stop_str_in_output": True, "logprobs": 0,
                      "skip_special_tokens": False}
    seeds_1 = [sp.kwargs["seed"] for sp in sps]
    assert len(set(seeds_1)) == 2  # one seed per request: its draws do not depend on the batch
    backend.generate(prompts, SamplingParams(max_new_tokens=3, top_k=4, temperature=0.0, stop_strings=()))
    sps2 = llm.generate_calls[1][1]
    assert sps2[0].kwargs["top_k"] == 4 and sps2[0].kwargs["stop"] is None and sps2[0].kwargs["temperature"] == 0.0
    assert not {sp.kwargs["seed"] for sp in sps2} & set(seeds_1)  # a new call draws new numbers
    again = make_backend(tok, tmp_path, seed=5, eos_token_ids=(256,))
    again.generate(prompts, params)
    assert [sp.kwargs["seed"] for sp in fake_vllm.instances[-1].generate_calls[0][1]] == seeds_1  # reproducible
    other_rank = make_backend(tok, tmp_path, seed=5, eos_token_ids=(256,), rank=1)
    other_rank.generate(prompts, params)
    assert not {sp.kwargs["seed"] for sp in fake_vllm.instances[-1].generate_calls[0][1]} & set(seeds_1)


def test_outputs_map_to_generations(fake_vllm, tok, tmp_path):
    backend = make_backend(tok, tmp_path)
    script = {
        1: ([10, 11, EOS], [-1.0, -2.0, -3.0], "stop", None),       # the model's eos
        2: ([12, 60, 62], [-0.5, -0.25, -0.125], "stop", "</answer>"),  # a stop string
        3: ([13, 14], [-4.0, -5.0], "length", None),                # the token cap
        4: ([15, EOS], [-0.75, -1.5], "stop", EOS),                  # eos as a stop token id
        5: ([16, 17], [-0.5, -0.5], "stop", None),                   # says stop, last id is no eos
    }
    fake_vllm.instances[0].respond = lambda ids, kw: script[ids[0]]
    gens = backend.generate([[1], [2], [3], [4], [5]], SamplingParams(max_new_tokens=3))
    assert gens == [Generation([10, 11, EOS], [-1.0, -2.0, -3.0], "eos"),
                    Generation([12, 60, 62], [-0.5, -0.25, -0.125], "stop"),
                    Generation([13, 14], [-4.0, -5.0], "length"),
                    Generation([15, EOS], [-0.75, -1.5], "eos"),
                    Generation([16, 17], [-0.5, -0.5], "stop")]
    assert backend.generate([], SamplingParams()) == []


def test_log_prob_count_mismatch_is_an_error(fake_vllm, tok, tmp_path):
    backend = make_backend(tok, tmp_path)
    llm = fake_vllm.instances[0]
    real = llm.generate

    def one_step_short(prompts, sps, use_tqdm=True):
        outs = real(prompts, sps, use_tqdm)
        outs[0].outputs[0].logprobs = outs[0].outputs[0].logprobs[:-1]
        return outs

    llm.generate = one_step_short
    with pytest.raises(RuntimeError, match="2 log-prob entries for 3 tokens"):
        backend.generate([[1]], SamplingParams())


def test_aborted_request_is_an_error(fake_vllm, tok, tmp_path):
    backend = make_backend(tok, tmp_path)
    fake_vllm.instances[0].respond = lambda ids, kw: ([1], [-0.1], "abort", None)
    with pytest.raises(RuntimeError, match="ended with 'abort'"):
        backend.generate([[1]], SamplingParams())


@pytest.mark.parametrize("mode,params,ok", [
    ("processed_logprobs", SamplingParams(temperature=0.7), True),
    ("processed_logprobs", SamplingParams(temperature=1.0, top_p=0.9), False),
    ("processed_logprobs", SamplingParams(temperature=1.0, top_k=20), False),
    ("processed_logprobs", SamplingParams(temperature=0.0, top_k=20), True),  # greedy: no truncation issue
    ("raw_logprobs", SamplingParams(temperature=1.0, top_p=0.9, top_k=20), True),
    ("raw_logprobs", SamplingParams(temperature=0.7), False),
])
def test_logprobs_are_the_trainers_distribution_or_refused(fake_vllm, tok, tmp_path, mode, params, ok):
    backend = make_backend(tok, tmp_path, logprobs_mode=mode)
    if ok:
        assert len(backend.generate([[1]], params)) == 1
    else:
        with pytest.raises(ConfigError) as e:
            backend.generate([[1]], params)
        assert str(e.value).startswith("vLLM backend: ") and "\n" not in str(e.value)
        assert fake_vllm.instances[-1].generate_calls == []  # refused before anything was sampled
        lenient = make_backend(tok, tmp_path, logprobs_mode=mode, strict_logprobs=False)  # e.g. evaluation
        assert len(lenient.generate([[1]], params)) == 1


# ---- weights, sleep and wake -----------------------------------------------------------------


def test_weight_update_call_order_and_tensors(fake_vllm, tok, tmp_path):
    backend = make_backend(tok, tmp_path)
    llm = fake_vllm.instances[0]
    model = build_tiny_model(tok, seed=1)
    state = model.state_dict()
    backend.update_weights(state)
    assert llm.events == [("init",), ("collective_rpc", "_load_weights_into_worker"), ("load_weights", len(state)),
                          ("reset_prefix_cache",)]
    loaded = llm.worker.model_runner.model.loaded[0]
    assert [n for n, _ in loaded] == list(state)  # Hugging Face names, vLLM maps them itself
    # the trainer's tensors by reference (same storage, no copy through the CPU)
    assert all(t.data_ptr() == state[n].data_ptr() and not t.requires_grad for n, t in loaded)
    assert backend.weight_version == 1

    del llm.events[:]
    assert backend.sleep() is True and backend.sleeping
    backend.update_weights(model)  # a module works too
    backend.generate([[1]], SamplingParams())
    assert llm.events == [("sleep", 1), ("wake_up", ["weights"]), ("collective_rpc", "_load_weights_into_worker"),
                          ("load_weights", len(state)), ("wake_up", ["kv_cache"]), ("reset_prefix_cache",),
                          ("generate", 1)]
    assert backend.weight_version == 2 and not backend.sleeping

    del llm.events[:]
    backend.sleep(level=2)
    backend.sleep(level=2)  # already asleep: no second call
    backend.generate([[1]], SamplingParams())  # generating wakes everything first
    assert llm.events == [("sleep", 2), ("wake_up", None), ("generate", 1)]


def test_weight_update_errors_and_sleep_mode_off(fake_vllm, tok, tmp_path):
    backend = make_backend(tok, tmp_path, enable_sleep_mode=False)
    llm = fake_vllm.instances[0]
    assert backend.sleep() is False and llm.events == [("init",)]
    with pytest.raises(ConfigError, match="no tensors"):
        backend.update_weights({})
    with pytest.raises(ConfigError, match="LoRA/peft names.*merge_and_unload"):
        backend.update_weights({"base_model.model.model.embed_tokens.weight": torch.zeros(2)})
    with pytest.raises(ConfigError, match="sleep level must be 1 or 2"):
        backend.sleep(level=3)
    assert llm.events == [("init",)]


# ---- the rollout loop on top of it -----------------------------------------------------------


def test_backend_drives_the_rollout_loop(fake_vllm, tok, tmp_path):
    from spa_rl.agent import EpisodeConfig
    from spa_rl.rollout.engine import make_episodes, run_rollouts
    from spa_rl.tokens import ChatTokenizer

    chat = ChatTokenizer(tok)
    backend = make_backend(tok, tmp_path)
    answer = chat.encode(" go</think><answer>Up</answer>")
    lps = [-0.5 - i / 100 for i in range(len(answer) + 1)]
    fake_vllm.instances[0].respond = lambda ids, kw: (answer + [EOS], lps, "stop", None)
    eps = make_episodes("sokoban", "val", 0, 2, 2, EpisodeConfig(max_turns=2))
    rollouts = run_rollouts(eps, backend, chat, SamplingParams(max_new_tokens=64))
    for r in rollouts:
        assert [t.finish_reason for t in r.turns] == ["eos"] * len(r.turns) and r.turns
        for turn in r.turns:
            assert turn.sampled_ids == answer + [EOS] and turn.logprobs == lps
            seg = slice(turn.prompt_len, turn.prompt_len + len(turn.sampled_ids))
            assert r.sequence.input_ids[seg] == turn.sampled_ids and r.sequence.logprobs[seg] == lps
        assert r.episode.turns[0].response == "<think>" + chat.decode(answer + [EOS])
    # every turn's prompts were the rollouts' own token contexts
    first_call = fake_vllm.instances[0].generate_calls[0][0]
    assert [p["prompt_token_ids"] for p in first_call] == [r.sequence.input_ids[:r.turns[0].prompt_len]
                                                           for r in rollouts]
