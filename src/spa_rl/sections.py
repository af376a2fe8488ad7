"""The config sections that stages share, each declared once (see `spa_rl.config`).

| section    | what it holds                                        | used by                         |
|------------|------------------------------------------------------|---------------------------------|
| `model`    | which model, its compute precision and device        | eval, generate, sft, train      |
| `env`      | the game, its options, a level file                  | eval, generate, train           |
| `episode`  | how an episode is played (prompt mode, render, turns) | eval, generate, train           |
| `sampling` | how responses are sampled (token cap, T, top-p, ...) | eval, generate, train           |
| `optim`    | AdamW and the learning-rate schedule                 | sft, train (and `critic_optim`) |
| `eval`     | which validation levels, how many samples each       | eval, train (validation)        |

A new sampling field is added once, in `SamplingSection` (and read where it is used:
`rollout.setup.sampling_params`); every stage that samples then has it, in YAML and as
`--sampling.NAME`. This module stays torch-free: `spa --help` must not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from spa_rl.agent import MODES
from spa_rl.config import option
from spa_rl.envs import ENV_NAMES, RENDER_MODES
from spa_rl.errors import ConfigError

DTYPES = ("auto", "bf16", "fp32")
BACKENDS = ("auto", "hf", "vllm")


def _at_least(obj, minimum: int, *names: str) -> list[str]:
    return [f"{n} must be >= {minimum}, got {getattr(obj, n)}" for n in names if getattr(obj, n) < minimum]


@dataclass
class ModelSection:
    PRIMARY: ClassVar[str] = "name"
    name: str = option("default", "'default' (embedded SmolLM2-135M-Instruct), 'tiny', a local folder, a "
                                  "checkpoint or run folder, or a hub id")
    dtype: str = option("auto", "compute precision: auto (bf16 where the CPU/GPU computes it natively), bf16, fp32; "
                                "training keeps fp32 master weights and computes under bf16 autocast",
                        choices=DTYPES)
    device: str = option("auto", "auto (CUDA when present), cpu, cuda or cuda:N; under torchrun each rank takes "
                                 "cuda:LOCAL_RANK")

    def check(self) -> list[str]:
        from spa_rl.runtime import device_spec_error

        error = device_spec_error(self.device)
        return [f"device: {error.removeprefix('device ')}"] if error else []


def parse_env_options(text: str | None) -> dict:
    """`--env.options '{size: 6, is_slippery: false}'` -> dict (the env validates the values)."""
    import yaml

    if not text:
        return {}
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"env.options: {text!r} is not YAML") from None
    if not isinstance(value, dict):
        raise ConfigError(f"env.options: expected a mapping like '{{size: 6}}', got {text!r}")
    return value


@dataclass
class EnvSection:
    PRIMARY: ClassVar[str] = "name"
    name: str = option("sokoban", "game", choices=ENV_NAMES)
    options: str | None = option(None, "game options as YAML, e.g. '{size: 6}' or '{is_slippery: false}'")
    level_file: str | None = option(None, "play the levels of this file (blank-line separated, each in the "
                                          "game's grid format) instead of generated ones")

    def check(self) -> list[str]:
        try:
            parse_env_options(self.options)
        except ConfigError as exc:
            return [str(exc).removeprefix("env.")]
        return []

    @property
    def option_values(self) -> dict:
        return parse_env_options(self.options)


@dataclass
class EpisodeSection:
    mode: str = option("base", "prompt mode: base (think + answer) or world-model (observation, prediction)",
                       choices=MODES)
    render: str = option("grid+coords", "state text: grid only, or grid plus coordinate line", choices=RENDER_MODES)
    max_turns: int = option(5, "LLM turns per episode")
    max_actions_per_turn: int = option(5, "actions kept from one answer")
    action_budget: int | None = option(None, "actions per episode (default: the game's, 10 / 10 / 50)")
    format_penalty: float = option(-0.1, "added to the score once per badly formatted turn (<= 0)")
    max_words: int = option(100, "response length limit printed in the prompt (not enforced)")
    max_context_tokens: int = option(8192, "an episode stops when its next turn would not fit")

    def check(self) -> list[str]:
        errors = _at_least(self, 1, "max_context_tokens")
        try:
            self.to_episode_config()
        except ConfigError as exc:
            errors.extend(str(exc).removeprefix("invalid EpisodeConfig: ").replace("render_mode", "render")
                          .split("; "))
        return errors

    def to_episode_config(self):
        from spa_rl.agent import EpisodeConfig

        return EpisodeConfig(mode=self.mode, render_mode=self.render, max_turns=self.max_turns,
                             max_actions_per_turn=self.max_actions_per_turn, action_budget=self.action_budget,
                             format_penalty=self.format_penalty, max_words=self.max_words)


@dataclass
class SamplingSection:
    max_new_tokens: int = option(400, "token cap for one turn's response")
    temperature: float = option(1.0, "sampling temperature (0 = greedy)")
    top_p: float = option(1.0, "nucleus sampling threshold")
    top_k: int = option(0, "top-k sampling (0 = off)")
    stop_strings: tuple[str, ...] = option(("</answer>",), "a response ends after any of these texts (YAML list)")
    decode_batch: int = option(64, "episodes decoded together")
    backend: str = option("auto", "what generates: auto (the rollout engine where the model's architecture allows, "
                                  "else the HF forward), hf (the HF forward, one call per turn: the reference), "
                                  "vllm (a CUDA GPU with `pip install 'spa-rl[vllm]'`; docs/scaling.md)",
                          choices=BACKENDS)
    vllm_gpu_memory: float = option(0.4, "vllm: share of the GPU vLLM takes for weights and KV cache (the rest is "
                                         "the trainer's)")

    def check(self) -> list[str]:
        errors = _at_least(self, 1, "max_new_tokens", "decode_batch") + _at_least(self, 0, "top_k")
        if not 0 < self.vllm_gpu_memory <= 1:
            errors.append(f"vllm_gpu_memory must be in (0, 1], got {self.vllm_gpu_memory}")
        if self.temperature < 0:
            errors.append(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            errors.append(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop_strings):
            errors.append("stop_strings must not hold an empty text")
        return errors


@dataclass
class OptimSection:
    lr: float = option(1e-4, "peak learning rate (AdamW)")
    weight_decay: float = option(0.01, "AdamW weight decay (not on biases and norms)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 = off)")
    schedule: str = option("cosine", "learning-rate schedule after the warmup", choices=("cosine", "constant"))
    warmup_ratio: float = option(0.1, "share of the optimizer steps with linear warmup")

    def check(self) -> list[str]:
        errors = []
        if self.lr <= 0:
            errors.append(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            errors.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            errors.append(f"beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.grad_clip < 0:
            errors.append(f"grad_clip must be >= 0, got {self.grad_clip}")
        return errors


@dataclass
class EvalSection:
    levels: int = option(128, "number of validation levels")
    samples: int = option(8, "episodes per level (n for Pass@k)")
    first_level: int = option(0, "index of the first level in the validation seed stream")
    temperature: float | None = option(None, "sampling temperature of the evaluation (0 = greedy); unset: the "
                                              "sampling section's. Greedy removes the sampler's noise, but a "
                                              "small model trained at T = 1 can loop greedily where sampling "
                                              "does not")

    def check(self) -> list[str]:
        errors = _at_least(self, 1, "levels", "samples") + _at_least(self, 0, "first_level")
        if self.temperature is not None and self.temperature < 0:
            errors.append(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        return errors
