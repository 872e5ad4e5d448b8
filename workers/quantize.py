"""Weight quantization of a loaded model, and which device/dtype/quantize combinations can run at all.

int8 is torchao's weight-only int8 (one scale per output channel) on every Linear layer, the LM head included;
activations stay in the worker's --dtype. Measured on our CPU (docs/benchmarks.md): torch.ao's dynamic int8
(quantize_dynamic) decodes faster but multiplies the quality guard's perplexity by 3 to 4 (one scale per
activation tensor cannot hold an LLM's outlier channels); torchao's dynamic int8 activations cost +4.7%
perplexity and are slower than bfloat16; weight-only int8 stays within 1% of float32.

int4 is torchao's group-wise int4 weight-only in the tinygemm layout, for CUDA with bfloat16 only. It is written
for GPU workers and has NOT been run here (no GPU). On the CPU, torch's int4 kernel multiplies a 64-row batch
2.4x slower than bfloat16 does, so int4 is refused there.

check_combination is torch-free: `workers start` calls it to refuse a combination before it starts anything.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel

QUANTIZE_MODES = ("none", "int8", "int4")
DTYPES = ("float32", "bfloat16", "float16")
INT4_GROUP_SIZE = 128


def check_combination(device: str, dtype: str, quantize: str) -> str | None:
    """None if device, dtype and quantize can run together, else a message that says what to use instead."""
    if dtype not in DTYPES:
        return f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}"
    if quantize not in QUANTIZE_MODES:
        return f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {quantize!r}"
    if device == "cpu":
        if dtype == "float16":
            return "dtype float16 does not run on the CPU (slow and inaccurate there); use float32 or bfloat16"
        if quantize == "int4":
            return (
                "quantize int4 does not run on the CPU (its kernel is slower than bfloat16 for batched decoding); "
                "use --quantize int8 or none, or a CUDA device"
            )
    elif quantize == "int4" and dtype != "bfloat16":
        return f"quantize int4 on CUDA needs --dtype bfloat16 (its kernels take bfloat16), got {dtype}"
    return None


def quantize_model(model: PreTrainedModel, quantize: str) -> PreTrainedModel:
    """model with its Linear layers' weights quantized in place (embeddings stay as they are); 'none' leaves it."""
    if quantize == "none":
        return model
    import torch

    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError as exc:
        raise ValueError(f"quantize {quantize} needs torchao (pip install torchao==0.18.0): {exc}") from None

    def is_linear(module: torch.nn.Module, name: str) -> bool:
        return isinstance(module, torch.nn.Linear)

    if quantize == "int8":
        config = Int8WeightOnlyConfig()
    elif quantize == "int4":
        config = Int4WeightOnlyConfig(group_size=INT4_GROUP_SIZE, int4_packing_format="tile_packed_to_4d")
    else:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {quantize!r}")
    quantize_(model, config, filter_fn=is_linear)
    return model
