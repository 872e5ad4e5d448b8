"""A clearly labelled stand-in for the engine: fixed text at once, no model, no torch.

Only for measuring the queue and the store (bench/ load benchmark, fault tests): every result it
produces says so in its text, and its model name is 'stand-in'. WholeBatches is what the worker drives it
(or any engine with generate() only) through.
"""
from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from workers.types import GenerationRequest, GenerationResult, Sample

STANDIN_TEXT = "[stand-in engine output] " + "lorem " * 8
STANDIN_COMPLETION_TOKENS = 10


class StandInEngine:
    dtype = "none"
    quantize = "none"

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        results = []
        for request in requests:
            prompt = request.prompt if request.prompt is not None else " ".join(m["content"] for m in request.messages or [])
            seed = request.params.seed
            samples = [
                Sample(STANDIN_TEXT, "length", STANDIN_COMPLETION_TOKENS, None if seed is None else seed + i)
                for i in range(request.params.n)
            ]
            results.append(GenerationResult(prompt_tokens=len(prompt.split()), samples=samples))
        return results


class WholeBatches:
    """An engine with generate() only (the stand-in), driven like the scheduler (workers.worker.SteppedEngine):
    each step generates everything submitted since the last one."""

    def __init__(self, engine: StandInEngine | Any) -> None:
        self.inner = engine
        self.dtype = getattr(engine, "dtype", "none")
        self.quantize = getattr(engine, "quantize", "none")
        self.pending: list[tuple[Hashable, GenerationRequest]] = []

    def submit(self, key: Hashable, request: GenerationRequest) -> None:
        self.pending.append((key, request))

    def step(self) -> list[tuple[Hashable, GenerationResult]]:
        batch = list(self.pending)
        results = self.inner.generate([request for _, request in batch]) if batch else []
        del self.pending[: len(batch)]  # only once generated: after a failure, clear() hands them all back
        return [(key, result) for (key, _), result in zip(batch, results)]

    def clear(self) -> list[Hashable]:
        keys = [key for key, _ in self.pending]
        self.pending = []
        return keys

    def on_step(self, callback: Any) -> None:
        """No decode steps to report."""

    @property
    def idle(self) -> bool:
        return not self.pending

    @property
    def waiting_rows(self) -> int:
        return len(self.pending)

    @property
    def running_rows(self) -> int:
        return 0
