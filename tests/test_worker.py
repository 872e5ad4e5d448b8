"""The Worker in process, on a real SQLite store: a batch kept full across messages, leases for all it holds."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select

from models.db import make_engine, session_factory
from models.store import lease_lapsed
from models.tables import Job, Request, Result
from producer.export import flat_records, iter_request_results, openai_line
from producer.stats import collect
from tests.test_engine import cache_dir, engine  # noqa: F401
from tests.helpers import wait_until
from tests.test_lifecycle import job_row, make_job, requests_of
from workers.engine import Engine
from contract.settings import Settings
from workers.standin import StandInEngine
from workers.types import GenerationRequest
from workers.worker import Worker

STANDIN = "stand-in"


class TracedWorker(Worker):
    """Records (running rows, slots) at every decode step, and which message had been handed in by then."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self.trace: list[tuple[int, int, int]] = []
        self.messages_in = 0
        super().__init__(*args, **kwargs)

    def _observe_step(self, running: int, slots: int) -> None:
        self.trace.append((running, slots, self.messages_in))
        super()._observe_step(running, slots)


def set_prompts(url: str, job_id: int, model: str, max_new_tokens: int) -> None:
    with session_factory(make_engine(url))() as session:
        session.get(Job, job_id).model = model  # type: ignore[union-attr]
        session.get(Job, job_id).defaults = {"max_new_tokens": max_new_tokens, "temperature": 0}  # type: ignore[union-attr]
        for i, request in enumerate(session.scalars(select(Request).where(Request.job_id == job_id)).all()):
            request.prompt = f"Item {i}: the weather today is" + " very" * (i % 5)
        session.commit()


@pytest.fixture
def tiny_worker(sqlite_url: str, engine: Engine) -> Iterator[TracedWorker]:  # noqa: F811
    settings = Settings(database_url=sqlite_url, model=engine.model_name, lease_s=30, batch_size=8)
    live = Engine(engine.model, engine.tokenizer, "cpu", engine.model_name, engine.dtype, max_batch_rows=8)
    worker = TracedWorker(live, session_factory(make_engine(sqlite_url)), engine.model_name, "cpu", "test:1", settings)
    yield worker
    worker.shutdown(timeout=60)


def test_the_batch_stays_full_across_messages_and_every_result_is_written_once(tiny_worker: TracedWorker, sqlite_url: str) -> None:
    job_id, ids = make_job(sqlite_url, 48, model=tiny_worker.model)
    set_prompts(sqlite_url, job_id, tiny_worker.model, max_new_tokens=16)
    for start in range(0, len(ids), 4):  # as Celery would: one message after another, each as the last returns
        tiny_worker.messages_in += 1
        assert tiny_worker.handle(job_id, ids[start : start + 4]) == 4
    before_last = [(running, slots) for running, slots, seen in tiny_worker.trace if seen < tiny_worker.messages_in]
    assert tiny_worker.wait_idle(timeout=120)
    # until the last message was handed in, the engine never ran dry: rows from the next messages had joined
    assert before_last and all(running > 0 for running, _ in before_last)
    full = sum(1 for running, slots in before_last if running == slots)
    assert full >= 0.9 * len(before_last), before_last
    job = job_row(sqlite_url, job_id)
    assert (job.status, job.done_count, job.result_count) == ("completed", 48, 48)
    with session_factory(make_engine(sqlite_url))() as session:
        occupancy = session.scalars(select(Result.batch_occupancy).where(Result.job_id == job_id)).all()
    assert len(occupancy) == 48 and all(o is not None and 0 < o <= 1 for o in occupancy)
    (per_worker,) = collect(make_engine(sqlite_url), job_id)["per_worker"]  # what `producer stats` shows
    assert per_worker["worker"] == "test:1" and 0.5 < per_worker["mean_occupancy"] <= 1


class Gate(StandInEngine):
    """The stand-in, held at its first generate() until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__(STANDIN)
        self.gate = threading.Event()
        self.entered = threading.Event()

    def generate(self, requests: list[GenerationRequest]):  # type: ignore[no-untyped-def]
        self.entered.set()
        assert self.gate.wait(60), "the test never opened the gate"
        return super().generate(requests)


def gated_worker(sqlite_url: str, lease_s: int) -> tuple[Worker, Gate]:
    gated = Gate()
    settings = Settings(database_url=sqlite_url, model=STANDIN, lease_s=lease_s, batch_size=64)
    return Worker(gated, session_factory(make_engine(sqlite_url)), STANDIN, "cpu", "test:1", settings), gated


def lapsed_at(url: str, job_id: int, now: datetime) -> int:
    """How many of the job's requests the store counts as under a lapsed lease at the moment `now`."""
    db = make_engine(url)
    try:
        with session_factory(db)() as session:
            return session.scalar(select(func.count()).select_from(Request).where(Request.job_id == job_id, lease_lapsed(now))) or 0
    finally:
        db.dispose()


