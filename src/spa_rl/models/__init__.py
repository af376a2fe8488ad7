"""Model loading: the embedded default (SmolLM2-135M-Instruct from its GGUF package), hub ids,
local folders, and the tiny random Llama with its byte-level ChatML tokenizer."""

from spa_rl.models.loading import (
    default_model_dir,
    ensure_default_model,
    ensure_tiny_model,
    load_model_and_tokenizer,
    model_path,
    models_cache_root,
    resolve_dtype,
    tiny_model_dir,
)
from spa_rl.models.tiny import build_byte_tokenizer, build_tiny_model

__all__ = [
    "build_byte_tokenizer",
    "build_tiny_model",
    "default_model_dir",
    "ensure_default_model",
    "ensure_tiny_model",
    "load_model_and_tokenizer",
    "model_path",
    "models_cache_root",
    "resolve_dtype",
    "tiny_model_dir",
]
