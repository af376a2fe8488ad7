"""Run artifacts (spa_rl/artifacts.py) on real files: atomic folders, the metrics log, checkpoints."""

import os

import pytest

from spa_rl.artifacts import COMPLETE as MARKER, atomic_dir, find_complete, is_complete


def write(target, text):
    with atomic_dir(target) as tmp:
        (tmp / "weights.txt").write_text(text)


def test_a_finished_write_is_complete_and_leaves_no_debris(tmp_path):
    target = tmp_path / "ckpt"
    write(target, "v1")
    assert is_complete(target) and (target / "weights.txt").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    # an ordinary folder, not mkdtemp's private 0700
    umask = os.umask(0)
    os.umask(umask)
    assert (target.stat().st_mode & 0o777) == (0o777 & ~umask)


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path):
    target = tmp_path / "ckpt"
    write(target, "v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "weights.txt").write_text("half")
            raise RuntimeError("killed while saving")
    assert (target / "weights.txt").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_replacing_overwrites_and_debris_of_a_killed_write_is_cleared(tmp_path):
    target = tmp_path / "ckpt"
    write(target, "v1")
    (tmp_path / ".ckpt.tmp").mkdir()  # what SIGKILL during a write leaves behind
    (tmp_path / ".ckpt.tmp" / "weights.txt").write_text("torn")
    write(target, "v2")
    assert (target / "weights.txt").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_find_complete_falls_back_to_the_old_folder_of_an_interrupted_swap(tmp_path):
    target = tmp_path / "ckpt"
    assert find_complete(target) is None
    write(target, "v1")
    os.replace(target, tmp_path / ".ckpt.old")  # killed between the two renames of a replacement
    assert find_complete(target) == tmp_path / ".ckpt.old"
    (tmp_path / ".ckpt.old" / MARKER).unlink()
    assert find_complete(target) is None  # an incomplete folder is never offered


# ---- the checkpoint layout SFT and PPO share -------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    from spa_rl.models.tiny import build_byte_tokenizer, build_tiny_model

    tok = build_byte_tokenizer()
    return build_tiny_model(tok, seed=1).float(), tok


def _state(step, opt):
    from spa_rl.training import rng_state

    return {"counters": {"step": step}, "optimizers": {"model": opt.state_dict()}, "schedulers": {},
            "rng": rng_state()}


def test_checkpoints_are_loadable_models_with_a_weights_only_trainer_state(tmp_path, tiny):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spa_rl.artifacts import (TRAINER_STATE, checkpoint_dir, final_model, finish_checkpoint,
                                  latest_checkpoint, list_checkpoints, load_extra_module, load_trainer_state,
                                  save_checkpoint)
    from spa_rl.training import adamw

    model, tok = tiny
    run = tmp_path / "run"
    assert latest_checkpoint(run) is None
    opt = adamw(model, lr=1e-3)
    head = torch.nn.Linear(4, 1)
    for step in (1, 2, 10):
        path = save_checkpoint(checkpoint_dir(run, "step", step), model, tok, {"lr": 0.001}, _state(step, opt),
                               extra_modules={"critic": head})
        finish_checkpoint(run, path, extra_modules=("critic",))
    (run / ".checkpoint-step-11.tmp").mkdir()  # an interrupted save: ignored
    assert [n for n, _ in list_checkpoints(run)] == [1, 2, 10]  # numeric, not lexical, order
    last = latest_checkpoint(run)
    assert last.name == "checkpoint-step-10" and final_model(run).resolve() == last.resolve()
    # older checkpoints stay models, without what only resuming needs
    assert not (run / "checkpoint-step-2" / TRAINER_STATE).exists()
    assert not (run / "checkpoint-step-2" / "critic.safetensors").exists()
    assert (run / "checkpoint-step-2" / "model.safetensors").exists()
    assert latest_checkpoint(run, resumable=True) == last
    assert load_trainer_state(last)["counters"]["step"] == 10  # torch.load(weights_only=True) inside
    restored = torch.nn.Linear(4, 1)
    load_extra_module(last, "critic", restored)
    assert torch.equal(restored.weight, head.weight)
    assert latest_checkpoint(last) == last  # a checkpoint folder itself
    reloaded = AutoModelForCausalLM.from_pretrained(final_model(run))
    AutoTokenizer.from_pretrained(final_model(run))
    for (n, p), (_, q) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(p, q), n


def test_a_trainer_state_of_another_schema_is_refused(tmp_path, tiny):
    import torch

    from spa_rl.artifacts import save_checkpoint, load_trainer_state
    from spa_rl.errors import CheckpointError

    model, tok = tiny
    with pytest.raises(ValueError, match="counters"):
        save_checkpoint(tmp_path / "c", model, tok, {}, {"step": 1})
    path = save_checkpoint(tmp_path / "d", model, tok, {}, {"counters": {}, "optimizers": {}, "schedulers": {},
                                                               "rng": {}})
    torch.save({"step": 3}, path / "trainer_state.pt")
    with pytest.raises(CheckpointError, match="trainer state"):
        load_trainer_state(path)


def test_metrics_log_appends_on_resume_and_starts_afresh_otherwise(tmp_path):
    from spa_rl.artifacts import MetricsLog, read_jsonl

    log = MetricsLog(tmp_path)
    for step in (1, 2, 3):
        log.log(step, {"loss": float(step)})
    log.close()
    log = MetricsLog(tmp_path, resume_step=2)  # the checkpoint was at step 2: step 3 is redone
    log.log(3, {"loss": 30.0})
    log.close()
    assert [(r["step"], r["loss"]) for r in read_jsonl(tmp_path / "metrics.jsonl")] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    MetricsLog(tmp_path).close()  # a new run
    assert not (tmp_path / "metrics.jsonl").exists()


def test_new_run_in_a_used_folder_is_refused(tmp_path):
    from spa_rl.artifacts import check_new_or_resume
    from spa_rl.errors import ConfigError

    assert check_new_or_resume(tmp_path, resume=False) is None
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match="--resume"):
        check_new_or_resume(tmp_path, resume=False)
    assert check_new_or_resume(tmp_path, resume=True) is None  # nothing to resume from yet
