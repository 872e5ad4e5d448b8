"""Which grammar library enforces structured output: compile time (cold and cached) and per-token mask time of the
bench schemas (bench/schemas.py) on SmolLM2's tokenizer, for llguidance, xgrammar and outlines-core.

    python -m bench.grammar_libs [--steps 200]

A library that is not installed is skipped. Each mask is computed for one row, on this machine's CPU, while a
seeded random walk over the allowed tokens drives the matcher (the walk restarts when the grammar completes).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

from bench.schemas import SCHEMAS


def _tokenizer():  # type: ignore[no-untyped-def]
    from contract.registry import SMOLLM2, resolve
    from workers.loader import load_gguf_tokenizer

    spec = resolve(SMOLLM2)
    assert spec.gguf_file is not None
    return load_gguf_tokenizer(spec.path, spec.gguf_file)


def _walk(steps: int, mask: Callable[[], list[int]], accept: Callable[[int], None], done: Callable[[], bool],
          reset: Callable[[], None]) -> float:
    """Mean seconds of one mask over `steps` steps of a seeded random walk."""
    rng = random.Random(0)
    times = []
    for _ in range(steps):
        if done():
            reset()
        start = time.perf_counter()
        allowed = mask()
        times.append(time.perf_counter() - start)
        accept(rng.choice(allowed))
    return statistics.mean(times)


def llguidance_row(tokenizer: Any, schema: dict[str, Any], steps: int) -> dict[str, float]:
    import llguidance
    import llguidance.hf
    import torch
    from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask

    start = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tokenizer)
    tokenizer_s = time.perf_counter() - start
    start = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
    proto = llguidance.LLMatcher(lltok, grammar)
    assert not proto.is_error(), proto.get_error()
    cold = time.perf_counter() - start
    start = time.perf_counter()
    matcher = proto.deep_copy()  # the worker's cache: one compiled matcher per schema, a copy per row
    cached = time.perf_counter() - start
    vocab = len(tokenizer)
    bitmask = allocate_token_bitmask(1, vocab)
    bits = torch.arange(32, dtype=torch.int32)

    def mask() -> list[int]:
        fill_next_token_bitmask(matcher, bitmask)
        allowed = ((bitmask[0, :, None] >> bits) & 1).flatten()[:vocab]
        return allowed.nonzero().flatten().tolist()

    mean = _walk(steps, mask, matcher.consume_token, matcher.is_stopped, matcher.reset)
    return {"tokenizer_s": tokenizer_s, "compile_cold_s": cold, "compile_cached_s": cached, "mask_s": mean}


def xgrammar_row(tokenizer: Any, schema: dict[str, Any], steps: int) -> dict[str, float]:
    import torch
    import xgrammar as xgr

    start = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
    tokenizer_s = time.perf_counter() - start
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True)
    text = json.dumps(schema)
    start = time.perf_counter()
    compiled = compiler.compile_json_schema(text)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    compiled = compiler.compile_json_schema(text)
    matcher = xgr.GrammarMatcher(compiled)
    cached = time.perf_counter() - start
    vocab = len(tokenizer)
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
    bits = torch.arange(32, dtype=torch.int32)

    def mask() -> list[int]:
        matcher.fill_next_token_bitmask(bitmask)
        allowed = ((bitmask[0, :, None] >> bits) & 1).flatten()[:vocab]
        return allowed.nonzero().flatten().tolist()

    mean = _walk(steps, mask, matcher.accept_token, matcher.is_terminated, matcher.reset)
    return {"tokenizer_s": tokenizer_s, "compile_cold_s": cold, "compile_cached_s": cached, "mask_s": mean}


def _byte_vocabulary(tokenizer: Any) -> dict[bytes, list[int]]:
    """Each token's bytes (SmolLM2's tokenizer is byte-level BPE: GPT-2's byte-to-character table)."""
    table = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = table[:]
    n = 0
    for b in range(256):
        if b not in table:
            table.append(b)
            chars.append(256 + n)
            n += 1
    decode = {chr(c): b for b, c in zip(table, chars)}
    vocab: dict[bytes, list[int]] = {}
    special = set(tokenizer.all_special_ids)
    for token, token_id in tokenizer.get_vocab().items():
        if token_id in special:
            continue
        if all(ch in decode for ch in token):
            vocab.setdefault(bytes(decode[ch] for ch in token), []).append(token_id)
    return vocab


def outlines_row(tokenizer: Any, schema: dict[str, Any], steps: int) -> dict[str, float]:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    start = time.perf_counter()
    vocabulary = Vocabulary(tokenizer.eos_token_id, _byte_vocabulary(tokenizer))
    tokenizer_s = time.perf_counter() - start
    start = time.perf_counter()
    index = Index(build_regex_from_schema(json.dumps(schema)), vocabulary)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    guide = Guide(index)
    cached = time.perf_counter() - start
    mean = _walk(steps, guide.get_tokens, guide.advance, guide.is_finished, guide.reset)
    return {"tokenizer_s": tokenizer_s, "compile_cold_s": cold, "compile_cached_s": cached, "mask_s": mean}


LIBRARIES = {"llguidance": llguidance_row, "xgrammar": xgrammar_row, "outlines-core": outlines_row}


def measure(steps: int) -> list[dict[str, Any]]:
    tokenizer = _tokenizer()
    rows = []
    for library, row in LIBRARIES.items():
        for name, schema in SCHEMAS.items():
            try:
                figures: dict[str, Any] = row(tokenizer, schema, steps)
            except ImportError as exc:
                figures = {"error": f"not installed ({exc.name})"}
            except Exception as exc:  # noqa: BLE001 (a library that cannot compile a schema is a finding, not a crash)
                figures = {"error": f"{type(exc).__name__}: {str(exc)[:80]}"}
            rows.append({"library": library, "schema": name, **figures})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| library | schema | tokenizer setup | compile, cold | compile, cached | mask per token |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['library']} | {r['schema']} | {r['error']} | | | |")
            continue
        lines.append(
            f"| {r['library']} | {r['schema']} | {r['tokenizer_s'] * 1e3:.0f} ms | {r['compile_cold_s'] * 1e3:.1f} ms "
            f"| {r['compile_cached_s'] * 1e3:.2f} ms | {r['mask_s'] * 1e6:.0f} µs |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    print(table(measure(parser.parse_args().steps)))


if __name__ == "__main__":
    main()
