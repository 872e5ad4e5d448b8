"""Does torch.compile pay on this CPU? The engine's decode step on the real SmolLM2, eager against compiled parts.

    python -m bench.compile_cpu --mode eager        # as the engine runs
    python -m bench.compile_cpu --mode pieces       # RMSNorm and SiLU x up compiled (dynamic shapes), shared by all layers
    python -m bench.compile_cpu --mode residuals    # each layer's residual adds, post-attention norm and MLP compiled

Each run fills a batch of --rows requests of the bench workload (fixed lengths, EOS ignored), then times three
blocks of --steps decode steps; compilation happens in the warm-up and is reported apart. Run the modes one after
the other on a quiet machine and compare the step times within one session.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from bench.workload import DEFAULT_PROMPTS, MODEL, machine, read_lines, to_requests
from contract.registry import resolve
from workers.engine import Engine

MODES = ("eager", "pieces", "residuals")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm, as a function of its weight (one compiled graph for every layer's norms)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def silu_times(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


def compile_parts(engine: Engine, mode: str) -> None:
    runner = engine.runner
    assert runner is not None, "the fast engine runs this model"
    if mode == "residuals":
        torch._dynamo.config.cache_size_limit = 64  # one graph per layer module
        runner._residuals = torch.compile(runner._residuals, dynamic=True)  # type: ignore[method-assign]
        return
    norm, act = torch.compile(rms_norm, dynamic=True), torch.compile(silu_times, dynamic=True)
    for layer in runner.layers:
        for name in ("input_layernorm", "post_attention_layernorm"):
            module = getattr(layer, name)
            module.forward = lambda x, m=module: norm(x, m.weight, m.variance_epsilon)
        mlp = layer.mlp
        mlp.forward = lambda x, m=mlp: m.down_proj(act(m.gate_proj(x), m.up_proj(x)))


def measure(mode: str, rows: int, steps: int, dtype: str) -> dict[str, Any]:
    engine = Engine.load(resolve(MODEL), dtype=dtype, max_batch_rows=rows, speculative_tokens=0)
    engine.eos_ids = frozenset()
    if mode != "eager":
        compile_parts(engine, mode)
    lines = [dict(line, max_new_tokens=4 * steps + 50) for line in read_lines(DEFAULT_PROMPTS)[:rows]]
    started = time.perf_counter()
    for i, request in enumerate(to_requests(lines)):
        engine.submit(i, request)
    while engine.scheduler.waiting:
        engine.step()
    for _ in range(5):
        engine.step()
    warm_up = time.perf_counter() - started
    step_ms = []
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(steps):
            engine.step()
        step_ms.append(round((time.perf_counter() - started) / steps * 1e3, 1))
    return dict(mode=mode, dtype=dtype, rows=engine.running_rows, steps=steps, warm_up_s=round(warm_up, 1), step_ms=step_ms,
                cpu=machine()["cpu"], torch=torch.__version__)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.compile_cpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=MODES, default="eager")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    print(json.dumps(measure(args.mode, args.rows, args.steps, args.dtype)))


if __name__ == "__main__":
    main()
