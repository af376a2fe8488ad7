"""From config sections to the rollout machinery, for every stage that plays (eval, generate,
train): the sampling parameters, the generation backend, and the episodes of a block of levels.
Stages call these instead of building backends and episodes themselves."""

from __future__ import annotations

from spa_rl.sections import EnvSection, EpisodeSection, SamplingSection


def sampling_params(sampling: SamplingSection):
    """The backend's `SamplingParams` from the config section, field by field of the same name
    (a field the section adds reaches the backend without a change here)."""
    import dataclasses

    from spa_rl.rollout.backend import SamplingParams

    names = {f.name for f in dataclasses.fields(SamplingParams)}
    return SamplingParams(**{f.name: getattr(sampling, f.name) for f in dataclasses.fields(sampling)
                             if f.name in names})


def make_backend(model, tokenizer, sampling: SamplingSection, seed: int, *, model_name: str | None = None,
                 dtype: str = "auto", cache: dict | None = None):
    """The generation backend `sampling.backend` names (token ids in; token ids and log-probs out).

    auto/hf: an `HFBackend` over `model` (cheap to build; one per call). vllm: a `VLLMBackend`
    that loads `model_name` itself; building one costs seconds to minutes, so a caller that
    samples many times (spa train) passes a `cache` dict, and later calls reuse its engine,
    reseeded with `seed` (the caller pushes new weights with `update_weights`)."""
    if sampling.backend == "vllm":
        backend = cache.get("vllm") if cache is not None else None
        if backend is None:
            from spa_rl.rollout.vllm_backend import VLLMBackend

            if model_name is None:
                raise ValueError("the vLLM backend needs the model's name or folder")
            backend = VLLMBackend(model_name, tokenizer, dtype=dtype, seed=seed,
                                  gpu_memory_utilization=sampling.vllm_gpu_memory)
            if cache is not None:
                cache["vllm"] = backend
        backend.reseed(seed)
        return backend
    from spa_rl.rollout.backend import HFBackend

    return HFBackend(model, tokenizer, max_batch_size=sampling.decode_batch, seed=seed,
                     engine="auto" if sampling.backend == "auto" else "hf")


def make_level_episodes(env: EnvSection, episode: EpisodeSection, split: str, first_level: int, levels: int,
                        samples: int) -> list:
    """(group, Episode) pairs: `samples` episodes on each of `levels` levels of the `split` seed
    stream (or of `env.level_file`), starting at level index `first_level`."""
    from spa_rl.rollout.engine import make_episodes

    return make_episodes(env.name, split, first_level, levels, samples, episode.to_episode_config(),
                         env_options=env.option_values, level_file=env.level_file)