def test_the_lease_of_every_held_request_is_renewed_from_every_message(sqlite_url: str) -> None:
    worker, gated = gated_worker(sqlite_url, lease_s=2)
    job_id, ids = make_job(sqlite_url, 12)
    try:
        for start in range(0, 12, 4):
            worker.handle(job_id, ids[start : start + 4])  # room for 16 waiting: each returns at once
        assert gated.entered.wait(10)
        assert sorted(worker.wait_held(0) or []) == sorted(ids)
        claimed = requests_of(sqlite_url, job_id)
        # beyond the 2 s lease: only renewals keep it (the store's lease_lapsed, asked about that moment)
        now = max(claimed[i].started_at for i in ids).replace(tzinfo=timezone.utc) + timedelta(seconds=3.5)
        wait_until(lambda: lapsed_at(sqlite_url, job_id, now) == 0, 30,
                   lambda: f"renewals to carry every lease past {now}: {[r.lease_until for r in requests_of(sqlite_url, job_id).values()]}")
        rows = requests_of(sqlite_url, job_id)
        assert all(rows[i].status == "running" and rows[i].worker == "test:1" for i in ids)
        assert all(rows[i].lease_until.replace(tzinfo=now.tzinfo) > now for i in ids), [rows[i].lease_until for i in ids]
        gated.gate.set()
        assert worker.wait_idle(timeout=30)
    finally:
        gated.gate.set()
        worker.shutdown(timeout=30)
    job = job_row(sqlite_url, job_id)
    assert (job.status, job.done_count) == ("completed", 12)
    assert {rows.attempts for rows in requests_of(sqlite_url, job_id).values()} == {1}


def test_a_duplicate_message_for_held_requests_claims_nothing_again(sqlite_url: str) -> None:
    worker, gated = gated_worker(sqlite_url, lease_s=30)
    job_id, ids = make_job(sqlite_url, 4)
    try:
        assert worker.handle(job_id, ids) == 4
        assert gated.entered.wait(10)
        assert worker.handle(job_id, ids) == 0  # the same message again (a redelivery) while they are held
        gated.gate.set()
        assert worker.wait_idle(timeout=30)
    finally:
        gated.gate.set()
        worker.shutdown(timeout=30)
    assert {rows.attempts for rows in requests_of(sqlite_url, job_id).values()} == {1}
    assert job_row(sqlite_url, job_id).result_count == 4


