"""A decode step asks the device once (workers.syncs): counted on the CPU, on the code paths a GPU runs."""
from __future__ import annotations

import pytest
import torch

from tests.test_engine import cache_dir, engine  # noqa: F401
from workers.engine import Engine
from workers.scheduler import Scheduler
from workers.syncs import count_syncs, host_read
from workers.types import GenerationRequest, SamplingParams

SYSTEM = "You are a careful assistant who answers briefly and never repeats the question back. " * 4


def mixed_requests() -> list[GenerationRequest]:
    """Every way a row samples (greedy, top-k, top-p, both, plain, penalties, logprobs, stop strings, n > 1, min-p,
    logit bias, min_tokens, stop_token_ids, ignore_eos), with
    lengths that end rows at different steps; all behind one long shared system prompt (the cascade's base)."""
    configs = [
        dict(temperature=0.0),
        dict(temperature=0.8, top_k=20),
        dict(temperature=0.9, top_p=0.9),
        dict(temperature=0.7, top_k=40, top_p=0.95),
        dict(temperature=1.0),
        dict(temperature=0.8, top_p=0.9, repetition_penalty=1.3),
        dict(temperature=0.9, frequency_penalty=0.5, presence_penalty=0.3),
        dict(temperature=0.7, logprobs=True, top_logprobs=3),
        dict(temperature=0.0, logprobs=True, top_logprobs=0, stop=["e"]),
        dict(temperature=0.8, top_p=0.8, n=2),
        dict(temperature=0.9, min_p=0.05, logit_bias={1000: 2.0, 13: -100}),
        dict(temperature=0.0, min_tokens=4, stop_token_ids=[1000], logit_bias={1000: 1.0}),
        dict(temperature=1.0, ignore_eos=True, min_tokens=2),
    ]
    return [
        GenerationRequest(
            SamplingParams(max_new_tokens=6 + 3 * i, seed=100 + i, **config),
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Question {i}: name a colour."}],
        )
        for i, config in enumerate(configs)
    ]


def sync_free_engine(engine: Engine, batch_invariant: bool) -> Engine:  # noqa: F811
    fresh = Engine(
        engine.model, engine.tokenizer, "cpu", engine.model_name, engine.dtype, max_batch_rows=16, speculative_tokens=0,
        batch_invariant=batch_invariant,
    )
    assert isinstance(fresh.scheduler, Scheduler)
    fresh.scheduler.batch.sort_free = True  # what a CUDA engine samples with
    fresh.eos_ids = frozenset()  # rows end by their lengths and stop strings, at known steps
    return fresh


def steps_each_reading_once(busy: Engine) -> tuple[int, int]:  # noqa: F811
    """Step the engine until every submitted row runs (admission prefills read the first tokens), then until idle,
    asserting that each of those steps reads the device exactly once; (steps counted, rows retired during them)."""
    with torch.inference_mode():
        while busy.scheduler.waiting:  # type: ignore[attr-defined]
            busy.step()
        steps, retired = 0, 0
        while not busy.idle:
            running = busy.running_rows
            with count_syncs() as counted:
                busy.step()
            assert counted.calls == {"host_read": 1}, f"step {steps}: {counted.calls}"
            steps, retired = steps + 1, retired + (running - busy.running_rows)
    return steps, retired


@pytest.mark.parametrize("batch_invariant", [True, False], ids=["batch-invariant", "cascade"])
def test_a_decode_step_reads_the_device_once(engine: Engine, batch_invariant: bool):  # noqa: F811
    busy = sync_free_engine(engine, batch_invariant)
    scheduler = busy.scheduler
    assert isinstance(scheduler, Scheduler)
    for i, request in enumerate(mixed_requests()):
        busy.submit(i, request)
    if not batch_invariant:
        with torch.inference_mode():
            while scheduler.waiting:
                busy.step()
        assert scheduler.cache is not None and scheduler.cache.uses_base  # the cascade path is the one counted
    steps, retired = steps_each_reading_once(busy)
    assert steps >= 20 and retired == 14  # every row left the batch during a counted step: retirement is counted too


def test_the_count_finds_what_reads_the_device():
    """count_syncs counts each way of reading a value back, and host_read once whatever it reads."""
    x = torch.arange(6.0)
    with count_syncs() as counted:
        x.sum().item()
        bool(x.any())
        int(x[0])
        x[x > 2]
        x.nonzero()
        host_read(x, x * 2)
        x[1:3] + x.flip(0)[:2]  # no read
    assert counted.calls == {"item": 1, "__bool__": 1, "__int__": 1, "mask index": 1, "nonzero": 1, "host_read": 1}


def test_sort_free_sampling_gives_results_like_the_ranked_path(engine: Engine):  # noqa: F811
    """Same requests, same seeds: greedy rows give the same text either way, and every request completes."""
    requests = mixed_requests()
    ranked = Engine(engine.model, engine.tokenizer, "cpu", engine.model_name, engine.dtype, speculative_tokens=0).generate(requests)
    free = sync_free_engine(engine, True)
    free.eos_ids = engine.eos_ids
    got = free.generate(requests)
    assert [r.error for r in got] == [None] * len(requests)
    for i in (0, 8, 11):  # the greedy requests
        assert got[i].samples[0].text == ranked[i].samples[0].text
    assert [len(r.samples) for r in got] == [len(r.samples) for r in ranked]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_a_decode_step_makes_no_synchronising_call_but_its_one_read(engine: Engine):  # noqa: F811
    """torch's own sync debug mode, on a GPU: nothing in a decode step synchronises except host_read's event."""
    import copy
    import warnings

    model = copy.deepcopy(engine.model).to("cuda")
    busy = Engine(model, engine.tokenizer, "cuda", engine.model_name, engine.dtype, max_batch_rows=16, speculative_tokens=0,
                  batch_invariant=False)
    busy.eos_ids = frozenset()
    for i, request in enumerate(mixed_requests()):
        busy.submit(i, request)
    with torch.inference_mode():
        while busy.scheduler.waiting:
            busy.step()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            while not busy.idle:
                with warnings.catch_warnings(record=True) as caught, count_syncs() as counted:
                    warnings.simplefilter("always")
                    busy.step()
                assert counted.calls == {"host_read": 1}
                assert not [w for w in caught if "synchroniz" in str(w.message)], [str(w.message) for w in caught]
        finally:
            torch.cuda.set_sync_debug_mode("default")
