"""Moved to contract.registry (model lookup is shared with the producer); kept for the engine's imports."""
from contract.registry import (
    SMOLLM2,
    SMOLLM2_CONTEXT,
    SMOLLM2_GGUF,
    STANDIN,
    TINY,
    TINY_CONTEXT,
    ModelNotFound,
    ModelSpec,
    context_length,
    queue_name,
    resolve,
    smollm2_dir,
)

__all__ = [
    "SMOLLM2", "SMOLLM2_CONTEXT", "SMOLLM2_GGUF", "STANDIN", "TINY", "TINY_CONTEXT",
    "ModelNotFound", "ModelSpec", "context_length", "queue_name", "resolve", "smollm2_dir",
]
