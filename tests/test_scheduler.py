"""The scheduler on the tiny model: rows added while others run, cache reshaping, dropping, occupancy."""
from __future__ import annotations

from collections.abc import Callable

import torch

from tests.test_engine import PROMPTS, cache_dir, engine, greedy  # noqa: F401
from tests.test_engine_batching import fresh, one_at_a_time, varied_requests
from workers.engine import Engine
from workers.rows import expand_rows
from workers.scheduler import Scheduler, slot_length
from workers.types import GenerationRequest


def scheduler_of(engine: Engine, max_rows: int = 8, max_tokens: int = 4096) -> Scheduler:  # noqa: F811
    assert engine.runner is not None
    return Scheduler(engine.runner, engine.tokenizer, engine.eos_ids, torch.device("cpu"), max_rows, max_tokens)


def ids_of(engine: Engine, text: str) -> list[int]:  # noqa: F811
    return engine.tokenizer(text, add_special_tokens=False).input_ids


def run_in_waves(live: Engine, requests: list[GenerationRequest], waves: dict[int, range],
                 after_step: Callable[[int], None]) -> dict[int, object]:
    """Submit the requests of waves[0], then step live until it is idle; after step k, submit those of waves[k]
    (more work arriving mid-batch, as from the next queue messages), then call after_step(k). The results by index."""
    results: dict[int, object] = {}
    for i in waves[0]:
        live.submit(i, requests[i])
    steps = 0
    while not live.idle:
        results.update(live.step())
        steps += 1
        for i in waves.get(steps, ()):
            live.submit(i, requests[i])
        after_step(steps)
    return results


def test_slot_lengths_round_up_by_at_most_an_eighth() -> None:
    for n in range(1, 5000):
        assert n <= slot_length(n) <= n + max(1, n // 8 + 1)


def test_requests_submitted_while_others_run_give_what_they_give_alone(engine: Engine) -> None:  # noqa: F811
    requests = varied_requests(18, seed=21)
    live = fresh(engine, max_batch_rows=6)

    def still_running(step: int) -> None:
        if step in (3, 9):
            assert live.running_rows > 0

    results = run_in_waves(live, requests, {0: range(6), 3: range(6, 12), 9: range(12, 18)}, still_running)
    assert [results[i] for i in range(18)] == one_at_a_time(fresh(engine), requests)


def test_a_longer_row_reshapes_the_cache_and_short_rows_get_their_slots_back(engine: Engine) -> None:  # noqa: F811
    scheduler = scheduler_of(engine, max_rows=8, max_tokens=8 * 48)
    short = ids_of(engine, PROMPTS[0])
    scheduler.add(expand_rows("s", short, greedy(20)))
    scheduler.step()
    assert scheduler.cache is not None
    short_capacity, short_slots = scheduler.cache.capacity, scheduler.slots
    assert short_slots == 8
    scheduler.add(expand_rows("long", short * 20, greedy(60)))
    finished = []
    while not scheduler.idle:
        finished += scheduler.step()
        if any(s.row.request == "long" for s in scheduler.batch.states):
            assert scheduler.cache.capacity >= len(short) * 20 + 60 and scheduler.slots < short_slots
    assert {f.row.request for f in finished} == {"s", "long"} and all(f.error is None for f in finished)
    scheduler.add(expand_rows("s2", short, greedy(20)))
    scheduler.step()
    assert scheduler.cache.capacity == short_capacity and scheduler.slots == 8


def test_dropped_waiting_rows_never_run_and_running_ones_finish(engine: Engine) -> None:  # noqa: F811
    live = fresh(engine, max_batch_rows=2)
    for i in range(5):
        live.submit(i, GenerationRequest(greedy(8), prompt=PROMPTS[i % 4]))
    live.step()
    assert live.running_rows == 2 and live.waiting_rows == 3
    live.drop({0, 3, 4})
    assert live.waiting_rows == 1
    results = {}
    while not live.idle:
        results.update(live.step())
    assert sorted(results) == [1, 2]


def test_every_decode_step_reports_its_occupancy(engine: Engine) -> None:  # noqa: F811
    live = fresh(engine, max_batch_rows=4)
    seen: list[tuple[int, int]] = []
    live.on_step(lambda running, slots: seen.append((running, slots)))
    live.generate([GenerationRequest(greedy(3 + i), prompt=PROMPTS[i % 4]) for i in range(6)])
    assert seen and all(0 < running <= slots == 4 for running, slots in seen)
    assert seen[0][0] == 4 and seen[-1][0] < 4


def test_the_cache_holds_slots_for_the_rows_that_joined_not_for_the_budget(engine: Engine) -> None:  # noqa: F811
    live = fresh(engine, max_batch_rows=64, batch_invariant=False)  # batch-invariant caches keep 16 slots at least
    scheduler = live.scheduler
    assert scheduler is not None
    prompt = ids_of(engine, PROMPTS[0])
    for name in "abc":
        scheduler.add(expand_rows(name, prompt, greedy(30)))
    scheduler.step()
    assert scheduler.cache is not None and scheduler.running == 3
    assert scheduler.cache.slots == 3 and scheduler.slots == 64  # 64 may run; 3 slots exist
    for i in range(20):
        scheduler.add(expand_rows(f"more{i}", prompt, greedy(30)))
    while scheduler.running < 23:
        scheduler.step()
    assert 23 <= scheduler.cache.slots <= 46


def test_rows_keep_their_text_while_the_cache_grows_under_them(engine: Engine) -> None:  # noqa: F811
    requests = varied_requests(40, seed=5)
    live = fresh(engine, max_batch_rows=64)
    sizes = set()

    def cache_size(step: int) -> None:
        assert live.scheduler is not None and live.scheduler.cache is not None
        sizes.add(live.scheduler.cache.slots)

    # waves that make the cache grow past its 16 slots while rows run
    results = run_in_waves(live, requests, {0: range(4), 2: range(4, 22), 4: range(22, 40)}, cache_size)
    assert len(sizes) >= 2 and max(sizes) > 16
    assert [results[i] for i in range(40)] == one_at_a_time(fresh(engine), requests)


def test_slots_twice_as_long_as_any_row_needs_are_cut(engine: Engine) -> None:  # noqa: F811
    scheduler = scheduler_of(engine, max_rows=8, max_tokens=64 * 1024)
    short = ids_of(engine, PROMPTS[0])
    scheduler.add(expand_rows("long", short * 20, greedy(4)))
    while not scheduler.idle:
        scheduler.step()
    assert scheduler.cache is not None
    long_capacity = scheduler.cache.capacity
    scheduler.add(expand_rows("s", short, greedy(20)))
    scheduler.step()
    assert scheduler.cache.capacity < long_capacity / 2  # the budget would allow the long slots; memory does not
