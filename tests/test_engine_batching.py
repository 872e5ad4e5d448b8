"""Continuous batching on the tiny random Llama: rows join and leave a running batch, each row's result depends on
that row alone, the token budget holds, and running out of memory splits the batch without losing a request."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from tests.test_engine import (  # noqa: F401
    PROMPTS,
    _smollm2_available,
    cache_dir,
    engine,
    greedy,
    needs_smollm2,
    reference_generate,
    text_of,
)
from workers import static_batches
from workers.engine import Engine
from contract.registry import SMOLLM2, resolve
from workers.types import GenerationRequest, SamplingParams


def fresh(engine: Engine, **kwargs) -> Engine:  # noqa: F811
    """The loaded tiny model behind a new engine (its own cache, limits and out-of-memory state)."""
    return Engine(engine.model, engine.tokenizer, "cpu", engine.model_name, engine.dtype, **kwargs)


def varied_requests(count: int, seed: int = 0) -> list[GenerationRequest]:
    """Requests with every kind of sampling parameter, prompt length and max_new_tokens."""
    requests = []
    for i in range(count):
        params = SamplingParams(
            max_new_tokens=3 + (i * 7) % 23,
            temperature=[0.0, 0.6, 1.0, 1.4][i % 4],
            top_p=[1.0, 0.8, 0.95][i % 3],
            top_k=[0, 5, 60][(i // 3) % 3],
            repetition_penalty=[1.0, 1.25][(i // 2) % 2],
            seed=seed + 10 * i,
            stop=["a"] if i % 7 == 3 else [],
            n=1 + i % 2,
        )
        requests.append(GenerationRequest(params, prompt=PROMPTS[i % len(PROMPTS)] * (1 + i % 4)))
    return requests


class Recorder:
    """Wraps a runner's extend (the scheduler's prefills) and decode: records each call's rows, and raises out
    of memory above a limit."""

    def __init__(self, engine: Engine, fail_above: int | None = None, error: type[Exception] = torch.OutOfMemoryError):  # noqa: F811
        runner = engine.runner
        assert runner is not None
        self.prefills: list[tuple[int, int]] = []  # (rows already running, rows joining)
        self.decodes: list[int] = []
        self.failures = 0
        extend, decode = runner.extend, runner.decode

        def check(rows: int) -> None:
            if fail_above is not None and rows > fail_above:
                self.failures += 1
                message = "CUDA out of memory. Tried to allocate 2.00 GiB" if error is torch.OutOfMemoryError else (
                    "DefaultCPUAllocator: can't allocate memory: you tried to allocate 2147483648 bytes."
                )
                raise error(message)

        def recording_extend(cache, first, chunks):  # type: ignore[no-untyped-def]
            check(first + len(chunks))  # the joining rows are admitted (slots first..) before their prefill
            self.prefills.append((first, len(chunks)))
            return extend(cache, first, chunks)

        def recording_decode(cache, tokens):  # type: ignore[no-untyped-def]
            check(len(tokens))
            self.decodes.append(len(tokens))
            return decode(cache, tokens)

        runner.extend = recording_extend  # type: ignore[method-assign]
        runner.decode = recording_decode  # type: ignore[method-assign]


def one_at_a_time(engine: Engine, requests: list[GenerationRequest]):  # noqa: F811
    return [engine.generate([request])[0] for request in requests]


def test_every_row_of_a_mixed_batch_equals_the_same_request_alone(engine: Engine):  # noqa: F811
    requests = varied_requests(24)
    together = fresh(engine, max_batch_rows=64).generate(requests)
    alone = one_at_a_time(fresh(engine), requests)
    assert together == alone
    assert all(result.error is None and result.samples for result in together)


def test_rows_join_while_others_run_and_finished_rows_leave(engine: Engine):  # noqa: F811
    requests = varied_requests(20, seed=5)
    small = fresh(engine, max_batch_rows=4)
    recorder = Recorder(small)
    results = small.generate(requests)
    assert results == one_at_a_time(fresh(engine), requests)
    # Waiting rows were prefilled into a batch that was already running (continuous batching) ...
    assert any(running > 0 for running, _ in recorder.prefills)
    assert max(running + joining for running, joining in recorder.prefills) <= 4
    # ... and the running batch shrank when rows finished (a finished row is not decoded again).
    assert max(recorder.decodes) <= 4 and min(recorder.decodes) < 4
    rows = sum(len(r.samples) if r.samples[0].seed is not None else 1 for r in results)
    assert sum(joining for _, joining in recorder.prefills) == rows


def test_a_seeded_request_gives_the_same_text_alone_and_in_a_batch_of_64(engine: Engine):  # noqa: F811
    target = GenerationRequest(SamplingParams(max_new_tokens=30, temperature=0.8, top_p=0.9, seed=77), prompt=PROMPTS[3])
    others = varied_requests(63, seed=1000)
    for i, other in enumerate(others):  # all in one cache-length group, so that 64 rows run together
        other.params.max_new_tokens, other.prompt, other.params.stop = 40, PROMPTS[i % len(PROMPTS)], []
    batch = others[:31] + [target] + others[31:]
    recorder_engine = fresh(engine, max_batch_rows=64)
    recorder = Recorder(recorder_engine)
    (alone,) = fresh(engine).generate([target])
    together = recorder_engine.generate(batch)
    assert together[31] == alone
    assert max(recorder.decodes) == 64


def test_the_token_budget_limits_the_rows_running_at_once(engine: Engine):  # noqa: F811
    requests = [GenerationRequest(greedy(20), prompt=PROMPTS[1]) for _ in range(6)]
    need = len(engine.tokenizer(PROMPTS[1], add_special_tokens=False).input_ids) + 20
    # two and a half rows' worth: two fit (their slots are rounded up a little, never by half a row), three do not
    budget = fresh(engine, max_batch_rows=64, max_batch_tokens=2 * need + need // 2)
    recorder = Recorder(budget)
    results = budget.generate(requests)
    assert max(recorder.decodes) == 2
    assert results == one_at_a_time(fresh(engine), requests)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, RuntimeError])
def test_out_of_memory_splits_the_batch_and_loses_nothing(engine: Engine, error: type[Exception]):  # noqa: F811
    requests = varied_requests(16, seed=3)
    expected = fresh(engine).generate(requests)
    limited = fresh(engine, max_batch_rows=16)
    recorder = Recorder(limited, fail_above=5, error=error)
    results = limited.generate(requests)
    assert recorder.failures >= 1
    assert limited.rows_limit <= 5
    assert results == expected
    assert max(recorder.decodes) <= 5


def test_out_of_memory_with_a_single_row_fails_that_request_only(engine: Engine):  # noqa: F811
    requests = [GenerationRequest(greedy(6), prompt=PROMPTS[i]) for i in range(3)]
    expected = fresh(engine).generate(requests)
    limited = fresh(engine, max_batch_rows=8)
    Recorder(limited, fail_above=0)  # not even one row fits
    results = limited.generate(requests)
    assert all(r.samples == [] and r.error.startswith("out of memory with a batch of one row") for r in results)
    assert [r.prompt_tokens for r in results] == [r.prompt_tokens for r in expected]


def test_other_errors_are_not_taken_for_out_of_memory(engine: Engine):  # noqa: F811
    limited = fresh(engine)
    Recorder(limited, fail_above=0, error=ValueError)
    with pytest.raises(ValueError):
        limited.generate([GenerationRequest(greedy(4), prompt=PROMPTS[0])])


def test_static_batches_split_on_out_of_memory_too(engine: Engine, monkeypatch: pytest.MonkeyPatch):  # noqa: F811
    """Models workers.decoder does not run decode in static batches on transformers' forward; they split as well."""
    requests = varied_requests(10, seed=9)
    static = fresh(engine, max_batch_rows=8, static_batches=True)
    expected = one_at_a_time(fresh(engine, prefix_cache_tokens=0), requests)  # static batches cache no prefix
    sizes: list[int] = []
    decode_batch = static_batches.decode_batch

    def failing(model, tokenizer, rows, eos_ids, device):  # type: ignore[no-untyped-def]
        if len(rows) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        sizes.append(len(rows))
        return decode_batch(model, tokenizer, rows, eos_ids, device)

    monkeypatch.setattr(static_batches, "decode_batch", failing)
    assert static.generate(requests) == expected
    assert sizes and max(sizes) <= 3


