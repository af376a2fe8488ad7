"""spa sft: loss masks token by token (SmolLM2's template and the byte tokenizer), the masking
ablation, learning on a tiny model, accumulation and resume invariants, checkpoints that load
with transformers, and a short run of the real default model (slow)."""

import math
from pathlib import Path

import pytest
import torch

from spa_rl import runtime
from spa_rl.models.tiny import _byte_to_char
from spa_rl.config import load_config
from spa_rl.recipes.generate import Config as GenerateConfig
from spa_rl.recipes.generate import main as generate
from spa_rl.recipes.sft import Config as SFTConfig, evaluate_loss, main, tokenize_rows
from spa_rl.data import load_rows
from spa_rl.errors import CheckpointError, ConfigError
from spa_rl.tokens import WORLD_MODEL_TAGS, ChatTokenizer, content_spans, conversation_to_sequence

BYTE_OF = {ch: b for b, ch in _byte_to_char().items()}  # GPT-2 byte-level alphabet (SmolLM2 and tiny)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Solver games of Sokoban and Sudoku: well-formed rows, boxes on targets ('√', 3 bytes)."""
    root = tmp_path_factory.mktemp("sft_data")
    generate(GenConfig(env="sokoban", policy="solver", episodes=8, group_size=1, out=str(root / "sokoban")))
    generate(GenConfig(env="sudoku", policy="solver", episodes=2, group_size=1, out=str(root / "sudoku")))
    return root


@pytest.fixture(scope="module")
def short_data(dataset):
    """Real generated completions behind a short prompt (the state only): fast tiny-model runs."""
    from spa_rl.data import write_jsonl

    rows = load_rows(dataset / "sokoban", "train") + load_rows(dataset / "sokoban", "validation")
    short = []
    for r in rows:
        state = r["prompt"][-1]["content"].rsplit("State:\n", 1)[1].split("\nYou have")[0]
        prompt = [r["prompt"][0], {"role": "user", "content": "State:\n" + state}]
        short.append({"prompt": prompt, "completion": r["completion"], "messages": prompt + r["completion"]})
    out = dataset / "short"
    write_jsonl(out / "train.jsonl", short[:8])
    write_jsonl(out / "validation.jsonl", short[8:10])
    (out / "README.md").write_text("test data")
    return out


@pytest.fixture(autouse=True)
def _tmp_model_cache_and_threads(monkeypatch, tmp_path_factory, request):
    monkeypatch.setenv("SPA_RL_CACHE", str(tmp_path_factory.getbasetemp() / "spa_cache"))
    # The tiny model's tensors are too small to gain from a second thread, and two OpenMP
    # threads on a busy 2-core machine spin-wait for each other (100x slower ops).
    threads = torch.get_num_threads()
    if request.node.get_closest_marker("slow") is None:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def byte_chat():
    from spa_rl.models.tiny import build_byte_tokenizer

    return ChatTokenizer(build_byte_tokenizer())


@pytest.fixture(scope="module")
def smollm2_chat(default_model_dir):
    from transformers import AutoTokenizer

    return ChatTokenizer(AutoTokenizer.from_pretrained(default_model_dir))


def _token_bytes(tokenizer, ids):
    """Exact bytes of each token (byte-level BPE), independent of the code under test."""
    out = []
    for tok in tokenizer.convert_ids_to_tokens(ids):
        if tok in tokenizer.all_special_tokens:
            out.append(tok.encode())
        else:
            out.append(bytes(BYTE_OF[ch] for ch in tok))
    return out


def _rows(dataset):
    return load_rows(dataset / "sokoban", "train") + load_rows(dataset / "sudoku", "train")


