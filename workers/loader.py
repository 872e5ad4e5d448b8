"""Load a model and its tokenizer once per worker process: load_model(spec, device, dtype) -> (model, tokenizer).

Nothing is ever downloaded: GGUF files and directories are read from local paths only.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from contract.devices import device_index, is_device_name
from contract.registry import ModelSpec

try:  # transformers 5 can keep GGUF weights packed; it then warns that packed weights are fastest in float32
    from transformers import GgufConfig
except ImportError:  # older transformers always de-quantizes
    GgufConfig = None

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CACHE_DIR_ENV = "BULKGEN_CACHE_DIR"

# The tiny random Llama used by tests: small enough to build in a second, real tokenizer.
TINY_LAYERS = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
)
TINY_SEED = 0
# SmolLM2's special tokens: BOS 1 <|im_start|>, EOS 2 <|im_end|>, pad = EOS.
TINY_BOS, TINY_EOS = 1, 2


def check_device(device: str) -> torch.device:
    """'cpu' or 'cuda[:N]', and CUDA must be there when asked for."""
    if not is_device_name(device):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but CUDA is not available to torch {torch.__version__}")
        if device_index(device) >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    return torch.device(device)


def check_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "float16" and device.type == "cpu":
        raise ValueError("dtype float16 is not supported on cpu (slow and inaccurate there); use float32 or bfloat16")
    return DTYPES[dtype]


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "bulkgen")


def _gguf_key(gguf_path: Path) -> str:
    """A cache key that changes when the GGUF file does."""
    stat = gguf_path.stat()
    digest = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"{gguf_path.stem}-{digest}"


def load_gguf_tokenizer(folder: str, gguf_file: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a GGUF file, converted once and then read from the cache.

    Converting it from the GGUF takes seconds; reading the saved tokenizer.json a fraction of that.
    Several workers may start at once, so the cache is written to a temporary folder and renamed into place.
    """
    target = cache_dir() / "tokenizers" / _gguf_key(Path(folder) / gguf_file)
    if (target / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(target), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file, local_files_only=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer.save_pretrained(str(tmp))
        os.rename(tmp, target)
    except OSError:
        pass  # another process renamed its copy first: theirs is as good as ours
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer


def build_tiny_llama(tokenizer: PreTrainedTokenizerBase, context_length: int) -> LlamaForCausalLM:
    """A randomly initialised Llama whose weights are the same in every process (fixed seed)."""
    config = LlamaConfig(
        **TINY_LAYERS,
        vocab_size=len(tokenizer),
        max_position_embeddings=context_length,
        tie_word_embeddings=True,
        bos_token_id=TINY_BOS,
        eos_token_id=TINY_EOS,
        pad_token_id=TINY_EOS,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(config)
    model.generation_config.bos_token_id = TINY_BOS
    model.generation_config.eos_token_id = TINY_EOS
    model.generation_config.pad_token_id = TINY_EOS
    return model


def load_model(spec: ModelSpec, device: str = "cpu", dtype: str = "float32") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load spec's model in eval mode on device, with a left-padding tokenizer whose pad token is set."""
    torch_device = check_device(device)
    torch_dtype = check_dtype(dtype, torch_device)
    if spec.kind == "gguf":
        assert spec.gguf_file is not None, f"model {spec.name!r}: a gguf spec needs gguf_file"
        tokenizer = load_gguf_tokenizer(spec.path, spec.gguf_file)
        # Dense weights, said outright: the engine runs plain Linear layers and quantizes them itself (torchao);
        # this GGUF's block types have no packed kernel here anyway, so transformers would fall back to it.
        dense = {"quantization_config": GgufConfig(dequantize=True)} if GgufConfig is not None else {}
        model = AutoModelForCausalLM.from_pretrained(
            spec.path, gguf_file=spec.gguf_file, dtype=torch_dtype, local_files_only=True, **dense
        )
    elif spec.kind == "tiny":
        assert spec.gguf_file is not None, f"model {spec.name!r}: the tiny model takes its tokenizer from a gguf file"
        tokenizer = load_gguf_tokenizer(spec.path, spec.gguf_file)
        model = build_tiny_llama(tokenizer, spec.context_length).to(torch_dtype)
    elif spec.kind == "pretrained":
        tokenizer = AutoTokenizer.from_pretrained(spec.path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=torch_dtype, local_files_only=True)
    else:
        raise ValueError(f"model {spec.name!r}: unknown kind {spec.kind!r} (expected gguf, tiny or pretrained)")

    model.eval()
    model.requires_grad_(False)
    model.to(torch_device)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
