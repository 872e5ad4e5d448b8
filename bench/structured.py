"""Structured output's cost: the bench workload with a JSON schema on every request against the same requests
without, and the bench schemas' compile time, cold and cached, in one process (the model loaded once).

    python -m bench.structured --out result.json [--prompts P] [--requests N] [--dtype bfloat16]

Runs free, constrained, free again (this machine's speed drifts over minutes: the constrained run is compared with
the mean of the two free runs around it). bench.run calls it (`make bench`) and writes its section of the report.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench.schemas import SCHEMAS
from bench.workload import DEFAULT_PROMPTS, MODEL, read_lines, to_requests

WORKLOAD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "answer": {"type": "string"},
        "keywords": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 5},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["answer", "keywords", "confidence"],
    "additionalProperties": False,
}
"""What every request of the constrained run is held to."""
TARGET = 0.9
"""Constrained tokens/s at least this share of free tokens/s."""


def _timed(engine: Any, requests: list[Any]) -> dict[str, Any]:
    started = time.perf_counter()
    results = engine.generate(requests)
    seconds = time.perf_counter() - started
    samples = [s for r in results for s in r.samples]
    tokens = sum(s.completion_tokens for s in samples)
    return {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
            "failed": sum(1 for r in results if r.error), "stopped": sum(1 for s in samples if s.finish_reason == "stop"),
            "texts": [s.text for s in samples]}


def compile_times(engine: Any) -> dict[str, Any]:
    """Per bench schema: the first matcher (compiled: cold) and the next (copied from the worker's cache)."""
    from contract.structured import Constraint, compact
    from workers.grammar import Grammars

    grammars = Grammars(engine.tokenizer, engine.model.config.vocab_size, engine.eos_ids)
    started = time.perf_counter()
    grammars._tokenizer()  # once per worker, on its first constrained row
    out: dict[str, Any] = {"tokenizer_ms": round((time.perf_counter() - started) * 1e3, 1), "schemas": {}}
    for name, schema in {**SCHEMAS, "workload": WORKLOAD_SCHEMA}.items():
        constraint = Constraint("json_schema", compact(schema))
        times = []
        for _ in range(2):
            started = time.perf_counter()
            grammars.matcher(constraint)
            times.append((time.perf_counter() - started) * 1e3)
        out["schemas"][name] = {"cold_ms": round(times[0], 2), "cached_ms": round(times[1], 3)}
    return out


def measure(prompts: Path, requests: int | None, dtype: str) -> dict[str, Any]:
    from contract.registry import resolve
    from contract.structured import Constraint, compact
    from workers.engine import Engine

    lines = read_lines(prompts)[:requests]
    engine = Engine.load(resolve(MODEL), "cpu", dtype)
    out: dict[str, Any] = {"requests": len(lines), "dtype": dtype, "compile": compile_times(engine)}
    constraint = Constraint("json_schema", compact(WORKLOAD_SCHEMA))

    def constrained() -> list[Any]:
        reqs = to_requests(lines)
        for r in reqs:
            r.params.constraint = constraint
        return reqs

    engine.generate(to_requests(lines[:4]))  # warm-up
    runs = {"free": _timed(engine, to_requests(lines)), "constrained": _timed(engine, constrained()),
            "free again": _timed(engine, to_requests(lines))}
    valid = 0
    for text in runs["constrained"].pop("texts"):
        try:
            json.loads(text)
            valid += 1
        except ValueError:
            pass
    runs["constrained"]["parsing"] = valid
    for run in runs.values():
        run.pop("texts", None)
    free = (runs["free"]["tokens_per_s"] + runs["free again"]["tokens_per_s"]) / 2
    out["runs"] = runs
    out["ratio"] = round(runs["constrained"]["tokens_per_s"] / free, 3) if free else None
    return out


def section(result: dict[str, Any]) -> list[str]:
    """The report's lines for bench.run."""
    if not result:
        return []
    lines = ["## Structured output", ""]
    if "error" in result:
        return [*lines, f"Not measured: {result['error']}", ""]
    runs = result["runs"]
    lines += [
        (f"The bench workload ({result['requests']} requests, {result['dtype']}) with the JSON schema "
         "`bench.structured.WORKLOAD_SCHEMA` on every request, between two runs of the same requests without "
         f"(llguidance masks, workers.grammar). Target: constrained ≥ {TARGET}× the mean of the free runs."),
        "",
        "| run | tokens | seconds | tokens/s | ended 'stop' | answers that parse |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, run in runs.items():
        lines.append(f"| {name} | {run['tokens']} | {run['seconds']} | {run['tokens_per_s']} | {run['stopped']} | {run.get('parsing', '')} |")
    ratio = result["ratio"]
    met = "met" if ratio is not None and ratio >= TARGET else "**missed**"
    lines += ["", f"Constrained ÷ free: {ratio}× ({met}).", ""]
    compiled = result["compile"]
    lines += [
        f"Compile time per schema (llguidance; the worker's tokenizer, built once: {compiled['tokenizer_ms']} ms):",
        "",
        "| schema | cold | cached (a copy of the compiled matcher) |",
        "|---|---:|---:|",
        *(f"| {name} | {t['cold_ms']} ms | {t['cached_ms']} ms |" for name, t in compiled["schemas"].items()),
        "",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    result = measure(args.prompts, args.requests, args.dtype)
    args.out.write_text(json.dumps(result, indent=1))
    print("\n".join(section(result)))


if __name__ == "__main__":
    main()
