"""OpenAI's frequency/presence penalties and logprobs, per row, in the engine."""
from __future__ import annotations

import math

import pytest
import torch

from workers.engine import Engine
from contract.registry import TINY, resolve
from workers.types import GenerationRequest, SamplingParams


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load(resolve(TINY), "cpu", "float32")


def _one(engine: Engine, **params) -> object:  # type: ignore[no-untyped-def]
    return engine.generate([GenerationRequest(SamplingParams(**params), prompt="the the the the")])[0]


def test_presence_penalty_changes_greedy_output_and_frequency_penalty_limits_repeats(engine: Engine) -> None:
    plain = _one(engine, temperature=0, max_new_tokens=24)
    penalised = _one(engine, temperature=0, max_new_tokens=24, presence_penalty=2.0, frequency_penalty=2.0)
    assert plain.samples[0].text != penalised.samples[0].text
    ids = engine.tokenizer(penalised.samples[0].text, add_special_tokens=False).input_ids
    plain_ids = engine.tokenizer(plain.samples[0].text, add_special_tokens=False).input_ids
    assert len(set(ids)) / len(ids) > len(set(plain_ids)) / len(plain_ids)


def test_penalties_per_row_in_one_batch_equal_alone(engine: Engine) -> None:
    params = [
        SamplingParams(temperature=0, max_new_tokens=12, presence_penalty=1.5),
        SamplingParams(temperature=0.9, seed=3, max_new_tokens=12, frequency_penalty=0.7),
        SamplingParams(temperature=0, max_new_tokens=12),
    ]
    requests = [GenerationRequest(p, prompt=f"prompt {i} a a a") for i, p in enumerate(params)]
    together = [r.samples[0].text for r in engine.generate(requests)]
    alone = [engine.generate([r])[0].samples[0].text for r in requests]
    assert together == alone


def test_logprobs_are_the_models_own(engine: Engine) -> None:
    result = _one(engine, temperature=0, max_new_tokens=6, logprobs=True, top_logprobs=3)
    sample = result.samples[0]
    assert sample.logprobs is not None and len(sample.logprobs) == sample.completion_tokens
    first = sample.logprobs[0]
    assert len(first["top_logprobs"]) == 3
    # greedy: the chosen token is the most likely one, and its logprob matches the model's log-softmax
    assert first["token"] == first["top_logprobs"][0]["token"]
    assert math.isclose(first["logprob"], first["top_logprobs"][0]["logprob"], rel_tol=1e-6)
    prompt_ids = engine.tokenizer("the the the the", add_special_tokens=False).input_ids
    with torch.inference_mode():
        logits = engine.model(torch.tensor([prompt_ids])).logits[0, -1]
    expected = logits.float().log_softmax(-1).max().item()
    assert math.isclose(first["logprob"], expected, abs_tol=1e-4)
    assert "".join(entry["token"] for entry in sample.logprobs) == sample.text
    without = _one(engine, temperature=0, max_new_tokens=6)
    assert without.samples[0].logprobs is None and without.samples[0].text == sample.text


def test_static_batches_honour_penalties_and_logprobs_like_the_continuous_path(engine: Engine) -> None:
    """Architectures workers.decoder does not run (static batches on transformers' forward) sample through the
    same per-row state: OpenAI penalties and logprobs are no longer refused there."""
    static = Engine(engine.model, engine.tokenizer, "cpu", engine.model_name, engine.dtype, static_batches=True)
    requests = [
        GenerationRequest(SamplingParams(temperature=0, max_new_tokens=10, presence_penalty=1.5, logprobs=True, top_logprobs=2), prompt="a b a b"),
        GenerationRequest(SamplingParams(temperature=0.8, seed=5, max_new_tokens=10, frequency_penalty=0.9), prompt="one two"),
    ]
    expected = engine.generate(requests)
    got = static.generate(requests)
    assert [r.error for r in got] == [None, None]
    assert [r.samples[0].text for r in got] == [r.samples[0].text for r in expected]
    ours, theirs = got[0].samples[0].logprobs, expected[0].samples[0].logprobs
    assert ours is not None and theirs is not None and len(ours) == len(theirs) == got[0].samples[0].completion_tokens
    assert all(math.isclose(a["logprob"], b["logprob"], abs_tol=1e-3) for a, b in zip(ours, theirs))