def test_prompts_sharing_a_prefix_report_their_cached_and_draft_tokens_in_results_exports_stats_and_metrics(tiny_worker: TracedWorker, sqlite_url: str) -> None:
    from workers import metrics

    job_id, ids = make_job(sqlite_url, 12, model=tiny_worker.model)
    set_prompts(sqlite_url, job_id, tiny_worker.model, max_new_tokens=4)
    shared = "You are a careful assistant who answers in one short sentence, without lists. " * 3
    with session_factory(make_engine(sqlite_url))() as session:
        for request in session.scalars(select(Request).where(Request.job_id == job_id)).all():
            request.prompt = shared + request.prompt
        session.commit()
    scheduler = tiny_worker.engine.scheduler
    assert scheduler is not None and scheduler.speculation is not None
    scheduler.speculation.always = True  # verify every draft: on this tiny model the cost model could decline them all
    counter = metrics.CACHED_PROMPT_TOKENS.labels(tiny_worker.model)
    drafted, kept = metrics.DRAFT_TOKENS.labels(tiny_worker.model), metrics.ACCEPTED_DRAFT_TOKENS.labels(tiny_worker.model)
    before, drafted_before, kept_before = counter._value.get(), drafted._value.get(), kept._value.get()
    for start in range(0, len(ids), 4):
        tiny_worker.handle(job_id, ids[start : start + 4])
    assert tiny_worker.wait_idle(timeout=120)
    with session_factory(make_engine(sqlite_url))() as session:
        rows = session.execute(select(Result.cached_prompt_tokens, Result.prompt_tokens).where(Result.job_id == job_id)).all()
    assert len(rows) == 12 and all(cached is not None and 0 <= cached < prompt for cached, prompt in rows)
    assert sum(1 for cached, _ in rows if cached >= 32) >= 10, rows  # all but the first copy the shared start's full blocks
    info = collect(make_engine(sqlite_url), job_id)
    assert info["prefix_hit_rate"] == round(sum(c for c, _ in rows) / sum(p for _, p in rows), 3) > 0.3
    assert counter._value.get() - before == sum(c for c, _ in rows)

    # speculative decoding's counts, written beside them and reported as they are stored
    with session_factory(make_engine(sqlite_url))() as session:
        drafts = session.execute(
            select(Request.custom_id, Result.sample_index, Result.draft_tokens, Result.accepted_draft_tokens)
            .join(Request, Request.id == Result.request_id).where(Result.job_id == job_id)
        ).all()
    assert all(isinstance(d, int) and isinstance(a, int) and 0 <= a <= d for _, _, d, a in drafts), drafts
    draft, accepted = sum(d for _, _, d, _ in drafts), sum(a for _, _, _, a in drafts)
    assert draft > 0, drafts  # the shared start, said three times, gives every row an earlier match to draft from
    assert (info["draft_tokens"], info["accepted_draft_tokens"]) == (draft, accepted)
    assert info["speculation_acceptance"] == round(accepted / draft, 3)
    assert info["per_model"][0]["speculation_acceptance"] == info["speculation_acceptance"]
    assert (drafted._value.get() - drafted_before, kept._value.get() - kept_before) == (draft, accepted)
    exported = {(r["custom_id"], r["sample_index"]): (r["draft_tokens"], r["accepted_draft_tokens"])
                for r in flat_records(make_engine(sqlite_url), job_id)}
    assert exported == {(c, i): (d, a) for c, i, d, a in drafts}
    usage = {item.request.custom_id: openai_line(item, tiny_worker.model)["response"]["body"]["usage"]
             for item in iter_request_results(make_engine(sqlite_url), job_id)}
    assert {c: (u["completion_tokens_details"]["accepted_prediction_tokens"], u["completion_tokens_details"]["rejected_prediction_tokens"])
            for c, u in usage.items()} == {c: (a, d - a) for c, _, d, a in drafts}


class Odd(StandInEngine):
    """The stand-in, with a NUL in the text of prompts that ask for one and a finish reason PostgreSQL's
    varchar(20) cannot hold for prompts that ask for that: what a model's byte tokens, or a bug, could give."""

    def generate(self, requests: list[GenerationRequest]):  # type: ignore[no-untyped-def]
        results = super().generate(requests)
        for request, result in zip(requests, results):
            for sample in result.samples:
                if "nul" in (request.prompt or ""):
                    sample.text = "before\x00after"
                if "long" in (request.prompt or ""):
                    sample.finish_reason = "x" * 30
        return results


def test_a_result_the_store_refuses_fails_its_request_alone_and_a_nul_is_stored_as_a_replacement(pg_url: str) -> None:
    """Found by the soak: a NUL in generated text made PostgreSQL refuse the batch's write, and the recorder thread
    died, so the worker held its requests (renewing their leases) forever."""
    job_id, ids = make_job(pg_url, 6)
    db = make_engine(pg_url)
    with session_factory(db)() as session:
        rows = session.scalars(select(Request).where(Request.job_id == job_id).order_by(Request.id)).all()
        rows[1].prompt, rows[3].prompt = "a nul please", "a long finish please"
        session.commit()
    worker = Worker(Odd(STANDIN), session_factory(db), STANDIN, "cpu", "test:1",
                    Settings(database_url=pg_url, model=STANDIN, lease_s=30, batch_size=64))
    try:
        assert worker.handle(job_id, ids) == 6
        assert worker.wait_idle(timeout=60)
        assert worker.wait_held(0) == []
    finally:
        worker.shutdown(timeout=30)
    requests = requests_of(pg_url, job_id)
    assert [requests[i].status for i in ids] == ["done", "done", "done", "failed", "done", "done"]
    assert requests[ids[3]].error.startswith("the store refused its result: ")
    with session_factory(db)() as session:
        text = session.scalar(select(Result.text).where(Result.request_id == ids[1]))
    assert text == "before\ufffdafter"
    job = job_row(pg_url, job_id)
    assert (job.status, job.done_count, job.failed_count, job.result_count) == ("completed", 5, 1, 5)  # settled, one failed
    db.dispose()
