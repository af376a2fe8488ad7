"""An optional vLLM generation backend (`pip install spa-rl[vllm]`), for GPU users.

NOT RUN ON HARDWARE YET. vLLM cannot be installed on the machines this project has (no CUDA
here; no package index on the lent GPU machine), so this file is checked only against a fake
`vllm` module that records its calls (tests/rollout/test_vllm_backend.py). What is checked: the
calls and arguments sent to vLLM, and how vLLM's outputs become `Generation`s. What is not: that
vLLM accepts them at run time, its speed, and that its log-probs match the trainer's to float
precision. The vLLM API used here was read from vLLM's sources and its RLHF examples (versions
0.10.2 and later); docs/scaling.md lists what to check on the first GPU run.

`VLLMBackend.generate(prompts, params)` has the `HFBackend` interface (rollout/backend.py): token
ids in, token ids and the log-probs of the sampled tokens out, so the rollout loop and the
trainer do not know which backend ran. Choices, each for the trainer's sake:

- prompts go in as token ids (`TokensPrompt`): vLLM never re-tokenises text, so the ids the
  trainer scores are the ids that were sampled from;
- log-probs are of the distribution the trainer recomputes: softmax(logits / temperature),
  before top-k / top-p truncation (`HFBackend`'s convention). vLLM's default `raw_logprobs` are
  taken before the temperature; `processed_logprobs` after the temperature *and* after top-k /
  top-p. So the default here is `processed_logprobs` (exact when top_k = 0 and top_p = 1, the
  RL defaults), `raw_logprobs` is exact at temperature 1 with any top-k / top-p, and any other
  combination is refused with a one-line error (strict_logprobs=False lets evaluation, which
  does not train on log-probs, use it);
- the model's generation_config is ignored (`generation_config="vllm"`): vLLM would otherwise
  apply its default top_k / top_p / repetition penalty, and the trainer's distribution would
  no longer be the sampled one;
- prefix caching is on: the group_size episodes of a level share their prompt, and every turn
  re-sends the whole context; it is reset after each weight update (cached keys and values of
  the old weights would be reused otherwise);
- one seed per request, derived from (seed, rank, call number, prompt index): a request draws
  the same tokens whatever else vLLM batched with it;
- end of turn: the tokenizer's eos and `eos_token_ids` are stop tokens; vLLM keeps the stop token
  in token_ids (like HFBackend), and finish reasons map to "eos" (stop token), "stop" (stop
  string, the token that completed it included) and "length".

Weights (colocated on one GPU per rank, the trainer and vLLM sharing it): after every PPO step
`update_weights(actor.state_dict())` hands the trainer's tensors to vLLM's own
`model.load_weights`, through `LLM.collective_rpc` with vLLM running in this process
(`distributed_executor_backend="external_launcher"`, as TRL's and verl's colocated modes do), so
the tensors are passed by reference and copied GPU to GPU into vLLM's bf16 weights. Between
phases `sleep()` releases vLLM's KV cache and offloads its weights (enable_sleep_mode), leaving
the GPU to the update; the next `update_weights` or `generate` wakes it up.
"""

from __future__ import annotations

import gc
import os
import socket
from collections.abc import Mapping
from typing import Sequence

from spa_rl.errors import ConfigError
from spa_rl.rollout.backend import Generation, SamplingParams

INSTALL_HINT = "pip install 'spa-rl[vllm]'"
LOGPROBS_MODES = ("processed_logprobs", "raw_logprobs")


def _import_vllm():
    try:
        import vllm
        from vllm.inputs import TokensPrompt
    except ImportError as e:
        raise ConfigError(f"the vLLM backend needs vLLM, which is not installed ({e}); run `{INSTALL_HINT}` "
                          "on a machine with a CUDA GPU") from None
    return vllm, TokensPrompt


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load_weights_into_worker(worker, weights):
    """Runs inside vLLM's worker (this process, with external_launcher): vLLM's model maps
    Hugging Face parameter names onto its own fused layout (q/k/v -> qkv_proj, ...) and copies
    each tensor into place, casting to its dtype."""
    runner = worker.model_runner
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    model.load_weights(weights=weights)
    return len(weights)


