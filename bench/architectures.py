"""Each architecture of the fast engine at SmolLM2-135M's size (random weights, SmolLM2's tokenizer): our engine
against transformers' static batches on the bench workload's prompts and output lengths, bfloat16 on the CPU.

    python -m bench.architectures --arch qwen2 --out result.json [--prompts P] [--requests N]

One architecture per process (bench.run starts one per architecture, so that each run's memory is its own). Output
lengths are fixed: end-of-sequence is ignored on both sides, so every request generates its line's
max_new_tokens and both sides generate the same number of tokens; each line's own sampling values are kept.
The static side is bench.measure's (b): transformers' generate over batches of up to 64 requests with identical
parameters, left padding. Random weights cost what trained ones do.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench.workload import DEFAULT_PROMPTS, cpu_seconds, peak_rss_mib, prompt_ids, read_lines, to_requests

SMOLLM2_SHAPE = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
)
"""SmolLM2-135M's decoder (head_dim 64); each architecture keeps its own extras at their usual settings."""
GEMMA = dict(head_dim=64, query_pre_attn_scalar=64)
ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gemma3")
STATIC_BATCH = 64


def config_of(arch: str, vocab: int):  # -> PretrainedConfig
    import transformers

    shape = dict(SMOLLM2_SHAPE, vocab_size=vocab)
    return {
        "llama": lambda: transformers.LlamaConfig(**shape),
        "qwen2": lambda: transformers.Qwen2Config(**shape),
        "qwen3": lambda: transformers.Qwen3Config(**shape, head_dim=64),
        "mistral": lambda: transformers.MistralConfig(**shape, sliding_window=4096),
        "phi3": lambda: transformers.Phi3Config(**shape, sliding_window=2047),
        "gemma2": lambda: transformers.Gemma2Config(**shape, **GEMMA, sliding_window=4096),
        "gemma3": lambda: transformers.Gemma3TextConfig(**shape, **GEMMA, sliding_window=512),
    }[arch]()


def random_model(arch: str, tokenizer):  # -> PreTrainedModel, bfloat16, eval
    import torch
    import transformers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config_of(arch, len(tokenizer)), dtype=torch.bfloat16)
    model.generation_config.eos_token_id = None  # fixed output lengths
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval().requires_grad_(False)


def fixed_lengths(lines: list[dict[str, Any]]):  # -> list[GenerationRequest]
    requests = to_requests(lines)
    for request in requests:
        request.params.stop = []
    return requests


def measure_engine(model, tokenizer, lines: list[dict[str, Any]]) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    from workers.engine import Engine

    engine = Engine(model, tokenizer, "cpu", "random", "bfloat16", max_batch_rows=64)
    assert engine.continuous, f"{type(model).__name__} is not on the fast engine"
    engine.eos_ids = frozenset()  # fixed output lengths
    engine.generate(fixed_lengths(lines[:2]))  # warm-up
    started, cpu = time.perf_counter(), cpu_seconds()
    results = engine.generate(fixed_lengths(lines))
    seconds = time.perf_counter() - started
    tokens = sum(s.completion_tokens for r in results for s in r.samples)
    return dict(tokens=tokens, seconds=seconds, cpu_seconds=cpu_seconds() - cpu)


def measure_static(model, tokenizer, lines: list[dict[str, Any]]) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    import torch

    from bench.measure import hf_kwargs, static_batches

    requests = fixed_lengths(lines)
    batches = static_batches(requests, STATIC_BATCH)

    def run(batch: list[int]) -> int:
        texts = [tokenizer.decode(prompt_ids(tokenizer, requests[i])) for i in batch]
        encoded = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")  # left padding
        torch.manual_seed(requests[batch[0]].params.seed or 0)
        kwargs = hf_kwargs(requests[batch[0]].params, [], tokenizer.pad_token_id) | {"eos_token_id": None}
        with torch.inference_mode():
            out = model.generate(**encoded, **kwargs)
        return out[:, encoded.input_ids.shape[1] :].numel()

    run(batches[0][:1])  # warm-up
    started, cpu = time.perf_counter(), cpu_seconds()
    tokens = sum(run(batch) for batch in batches)
    return dict(tokens=tokens, seconds=time.perf_counter() - started, cpu_seconds=cpu_seconds() - cpu)


def measure(arch: str, prompts: Path, requests: int | None) -> dict[str, Any]:
    from contract.registry import SMOLLM2_GGUF, smollm2_dir
    from workers.loader import load_gguf_tokenizer

    tokenizer = load_gguf_tokenizer(str(smollm2_dir()), SMOLLM2_GGUF)
    tokenizer.padding_side = "left"
    lines = read_lines(prompts)[:requests]
    model = random_model(arch, tokenizer)
    engine = measure_engine(model, tokenizer, lines)
    static = measure_static(model, tokenizer, lines)
    ratio = (engine["tokens"] / engine["seconds"]) / (static["tokens"] / static["seconds"])
    return dict(architecture=type(model).__name__, requests=len(lines), engine=engine, static=static, ratio=ratio,
                rss_mib=peak_rss_mib())


def section(results: dict[str, dict[str, Any]]) -> list[str]:
    """The report's lines for bench.run: one row per architecture measured."""
    if not results:
        return []
    rows = []
    for arch, r in results.items():
        if "ratio" not in r:
            rows.append(f"| {arch} | – | – | – | {r.get('error', 'no result')} |")
            continue
        engine, static = r["engine"]["tokens"] / r["engine"]["seconds"], r["static"]["tokens"] / r["static"]["seconds"]
        rows.append(f"| {r['architecture']} | {engine:.0f} | {static:.0f} | {r['ratio']:.2f}× | {'met' if r['ratio'] >= 2 else '**missed**'} |")
    return [
        "## Every architecture of the fast engine",
        "",
        "Each at SmolLM2-135M's size with random weights (`bench/architectures.py`), bfloat16, the workload's prompts and",
        "max_new_tokens with end-of-sequence ignored (every request generates all its tokens, on both sides): our",
        "engine against transformers' static batches of up to 64 identical-parameter requests. Target: 2× or more.",
        "",
        "| architecture | engine tokens/s | static tokens/s | ratio | ≥ 2× |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=ARCHITECTURES, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    parser.add_argument("--requests", type=int, default=None, help="Only the first N requests.")
    args = parser.parse_args()
    args.out.write_text(json.dumps(measure(args.arch, args.prompts, args.requests)))


if __name__ == "__main__":
    main()
