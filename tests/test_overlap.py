"""Overlapped decode steps (workers.scheduler.Scheduler.step: step N+1 is launched before step N's tokens are
recorded, so that a GPU computes while the host does its bookkeeping), checked on the CPU: the same texts as steps
one after the other, whatever joins, ends, runs out of memory or needs its tokens at once."""
from __future__ import annotations

import pytest

from contract.structured import CHOICE, Constraint, compact
from tests.test_engine import PROMPTS, cache_dir, engine  # noqa: F401
from tests.test_engine_batching import Recorder, one_at_a_time, varied_requests
from tests.test_graphs import more_requests
from tests.test_sync_free import mixed_requests, steps_each_reading_once
from workers.engine import Engine
from workers.rows import Row, start_row
from workers.scheduler import Scheduler
from workers.speculation import EXPLORE_EVERY, EXPLORE_WIDTH, SpeculationPolicy, may_verify
from workers.types import GenerationRequest, SamplingParams


def make(engine: Engine, overlap: bool, gpu_path: bool = False, **kwargs) -> Engine:  # noqa: F811
    """gpu_path: what a CUDA engine runs besides the overlap: decode and draw graphs (run eagerly here), sort-free."""
    made = Engine(
        engine.model, engine.tokenizer, "cpu", engine.model_name, engine.dtype, overlap=overlap, cuda_graphs=gpu_path,
        **{"speculative_tokens": 0, **kwargs},
    )
    assert isinstance(made.scheduler, Scheduler) and made.scheduler.overlap == overlap
    made.scheduler.batch.sort_free = gpu_path
    return made


def run_counting_overlaps(made: Engine, requests: list[GenerationRequest]) -> tuple[list, int]:
    """generate(), and how many steps left a decode step in flight."""
    for i, request in enumerate(requests):
        made.submit(i, request)
    results, in_flight = {}, 0
    while not made.idle:
        results.update(made.step())
        in_flight += made.scheduler.pending is not None  # type: ignore[attr-defined]
    return [results[i] for i in range(len(requests))], in_flight


@pytest.mark.parametrize("gpu_path", [False, True], ids=["cpu-path", "gpu-path"])
def test_overlapped_steps_give_the_texts_of_steps_one_after_the_other(engine: Engine, gpu_path: bool):  # noqa: F811
    """Every way of sampling (penalties, logit bias, min_tokens, logprobs, stop strings, n > 1), rows ending at
    every step and joining while a step is in flight."""
    held = [  # the stop token is all a row would pick, once min_tokens lets it: it ends at its first allowed step
        GenerationRequest(SamplingParams(max_new_tokens=12, temperature=0.0, min_tokens=m, stop_token_ids=[1000],
                                         logit_bias={1000: 100.0}), prompt=PROMPTS[m % 4])
        for m in (1, 2, 5)
    ]
    requests = mixed_requests() + more_requests() + varied_requests(12, seed=3) + held
    expected = make(engine, False, gpu_path, max_batch_rows=16).generate(requests)
    results, in_flight = run_counting_overlaps(make(engine, True, gpu_path, max_batch_rows=16), requests)
    assert [r.samples[0].completion_tokens for r in expected[-3:]] == [1, 2, 5]  # the stop token is not counted
    assert results == expected
    assert in_flight >= 30  # nearly every step ran ahead


def test_rows_submitted_between_overlapped_steps_give_what_they_give_alone(engine: Engine):  # noqa: F811
    """As a worker drives the engine: new requests arrive while a step is in flight; few slots, so rows join as
    soon as others leave, and the batch empties and refills."""
    requests = varied_requests(18, seed=11)
    busy = make(engine, True, max_batch_rows=4)
    results: dict[int, object] = {}
    for wave in range(0, len(requests), 3):
        for i in range(wave, wave + 3):
            busy.submit(i, requests[i])
        for _ in range(4 + wave % 5):
            results.update(busy.step())
    while not busy.idle:
        results.update(busy.step())
    assert [results[i] for i in range(len(requests))] == one_at_a_time(make(engine, False), requests)


def test_an_overlapped_step_reads_the_device_once(engine: Engine):  # noqa: F811
    """Once per step (the last step's tokens); a step that admits rows reads their first tokens too."""
    busy = make(engine, True, gpu_path=True, max_batch_rows=16)
    busy.eos_ids = frozenset()
    for i, request in enumerate(mixed_requests()):
        busy.submit(i, request)
    steps, retired = steps_each_reading_once(busy)
    assert steps >= 20 and retired == 14