def _check_row_masks(chat, row):
    tok = chat.tokenizer
    messages = row["prompt"] + row["completion"]
    seq = conversation_to_sequence(chat, messages, "last")
    pieces = _token_bytes(tok, seq.input_ids)
    # the sequence is the chat template's rendering of the whole conversation
    full = tok.apply_chat_template(messages, tokenize=False)
    assert b"".join(pieces).decode() == full[:len(b"".join(pieces).decode())]
    # token by token: untrained exactly up to the rollout prompt (header + <think>), trained after
    prompt_text = (chat.render(row["prompt"], add_generation_prompt=True) + "<think>").encode()
    completion = row["completion"][0]["content"]
    assert completion.startswith("<think>")
    boundary = 0
    while len(b"".join(pieces[:boundary])) < len(prompt_text):
        boundary += 1
    assert b"".join(pieces[:boundary]) == prompt_text
    assert seq.loss_mask == [0] * boundary + [1] * (len(pieces) - boundary)
    assert b"".join(pieces[boundary:]) == (completion[len("<think>"):] + tok.eos_token).encode()
    assert seq.input_ids[-1] == tok.eos_token_id

    # the ablation: same ids; exactly the completion tokens touching an observation/prediction
    # content lose their loss (bytes of the completion after <think>)
    masked = conversation_to_sequence(chat, messages, "last", WORLD_MODEL_TAGS)
    assert masked.input_ids == seq.input_ids
    text = completion[len("<think>"):].encode()
    spans = [(len(completion[len("<think>"):][:a].encode()), len(completion[len("<think>"):][:b].encode()))
             for a, b in content_spans(completion[len("<think>"):])]
    assert len(spans) == 2
    pos = 0
    untrained = b""
    for piece, flag in zip(pieces[boundary:-1], masked.loss_mask[boundary:-1]):
        touches = any(pos < b and a < pos + len(piece) for a, b in spans)
        assert flag == (0 if touches else 1)
        untrained += piece if not flag else b""
        pos += len(piece)
    assert pos == len(text)
    assert masked.loss_mask[:boundary] == [0] * boundary and masked.loss_mask[-1] == 1  # end of turn trained
    return untrained, b"".join(text[a:b] for a, b in spans)


def test_masks_token_by_token_byte_tokenizer(byte_chat, dataset):
    rows = _rows(dataset)
    assert any("√" in r["completion"][0]["content"] for r in rows)
    for row in rows:
        untrained, contents = _check_row_masks(byte_chat, row)
        assert untrained == contents  # one token per byte: the masked tokens are exactly the contents


def test_masks_token_by_token_smollm2(smollm2_chat, dataset):
    for row in _rows(dataset):
        untrained, contents = _check_row_masks(smollm2_chat, row)
        assert len(untrained) - len(contents) <= 4  # at most a tag character merged on each side


def test_tokenize_rows_skips_overlong_rows(byte_chat, dataset):
    rows = _rows(dataset)
    lengths = sorted(len(conversation_to_sequence(byte_chat, r["prompt"] + r["completion"], "last")) for r in rows)
    limit = lengths[len(lengths) // 2]
    kept, skipped = tokenize_rows(byte_chat, rows, limit, False)
    assert skipped == sum(n > limit for n in lengths) > 0
    assert len(kept) + skipped == len(rows) and all(len(ids) <= limit for ids, _ in kept)


def GenConfig(**values):
    return load_config(GenerateConfig, values)


def Config(**values):
    return load_config(SFTConfig, values)


def _cfg(data, out, **kw):
    base = dict(data=str(data), model={"name": "tiny", "dtype": "fp32"}, epochs=1, batch=4, micro_batch=2,
                optim={"lr": 3e-3}, out=str(out))
    return Config(**{**base, **kw})


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


def test_tiny_model_learns_below_bound(short_data, tmp_path):
    # 8 rows, 10 epochs of 4 steps: the token-mean loss on them falls from ln(259) = 5.56 nats
    # (uniform over the byte vocabulary) to below the stated bound of 2.0 nats.
    cfg = _cfg(short_data, tmp_path / "run", epochs=10, batch=2, micro_batch=2)
    assert main(cfg) == 0
    from spa_rl.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(str(tmp_path / "run" / "final"), dtype="fp32")
    rows, _ = tokenize_rows(ChatTokenizer(tok), load_rows(cfg.data, "train"), cfg.max_length, False)
    rt = runtime.setup(device="cpu", dtype="fp32", distributed=False)
    loss = evaluate_loss(model, rows, cfg, tok.pad_token_id, rt)
    print(f"tiny-model loss after training: {loss:.3f}")
    assert loss < 2.0
    first = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][0]
    assert '"loss": 5.' in first  # started near uniform


def _log(run):
    import json

    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def test_accumulation_matches_one_big_batch(short_data, tmp_path):
    # 4 micro-batches of 1 row vs 1 of 4 rows: the same token-mean loss and gradient per step
    # (Adam's first steps amplify float noise on near-zero gradients, so compare those, not weights).
    main(_cfg(short_data, tmp_path / "a", micro_batch=1))
    main(_cfg(short_data, tmp_path / "b", micro_batch=4))
    a, b = _log(tmp_path / "a"), _log(tmp_path / "b")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        for key in ("loss", "grad_norm", "val_loss"):
            if key in x:
                assert x[key] == pytest.approx(y[key], rel=1e-5), key