def test_greedy_rows_in_a_running_batch_equal_transformers_greedy(engine: Engine):  # noqa: F811
    prompts = [PROMPTS[i % 4] * (1 + i % 3) for i in range(10)]
    small = fresh(engine, max_batch_rows=3)
    results = small.generate([GenerationRequest(greedy(12), prompt=p) for p in prompts])
    for prompt, result in zip(prompts, results):
        (ids,) = reference_generate(engine, [prompt], do_sample=False, max_new_tokens=12)
        assert result.samples[0].text == text_of(engine, ids)


@pytest.mark.slow
@needs_smollm2
def test_smollm2_float32_seeded_requests_give_the_same_text_alone_and_in_a_batch_of_64(cache_dir):  # noqa: F811
    topics = ["a lighthouse", "a bakery", "solar panels", "a chess club", "a coral reef", "an old bicycle", "tea", "rain"]
    configs = [dict(temperature=0.3), dict(temperature=0.7, top_p=0.9), dict(temperature=0.8, top_p=0.95, top_k=40),
               dict(temperature=0.0), dict(temperature=1.0, top_k=50)]
    requests = [
        GenerationRequest(
            SamplingParams(max_new_tokens=40, seed=1000 + i, **configs[i % len(configs)]),
            messages=[{"role": "user", "content": f"Write two sentences about {topics[i % len(topics)]} (#{i})."}],
        )
        for i in range(64)
    ]
    engine = Engine.load(resolve(SMOLLM2))
    recorder = Recorder(engine)
    together = engine.generate(requests)
    assert max(recorder.decodes) == 64
    for i in (0, 13, 37, 62):  # sampled with each filter, and greedy
        assert engine.generate([requests[i]])[0] == together[i], i


def test_an_engine_can_be_cleared_outside_inference_mode(engine: Engine):  # noqa: F811
    """A worker clears its engine after an error, from plain code: the cache's inference tensors must not refuse it."""
    busy = fresh(engine)
    busy.submit("a", GenerationRequest(greedy(20), prompt=PROMPTS[0]))
    busy.step()
    assert busy.running_rows == 1
    assert busy.clear() == ["a"] and busy.idle and busy.running_rows == 0
    assert busy.generate([GenerationRequest(greedy(3), prompt=PROMPTS[1])])[0].error is None