class VLLMBackend:
    """vLLM behind the `GenerationBackend` interface. One instance per process (rank), on that
    process's GPU (the current CUDA device, which `runtime.setup` set to cuda:LOCAL_RANK).

    model: "default", "tiny", a model folder or a hub id (`models.model_path`), the same weights
    the trainer starts from. tokenizer: the trainer's tokenizer (its eos id ends a turn).
    dtype: "auto" (bf16 where the GPU computes it natively), "bf16" or "fp32", resolved for
    `device` (default: this rank's GPU). seed and rank: see the module docstring.
    gpu_memory_utilization: the share of the GPU vLLM may take for weights and KV cache; the
    rest is the trainer's (colocated). llm_kwargs: more `vllm.LLM` arguments, passed through.
    """

    def __init__(self, model: str, tokenizer=None, *, dtype: str = "auto", seed: int = 0, rank: int | None = None,
                 eos_token_ids: Sequence[int] = (), logprobs_mode: str = "processed_logprobs",
                 strict_logprobs: bool = True, gpu_memory_utilization: float = 0.4, max_model_len: int | None = None,
                 enable_sleep_mode: bool = True, enable_prefix_caching: bool = True, device=None,
                 cache_dir=None, llm_kwargs: dict | None = None):
        if logprobs_mode not in LOGPROBS_MODES:
            raise ConfigError(f"logprobs_mode {logprobs_mode!r} is not one of {', '.join(LOGPROBS_MODES)}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        vllm, self._TokensPrompt = _import_vllm()
        self._vllm = vllm
        from spa_rl import runtime
        from spa_rl.models.loading import model_path

        env_rank, _, local_rank = runtime.env_ranks()
        self.rank = env_rank if rank is None else rank
        self.reseed(seed)
        self.logprobs_mode = logprobs_mode
        self.strict_logprobs = strict_logprobs
        self.enable_sleep_mode = enable_sleep_mode
        ids = {int(t) for t in eos_token_ids}
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is not None:
            ids.add(int(eos))
        self.eos_token_ids = tuple(sorted(ids))
        target = device if device is not None else f"cuda:{local_rank}"
        torch_dtype = runtime.resolve_dtype(dtype, target)
        self.dtype = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}[runtime.dtype_name(torch_dtype)]
        self.model = model_path(model, cache_dir)
        self._asleep: int | None = None  # the sleep level while asleep
        self.weight_version = 0
        # external_launcher runs vLLM's engine in this process and takes its rank from torchrun's
        # variables; a plain single process gets the ones torchrun would set for one rank.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        for var, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(var, value)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        kwargs = dict(model=self.model, dtype=self.dtype, seed=runtime.rank_seed(self.seed, self.rank),
                      tensor_parallel_size=1, distributed_executor_backend="external_launcher",
                      enable_prefix_caching=enable_prefix_caching, enable_sleep_mode=enable_sleep_mode,
                      gpu_memory_utilization=gpu_memory_utilization, logprobs_mode=logprobs_mode,
                      generation_config="vllm")
        if max_model_len is not None:
            kwargs["max_model_len"] = int(max_model_len)
        kwargs.update(llm_kwargs or {})
        self.llm = vllm.LLM(**kwargs)

    # -- generation --

    def reseed(self, seed: int) -> None:
        """Sample from here on as a backend built with `seed` would (the request seeds derive
        from the seed and the number of calls since)."""
        self.seed = int(seed)
        self._calls = 0

    def check_params(self, params: SamplingParams) -> None:
        """Refuse sampling settings whose vLLM log-probs are not the trainer's distribution."""
        if not self.strict_logprobs or params.temperature <= 0:
            return  # greedy: both modes give log_softmax(logits), as HFBackend does
        truncated = params.top_k > 0 or params.top_p < 1.0
        if self.logprobs_mode == "processed_logprobs" and truncated:
            raise ConfigError(
                f"vLLM backend: with top_k={params.top_k}, top_p={params.top_p} vLLM's processed_logprobs are "
                "log-probs of the truncated distribution, not of softmax(logits / temperature) that the trainer "
                "scores; use top_k 0 and top_p 1, or logprobs_mode='raw_logprobs' at temperature 1")
        if self.logprobs_mode == "raw_logprobs" and params.temperature != 1.0:
            raise ConfigError(
                f"vLLM backend: raw_logprobs are taken before the temperature, so at temperature "
                f"{params.temperature} they are not the sampled distribution; use logprobs_mode='processed_logprobs' "
                "(with top_k 0 and top_p 1) or temperature 1")

    def sampling_params(self, params: SamplingParams, n_prompts: int) -> list:
        """One vLLM SamplingParams per prompt (they differ only in their seed)."""
        from spa_rl import runtime

        self._calls += 1
        base = dict(
            temperature=float(params.temperature),
            top_p=float(params.top_p),
            top_k=int(params.top_k) if params.top_k > 0 else -1,  # -1: no top-k, in every vLLM version
            max_tokens=int(params.max_new_tokens),
            stop=list(params.stop_strings) or None,
            stop_token_ids=list(self.eos_token_ids) or None,
            include_stop_str_in_output=True,
            logprobs=0,  # the sampled token's log-prob only
            skip_special_tokens=False,
        )
        call_seed = runtime.rank_seed(self.seed * 1_000_003 + self._calls, self.rank)
        return [self._vllm.SamplingParams(seed=(call_seed * 65_537 + i) % 2**63, **base) for i in range(n_prompts)]

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
        self.check_params(params)
        if not prompts:
            return []
        if self._asleep is not None:
            self.wake_up()
        requests = [self._TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts]
        outputs = self.llm.generate(requests, self.sampling_params(params, len(prompts)), use_tqdm=False)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
        return [self._to_generation(out) for out in outputs]

    def _to_generation(self, request_output) -> Generation:
        out = request_output.outputs[0]
        ids = [int(t) for t in out.token_ids]
        steps = out.logprobs or []
        if len(steps) != len(ids):
            raise RuntimeError(f"vLLM returned {len(steps)} log-prob entries for {len(ids)} tokens")
        logprobs = [float(step[t].logprob) for step, t in zip(steps, ids)]
        if out.finish_reason == "length":
            reason = "length"
        elif out.finish_reason == "stop":
            # stop_reason: None after the model's eos, the token id for a stop token, the text
            # for a stop string. "eos" only when the end-of-turn token is really the last id: the
            # rollout loop then does not append one itself.
            reason = "eos" if ids and ids[-1] in self.eos_token_ids and not isinstance(out.stop_reason, str) else "stop"
        else:
            raise RuntimeError(f"vLLM request {request_output.request_id} ended with {out.finish_reason!r}")
        return Generation(ids, logprobs, reason)

    # -- weights and memory --

    def update_weights(self, weights) -> None:
        """Push trained weights into vLLM: a state_dict, a module, or (name, tensor) pairs with
        Hugging Face names (`actor.state_dict()`; a LoRA model must be merged first). Wakes a
        sleeping engine (weights first, then the KV cache, so the two are never both allocated
        beside a stale copy), loads, and clears the prefix cache."""
        import torch

        if isinstance(weights, torch.nn.Module):
            weights = weights.state_dict()
        pairs = list(weights.items()) if isinstance(weights, Mapping) else list(weights)
        if not pairs:
            raise ConfigError("update_weights got no tensors")
        peft = [n for n, _ in pairs if n.startswith("base_model.model.") or ".lora_" in n]
        if peft:
            raise ConfigError(f"update_weights got LoRA/peft names ({peft[0]!r}); pass the merged model's "
                              "state_dict (model.merge_and_unload())")
        pairs = [(name, t.detach()) for name, t in pairs]
        if self._asleep is not None:
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc(_load_weights_into_worker, args=(pairs,))
        if self._asleep is not None:
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = None
        self.llm.reset_prefix_cache()  # cached keys/values were computed with the old weights
        self.weight_version += 1

    def sleep(self, level: int = 1) -> bool:
        """Free the GPU for training: level 1 offloads the weights to CPU memory and drops the KV
        cache; level 2 drops both (the next update_weights must then bring every weight).
        Returns False (and does nothing) when the engine was built without sleep mode."""
        if level not in (1, 2):
            raise ConfigError(f"sleep level must be 1 or 2, got {level}")
        if not self.enable_sleep_mode:
            return False
        if self._asleep is None:
            self.llm.sleep(level=level)
            self._asleep = level
        return True

    def wake_up(self) -> None:
        """Bring weights and KV cache back (generate does this itself when needed)."""
        if self._asleep is not None:
            self.llm.wake_up()
            self._asleep = None

    @property
    def sleeping(self) -> bool:
        return self._asleep is not None

    def close(self) -> None:
        """Drop the engine and return its GPU memory."""
        llm, self.llm = getattr(self, "llm", None), None
        del llm
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

