"""A clearly labelled stand-in for the engine: fixed text at once, no model, no torch.

Only for measuring the queue and the store (bench/ load benchmark, fault tests): every result it
produces says so in its text, and its model name is 'stand-in'.
"""
from __future__ import annotations

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
