"""The benchmark's own logic: token counting, transformers' arguments, targets, the report (bench.gpu: test_gpu_bench)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench import run
from bench.measure import hf_kwargs
from bench.workload import real_tokens, to_requests
from workers.types import SamplingParams

LINES = [
    {"messages": [{"role": "user", "content": "Say hi."}], "max_new_tokens": 6, "seed": 1, "temperature": 0.7, "top_p": 0.9},
    {"messages": [{"role": "user", "content": "Name a colour."}], "max_new_tokens": 9, "seed": 2, "temperature": 0.0},
    {"prompt": "Once upon a time", "max_new_tokens": 4, "temperature": 1.0, "top_k": 50, "seed": 3},
]


def test_real_tokens_stop_at_the_first_end_of_sequence():
    assert real_tokens([5, 6, 2, 2, 2], {2}) == 2
    assert real_tokens([5, 6, 7], {2}) == 3
    assert real_tokens([2, 5], {2, 9}) == 0


def test_transformers_gets_explicit_filters_so_its_defaults_cannot_leak_in():
    sampled = hf_kwargs(SamplingParams(max_new_tokens=5, temperature=0.7), [2], 2)
    assert sampled["do_sample"] and sampled["top_k"] == 0 and sampled["top_p"] == 1.0 and sampled["temperature"] == 0.7
    greedy = hf_kwargs(SamplingParams(max_new_tokens=5, temperature=0.0), [2], 2)
    assert greedy["do_sample"] is False and greedy["top_k"] is None


def test_lines_become_requests_with_their_own_parameters():
    requests = to_requests(LINES)
    assert [r.params.max_new_tokens for r in requests] == [6, 9, 4]
    assert [r.params.top_k for r in requests] == [0, 0, 50] and requests[0].params.top_p == 0.9
    assert requests[2].prompt == "Once upon a time" and requests[0].messages is not None


def test_targets_are_judged_on_ratios_within_the_run():
    results = {
        "engine float32": {"tokens": 300, "seconds": 1.0, "perplexity": 2.0, "rss_mib": 1500, "precision": "float32", "quantize": "none"},
        "engine bfloat16": {"tokens": 900, "seconds": 1.0, "perplexity": 2.02, "rss_mib": 1200, "precision": "bfloat16", "quantize": "none"},
        "engine int8+float32": {"tokens": 100, "seconds": 1.0, "perplexity": 2.3, "rss_mib": 1100, "precision": "float32", "quantize": "int8"},
        "naive": {"tokens": 40, "seconds": 1.0, "requests": 32},
        "static": {"tokens": 100, "seconds": 1.0},
        "pipeline bfloat16": {"tokens": 800, "seconds": 1.0, "rss_mib": 2100, "precision": "bfloat16", "quantize": "none"},
    }
    verdicts = {target: met for _, target, met, _ in run.judge(results, "engine bfloat16", "pipeline bfloat16")}
    assert verdicts["engine float32 ≥ 1.5× (b)"] is True  # 3.0x
    assert verdicts["fastest mode passing the quality guard (bfloat16) ≥ 3× (b)"] is True  # 9.0x
    assert verdicts["engine (bfloat16) ≥ 25× (a)"] is False  # 22.5x
    assert verdicts["pipeline (d) ≥ 0.97× engine (c), same mode (bfloat16)"] is False  # 0.89x
    assert verdicts["worker peak RSS ≤ 2 GiB"] is False  # 2100 MiB
    assert verdicts["quality guard: int8+float32 within 5% of float32"] is False  # +15%
    text = run.report(results, {"cpu": "AMD EPYC", "cpus": "2", "simd": "avx512_bf16", "torch": "2.13", "cuda": "none"},
                      "python -m bench.run", "engine bfloat16", "pipeline bfloat16", 60.0)
    assert "| engine bfloat16 | bfloat16 | none |" in text and "**missed**" in text
    assert "the GPU benchmark is `python -m bench.gpu`" in text
    assert "(d) vs (c)" in text and "Peak RSS" in text  # the missed targets are explained


def test_the_pipeline_is_compared_with_the_engine_runs_before_and_after_it():
    results = {
        "engine float32": {"tokens": 300, "seconds": 1.0, "perplexity": 2.0, "precision": "float32", "quantize": "none"},
        "engine bfloat16": {"tokens": 900, "seconds": 1.0, "perplexity": 2.0, "precision": "bfloat16", "quantize": "none"},
        "naive": {"tokens": 40, "seconds": 1.0},
        "static": {"tokens": 100, "seconds": 1.0},
        "pipeline bfloat16": {"tokens": 780, "seconds": 1.0, "precision": "bfloat16", "quantize": "none",
                              "submit_seconds": 0.5, "occupancy": {"while_requests_waited": 0.95, "until_last_5pct": 0.93, "whole_job": 0.8,
                                                                   "per_tenth_of_requests": [0.9] * 9 + [0.5]}},
        "engine bfloat16" + run.AGAIN: {"tokens": 700, "seconds": 1.0, "precision": "bfloat16", "quantize": "none"},
    }
    (verdict,) = [v for v in run.judge(results, "engine bfloat16", "pipeline bfloat16") if v[0] == "pipeline"]
    assert verdict[2] is True and verdict[3].startswith("0.97×")  # 780 against (900 + 700) / 2
    (occupancy,) = [v for v in run.judge(results, "engine bfloat16", "pipeline bfloat16") if v[0] == "occupancy"]
    assert occupancy[2] is True and occupancy[3] == "95.0% (until the last 5% of requests: 93.0%)"
    (best,) = [v for v in run.judge(results, "engine bfloat16", "pipeline bfloat16") if v[0] == "best"]
    assert best[3].startswith("8.00×")  # the mode's two runs, (900 + 700) / 2, against (b)'s 100
    results["pipeline bfloat16"]["tokens"] = 700  # 0.875x: missed, and the report says what the worker did
    text = run.report(results, {"cpu": "x", "cpus": "2", "simd": "", "torch": "2.13", "cuda": "none"}, "python -m bench.run",
                      "engine bfloat16", "pipeline bfloat16", 60.0)
    assert "(d) vs (c)** (missed in this run)" in text and "`producer submit` (0.5 s of this run" in text
    assert "| pipeline bfloat16 | 1 | – | 700.0 | 95.0% | 93.0% | 80.0% | 90% |" in text  # the occupancy table


def test_every_benchmarked_architecture_is_on_the_fast_engine_and_the_report_shows_each_ratio():
    from transformers import AutoModelForCausalLM

    from bench import architectures
    from workers.architectures import ARCHITECTURES

    for arch in architectures.ARCHITECTURES:
        config = architectures.config_of(arch, 1000)
        assert AutoModelForCausalLM._model_mapping[type(config)].__name__ in ARCHITECTURES, arch
    measured = {
        "qwen2": {"architecture": "Qwen2ForCausalLM", "ratio": 2.5, "engine": {"tokens": 500, "seconds": 1.0},
                  "static": {"tokens": 500, "seconds": 2.5}},
        "gemma2": {"architecture": "Gemma2ForCausalLM", "ratio": 1.5, "engine": {"tokens": 300, "seconds": 1.0},
                   "static": {"tokens": 300, "seconds": 2.0}},
        "phi3": {"error": "killed"},
    }
    text = "\n".join(architectures.section(measured))
    assert "| Qwen2ForCausalLM | 500 | 200 | 2.50× | met |" in text
    assert "| Gemma2ForCausalLM | 300 | 150 | 1.50× | **missed** |" in text and "| phi3 | – | – | – | killed |" in text
    assert architectures.section({}) == []