def test_rows_with_a_grammar_or_drafts_run_steps_one_after_the_other(engine: Engine):  # noqa: F811
    """A grammar's next mask and a draft both need the last token on the host: no step runs ahead of them. Steps
    run ahead again once the speculation policy has measured that no verify pass can pay."""
    colours = Constraint(CHOICE, compact(["red", "green", "blue"]))
    requests = [GenerationRequest(SamplingParams(max_new_tokens=8, constraint=colours, seed=3), prompt="Colour:")] + more_requests()[:6]
    expected = make(engine, False, max_batch_rows=8).generate(requests)
    guided = make(engine, True, max_batch_rows=8)
    for i, request in enumerate(requests):
        guided.submit(i, request)
    results: dict[int, object] = {}
    while not guided.idle:
        results.update(guided.step())
        scheduler = guided.scheduler
        assert scheduler.pending is None or not scheduler.batch.guided  # type: ignore[attr-defined]
    assert [results[i] for i in range(len(requests))] == expected
    requests = more_requests() * 2
    expected = make(engine, False, max_batch_rows=8).generate(requests)
    for measured in (False, True):
        drafted = make(engine, True, max_batch_rows=8, speculative_tokens=4)
        scheduler = drafted.scheduler
        verify = scheduler.runner.verify  # type: ignore[attr-defined]

        widths: list[int] = []

        def verify_alone(cache, chunks, scheduler=scheduler, verify=verify):  # type: ignore[no-untyped-def]
            assert scheduler.pending is None, "a verify pass while a step is in flight"
            widths.append(max(map(len, chunks)))
            return verify(cache, chunks)

        scheduler.runner.verify = verify_alone  # type: ignore[attr-defined]
        if measured:  # a card where a verify pass costs 4x a decode step, and a worker whose drafts were never kept
            for _ in range(6):
                scheduler.speculation.record_step(8, 1, 0.010)  # type: ignore[attr-defined]
                scheduler.speculation.record_step(8, 5, 0.040)  # type: ignore[attr-defined]
            scheduler.speculation.prior = 0.0  # type: ignore[attr-defined]
        results_drafted, in_flight = run_counting_overlaps(drafted, requests)
        assert results_drafted == expected
        if measured:  # nearly every step runs ahead; the rest explore (one short verify step in EXPLORE_EVERY)
            assert in_flight >= 30 and 1 <= len(widths) <= in_flight // EXPLORE_EVERY + 1
            assert max(widths) <= 1 + EXPLORE_WIDTH


def test_out_of_memory_with_a_step_in_flight_restarts_its_rows(engine: Engine):  # noqa: F811
    """The rows of a step in flight (some of them already ended) start over with fewer rows at once, exactly."""
    requests = varied_requests(10, seed=21)
    squeezed = make(engine, True, max_batch_rows=8)
    recorder = Recorder(squeezed, fail_above=3)
    assert squeezed.generate(requests) == one_at_a_time(make(engine, False), requests)
    assert recorder.failures >= 1 and max(recorder.decodes) <= 3


def test_a_verify_pass_may_pay_until_measured_and_then_as_its_best_case_says():
    policy = SpeculationPolicy(max_tokens=4)
    states = [start_row(Row(i, 0, [1, 2, 3, 1, 2], SamplingParams(max_new_tokens=50, temperature=0), None)) for i in range(8)]
    assert may_verify(policy, states)  # nothing measured: the policy still probes
    for _ in range(6):  # a decode step of 8 rows: 10 ms; a verify pass of 8 rows x 4 extra positions: 40 ms
        policy.record_step(8, 1, 0.010)
        policy.record_step(8, 5, 0.040)
    assert policy.cost.known
    for state in states:  # rows whose drafts were never kept
        state.acceptance.record(4, 0)
        state.acceptance.record(4, 0)
    assert not may_verify(policy, states)
    for state in states:  # rows that keep every draft token: four more tokens for 4x the time pays with margin
        for _ in range(20):
            state.acceptance.record(4, 4)
    policy.cost = type(policy.cost)()
    for _ in range(6):  # now a verify pass costs little more than a decode step
        policy.record_step(8, 1, 0.010)
        policy.record_step(8, 5, 0.012)
    assert may_verify(policy, states)
