"""`spa train --sampling.backend vllm`: the recipe builds one vLLM engine, samples through it,
sends it to sleep before each update and pushes the trained weights into it after.

vLLM cannot be installed on these machines (no CUDA), so `vllm` is a fake module here. Unlike
the call-recording fake of tests/rollout/test_vllm_backend.py, this one generates for real: its
`LLM` loads the model folder it is given and samples with the HF forward, and its worker's
`load_weights` copies the pushed tensors into that model. So the test can check what matters to
the trainer: the engine samples with the weights of the latest update (not the initial ones),
and the log-probs it returns are the ones the training forward recomputes."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

from spa_rl.config import load_config
from spa_rl.errors import ConfigError
from spa_rl.recipes import train
from spa_rl.rollout.backend import HFBackend, SamplingParams

ENGINES: list = []


class _Logprob:
    def __init__(self, logprob):
        self.logprob = logprob


class _SamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class HFBackedLLM:
    """`vllm.LLM` stand-in that really generates, with the HF forward of the model it loads."""

    def __init__(self, **kwargs):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.kwargs = kwargs
        self.events: list = [("init",)]
        self.model = AutoModelForCausalLM.from_pretrained(kwargs["model"], dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(kwargs["model"])
        worker_model = types.SimpleNamespace(load_weights=self._load_weights)
        self.worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(model=worker_model))
        ENGINES.append(self)

    def _load_weights(self, weights):
        self.events.append(("load_weights", len(weights)))
        with torch.no_grad():
            self.model.load_state_dict({name: t.float() for name, t in weights})

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.events.append(("generate", len(prompts)))
        kw = sampling_params[0].kwargs
        params = SamplingParams(max_new_tokens=kw["max_tokens"], temperature=kw["temperature"], top_p=kw["top_p"],
                                top_k=max(0, kw["top_k"]), stop_strings=tuple(kw["stop"] or ()))
        gens = HFBackend(self.model, self.tokenizer, seed=kw["seed"], engine="hf").generate(
            [p["prompt_token_ids"] for p in prompts], params)
        outs = []
        for i, g in enumerate(gens):
            steps = [{t: _Logprob(lp)} for t, lp in zip(g.token_ids, g.logprobs)]
            finish = "length" if g.finish_reason == "length" else "stop"
            stop_reason = params.stop_strings[0] if g.finish_reason == "stop" else None
            completion = types.SimpleNamespace(token_ids=g.token_ids, logprobs=steps, finish_reason=finish,
                                               stop_reason=stop_reason)
            outs.append(types.SimpleNamespace(request_id=str(i), outputs=[completion]))
        return outs

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        return [method(self.worker, *args, **(kwargs or {}))]

    def sleep(self, level=1):
        self.events.append(("sleep", level))

    def wake_up(self, tags=None):
        self.events.append(("wake_up", tags))

    def reset_prefix_cache(self):
        self.events.append(("reset_prefix_cache",))


@pytest.fixture
def fake_vllm(install_fake_vllm):
    ENGINES.clear()
    install_fake_vllm(HFBackedLLM, _SamplingParams)
    return ENGINES


SMALL = {"env": "frozenlake", "model": "tiny", "algo": "grpo", "groups": 2, "group_size": 2, "keep_ratio": 1.0,
         "sampling": {"max_new_tokens": 12, "backend": "vllm"}, "episode": {"max_turns": 2},
         "eval": {"levels": 2, "samples": 2}, "optim": {"lr": 1e-3}, "model.dtype": "fp32"}


def test_train_samples_through_vllm_with_the_updated_weights(fake_vllm, tmp_path):
    cfg = load_config(train.Config, {**SMALL, "steps": 2, "eval_every": 1, "save_every": 1, "out": str(tmp_path / "r")})
    assert train.main(cfg) == 0
    assert len(fake_vllm) == 1, "one engine for the whole run"
    llm = fake_vllm[0]
    assert llm.kwargs["enable_sleep_mode"] and llm.kwargs["enable_prefix_caching"]
    kinds = [e[0] for e in llm.events]
    # built, given the actor's weights, then per step: sample, sleep through the update, load
    # the new weights (waking up) and drop the prefix cache; validation samples in between
    assert kinds.count("load_weights") == 1 + 2
    assert kinds.count("sleep") == 2
    first_load = kinds.index("load_weights")
    assert first_load < kinds.index("generate")
    for i, kind in enumerate(kinds):
        if kind == "sleep":
            assert kinds[i + 1:i + 4] == ["wake_up", "load_weights", "wake_up"]
            assert kinds[i + 4] == "reset_prefix_cache"
    # the engine ends with exactly the weights the run saved
    saved = load_file(str(tmp_path / "r" / "final" / "model.safetensors"))
    engine = llm.model.state_dict()
    assert max((engine[k] - saved[k]).abs().max().item() for k in saved) == 0.0
    start = load_file(str(tmp_path / "r" / "checkpoint-step-1" / "model.safetensors"))
    assert max((start[k] - saved[k]).abs().max().item() for k in saved) > 0  # and they did change
    # what vLLM returned is what the trainer recomputes (both fp32 here)
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    gaps = [r["rollout/logprob_gap"] for r in rows if "rollout/logprob_gap" in r]
    assert len(gaps) == 2 and max(gaps) < 1e-4
    assert [r["step"] for r in rows if "val/pass@1" in r] == [0, 1, 2]


def test_without_vllm_the_run_stops_with_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    cfg = load_config(train.Config, {**SMALL, "steps": 1, "eval_every": 0, "out": str(tmp_path / "r")})
    with pytest.raises(ConfigError) as e:
        train.main(cfg)
    assert "pip install 'spa-rl[vllm]'" in str(e.value) and "\n" not in str(e.value)


def test_backend_choice_is_validated():
    with pytest.raises(ConfigError, match="backend"):
        load_config(train.Config, {**SMALL, "sampling": {"backend": "tensorrt"}})