def test_resume_equals_uninterrupted(short_data, tmp_path, monkeypatch):
    import spa_rl.recipes.sft as sft

    main(_cfg(short_data, tmp_path / "full", epochs=2))
    original = sft.save_epoch

    def save_then_die(cfg, run, epoch, *args):
        path = original(cfg, run, epoch, *args)
        if epoch == 1:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(sft, "save_epoch", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        main(_cfg(short_data, tmp_path / "cut", epochs=2))
    monkeypatch.setattr(sft, "save_epoch", original)
    with pytest.raises(ConfigError, match="--resume"):
        main(_cfg(short_data, tmp_path / "cut", epochs=2))
    main(_cfg(short_data, tmp_path / "cut", epochs=2, resume=True))
    a, b = _weights(tmp_path / "full" / "final"), _weights(tmp_path / "cut" / "final")
    assert all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)
    logged = [line for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == len((tmp_path / "full" / "metrics.jsonl").read_text().splitlines())
    assert not (tmp_path / "cut" / "checkpoint-epoch-1" / "trainer_state.pt").exists()  # pruned
    (tmp_path / "cut" / "checkpoint-epoch-2" / "trainer_state.pt").unlink()
    with pytest.raises(CheckpointError, match="trainer_state"):
        main(_cfg(short_data, tmp_path / "cut", epochs=3, resume=True))
    assert main(_cfg(short_data, tmp_path / "fresh", resume=True)) == 0  # nothing to resume: a new run


def test_lora_checkpoint_is_a_full_model(short_data, tmp_path):
    from transformers import AutoModelForCausalLM

    from spa_rl.models import load_model_and_tokenizer

    base, _ = load_model_and_tokenizer("tiny", dtype="fp32")
    main(_cfg(short_data, tmp_path / "lora", lora=True, lora_rank=4, epochs=2, optim={"lr": 1e-2}))
    ckpt = tmp_path / "lora" / "final"
    assert (ckpt / "adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(ckpt)
    assert not any("lora" in k for k in merged.state_dict())
    moved = [k for k, v in base.state_dict().items() if not torch.equal(v, merged.state_dict()[k])]
    assert any("q_proj" in k for k in moved)
    assert not any("norm" in k for k in moved)  # only the adapted linear layers changed


def test_cli_generate_sft_eval(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spa_rl.cli import main as spa

    data, run = tmp_path / "data", tmp_path / "run"
    assert spa(["generate", "--env", "sokoban", "--policy", "random", "--episodes", "6", "--group-size", "2",
                "--out", str(data)]) == 0
    assert spa(["sft", "--data", str(data), "--model", "tiny", "--epochs", "1", "--batch", "4", "--micro-batch",
                "2", "--mask-world-model", "--out", str(run)]) == 0
    ckpt = run / "checkpoint-epoch-1"
    AutoModelForCausalLM.from_pretrained(ckpt)
    AutoTokenizer.from_pretrained(ckpt)
    assert (run / "final").resolve() == ckpt.resolve()
    assert "mask_world_model: true" in (ckpt / "config.yaml").read_text()
    assert (run / "tb").is_dir() and (run / "metrics.jsonl").is_file()
    assert spa(["eval", "--env", "sokoban", "--model", str(run / "final"), "--eval.levels", "1", "--eval.samples", "2",
                "--sampling.max-new-tokens", "8", "--out", str(tmp_path / "eval")]) == 0
    assert spa(["sft", "--out", str(tmp_path / "x")]) == 2  # no --data: one-line error


@pytest.mark.slow
def test_smollm2_short_sft(short_data, tmp_path, default_model_dir):
    from transformers import AutoModelForCausalLM

    from spa_rl.models import load_model_and_tokenizer

    run = tmp_path / "run"
    main(Config(data=str(short_data), model=str(default_model_dir), epochs=1, batch=8, micro_batch=2,
                max_rows=8, out=str(run)))
    records = _log(run)
    assert all(math.isfinite(r.get("loss", r.get("val_loss"))) for r in records)
    assert records[0]["loss"] < 5  # a pretrained model, not a random one
    ckpt = run / "checkpoint-epoch-1"
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert model.num_parameters() > 100e6
    load_model_and_tokenizer(str(run / "final"))


def test_a_bad_dataset_fails_before_the_model_loads(tmp_path, monkeypatch):
    import spa_rl.models

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"prompt": []}\n')
    (data / "README.md").write_text("card\n")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(spa_rl.models, "load_model_and_tokenizer", no_model)
    from spa_rl.errors import DataError
    with pytest.raises(DataError, match="train.jsonl row 1"):
        main(_cfg(data, tmp_path / "run"))
