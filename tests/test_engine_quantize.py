"""Precision and quantization per worker: what runs on the CPU loads and generates, what cannot is refused at start."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from click.testing import CliRunner

from bench.workload import perplexity
from tests.test_engine import PROMPTS, _smollm2_available, cache_dir, greedy, needs_smollm2  # noqa: F401
from workers import cli
from workers.engine import Engine
from workers.quantize import check_combination
from contract.registry import SMOLLM2, TINY, resolve
from workers.types import GenerationRequest, SamplingParams


def requests() -> list[GenerationRequest]:
    return [
        GenerationRequest(greedy(8), prompt=PROMPTS[1]),
        GenerationRequest(SamplingParams(max_new_tokens=8, temperature=0.9, top_p=0.9, seed=4, n=2), prompt=PROMPTS[3]),
        GenerationRequest(SamplingParams(max_new_tokens=5, temperature=0.7, top_k=20, seed=5), messages=[{"role": "user", "content": "Hi"}]),
    ]


@pytest.mark.parametrize(("dtype", "quantize"), [("float32", "int8"), ("bfloat16", "int8"), ("bfloat16", "none")])
def test_each_cpu_mode_loads_and_generates(cache_dir, dtype: str, quantize: str):  # noqa: F811
    if not _smollm2_available():
        pytest.skip("the tiny model takes its tokenizer from the bundled SmolLM2 GGUF, which is not installed")
    engine = Engine.load(resolve(TINY), "cpu", dtype, quantize)
    assert (engine.dtype, engine.quantize) == (dtype, quantize)
    assert engine.model.model.embed_tokens.weight.dtype == getattr(torch, dtype)
    weight = engine.model.model.layers[0].mlp.down_proj.weight
    assert (type(weight) is not torch.nn.Parameter and "Int8" in type(weight).__name__) == (quantize == "int8")
    results = engine.generate(requests())
    assert [len(r.samples) for r in results] == [1, 2, 1]
    assert all(r.error is None for r in results)
    assert [s.completion_tokens for r in results for s in r.samples] == [8, 8, 8, 5]
    # Seeds still hold: a sampled request gives the same text again.
    assert engine.generate(requests()[1:2])[0] == results[1]


def test_combinations_that_cannot_run_are_refused_with_what_to_use_instead():
    assert check_combination("cpu", "float32", "none") is None
    assert check_combination("cpu", "bfloat16", "int8") is None
    assert check_combination("cuda:0", "bfloat16", "int4") is None
    assert "use float32 or bfloat16" in check_combination("cpu", "float16", "none")
    assert "int4 does not run on the CPU" in check_combination("cpu", "float32", "int4")
    assert "needs --dtype bfloat16" in check_combination("cuda:1", "float16", "int4")
    assert "quantize must be one of none, int8, int4" in check_combination("cpu", "float32", "int2")
    with pytest.raises(ValueError, match="int4 does not run on the CPU"):
        Engine.load(resolve(TINY), "cpu", "bfloat16", "int4")  # refused before anything is loaded


@pytest.mark.parametrize(("flags", "message"), [
    (["--quantize", "int4"], "int4 does not run on the CPU"),
    (["--dtype", "float16"], "float16 does not run on the CPU"),
])
def test_workers_start_refuses_them_before_starting(flags: list[str], message: str, tmp_path):
    env = {"BULKGEN_DATABASE_URL": f"sqlite:///{tmp_path / 'none.db'}", "BULKGEN_MODEL": "stand-in"}
    result = CliRunner().invoke(cli.main, ["start", "--device", "cpu", *flags], env=env)
    assert result.exit_code == 2
    assert message in result.output


@pytest.mark.slow
@needs_smollm2
def test_smollm2_int8_and_bfloat16_stay_close_to_float32(cache_dir):  # noqa: F811
    """The benchmark's quality guard, in small: perplexity of float32's greedy answers under each mode."""
    chats = [
        GenerationRequest(greedy(48), messages=[{"role": "user", "content": text}])
        for text in ("Write a short poem about a lighthouse keeper.", "Explain a rainy Monday to a five-year-old.")
    ]
    reference = Engine.load(resolve(SMOLLM2))
    answers = reference.generate(chats)
    ids = [reference.tokenizer(reference.render(c), add_special_tokens=False).input_ids for c in chats]
    pairs = [(p, reference.tokenizer(a.samples[0].text, add_special_tokens=False).input_ids) for p, a in zip(ids, answers)]
    base = perplexity(reference.model, pairs)
    del reference
    for dtype, quantize in (("float32", "int8"), ("bfloat16", "none")):
        engine = Engine.load(resolve(SMOLLM2), "cpu", dtype, quantize)
        assert abs(perplexity(engine.model, pairs) / base - 1) < 0.05, (dtype, quantize)
        assert engine.generate(chats[:1])[0].samples[0].text.strip()
