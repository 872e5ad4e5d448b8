"""The store's schema comes from the migrations, and its writes are idempotent."""
from __future__ import annotations

import subprocess
import sys

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, func, inspect, select, text

from models.base import Base
from models.db import make_engine, session_factory
from models.intake import create_job, insert_requests, mark_enqueued, request_row, set_job_totals
from models.store import Outcome, claim_requests, record_outcomes
from models.tables import Job, Request, Result
from tests.helpers import table_columns


def test_migrations_create_exactly_the_models(store_url: str) -> None:
    engine = create_engine(store_url)
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    columns = {c["name"] for c in inspect(engine).get_columns("results")}
    assert columns >= {
        "request_id", "sample_index", "text", "finish_reason", "prompt_tokens", "completion_tokens", "params", "seed",
        "model", "dtype", "quantization", "worker_host", "device", "started_at", "finished_at", "generation_seconds",
    }
    uniques = {tuple(u["column_names"]) for u in inspect(engine).get_unique_constraints("results")}
    assert ("request_id", "sample_index") in uniques
    engine.dispose()


def _result_row(request_id: int, job_id: int, sample: int, text: str) -> dict:
    from models.db import utcnow

    now = utcnow()
    return {
        "request_id": request_id, "job_id": job_id, "sample_index": sample, "text": text, "finish_reason": "length",
        "prompt_tokens": 3, "completion_tokens": 5, "params": {}, "seed": 1, "model": "m", "dtype": "float32",
        "quantization": "none", "worker_host": "h", "device": "cpu", "started_at": now, "finished_at": now,
        "generation_seconds": 0.1,
    }


def test_a_redelivered_batch_writes_nothing_twice(store_url: str) -> None:
    db = make_engine(store_url)
    with db.begin() as connection:
        job_id = create_job(connection, name=None, model="m", source=None, defaults={})
        insert_requests(connection, job_id, [[request_row(i, str(i), "p", None, {"n": 2}, None) for i in (1, 2)]])
        set_job_totals(connection, job_id, total_requests=2, total_samples=4, rejected=0)
        mark_enqueued(connection, job_id)
    sessions = session_factory(db)
    with sessions() as session:
        ids = list(session.scalars(select(Request.id).order_by(Request.id)))
        claim = claim_requests(session, job_id, ids, "w1")
    assert claim is not None and len(claim.requests) == 2

    first = [Outcome(i, 3, [_result_row(i, job_id, s, f"first {i}/{s}") for s in (0, 1)]) for i in ids]
    second = [Outcome(i, 3, [_result_row(i, job_id, s, f"second {i}/{s}") for s in (0, 1)]) for i in ids]
    with sessions() as session:
        record_outcomes(session, job_id, first)
    with sessions() as session:  # the same batch again, as after a redelivery
        record_outcomes(session, job_id, second)
        texts = sorted(session.scalars(select(Result.text)))
        job = session.get(Job, job_id)
        assert texts == sorted(f"first {i}/{s}" for i in ids for s in (0, 1))
        assert job is not None and job.done_count == 2 and job.completion_tokens == 20 and job.prompt_tokens == 6
        assert job.status == "completed"
        # a message for finished requests claims nothing
        again = claim_requests(session, job_id, ids, "w2")
        assert again is not None and again.requests == []
    db.dispose()


def test_producer_never_imports_torch() -> None:
    code = (
        "import sys, producer.cli, producer.submit, producer.reader, producer.views, producer.progress, workers.app\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _job_of(db, requests: int, n: int = 1) -> tuple[int, list[int]]:  # type: ignore[no-untyped-def]
    with db.begin() as connection:
        job_id = create_job(connection, name=None, model="m", source=None, defaults={})
        insert_requests(connection, job_id, [[request_row(i, str(i), "p", None, {"n": n}, None) for i in range(requests)]])
        set_job_totals(connection, job_id, total_requests=requests, total_samples=requests * n, rejected=0)
        mark_enqueued(connection, job_id)
    with db.connect() as connection:
        ids = list(connection.scalars(select(Request.id).where(Request.job_id == job_id).order_by(Request.id)))
    return job_id, ids


def test_status_counts_from_counters_equal_the_rows_through_every_move(store_url: str) -> None:
    """request_counts, result_count and retried_count read no whole job; they must still equal a count of the
    rows after claims, results, failures, a redelivery, hand-backs, a cancel and a retry."""
    from models.reads import request_counts, retried_count
    from models.store import cancel_job, release_requests, reopen_job, settle_failures

    db = make_engine(store_url)
    sessions = session_factory(db)
    job_id, ids = _job_of(db, 12, n=2)

    def check() -> None:
        with sessions() as s:
            truth = dict(s.execute(select(Request.status, func.count()).where(Request.job_id == job_id).group_by(Request.status)).all())
            assert request_counts(s, job_id) == truth
            job = s.get(Job, job_id)
            assert job is not None and job.result_count == s.scalar(select(func.count()).select_from(Result).where(Result.job_id == job_id))
            assert retried_count(s, job_id) == s.scalar(select(func.count()).where(Request.job_id == job_id, Request.attempts > 1))

    check()
    with sessions() as s:
        assert claim_requests(s, job_id, ids[:6], "w1") is not None  # 6 running
    check()
    with sessions() as s:  # 3 done with two samples each, one failed
        record_outcomes(s, job_id, [Outcome(i, 3, [_result_row(i, job_id, k, "t") for k in (0, 1)]) for i in ids[:3]]
                        + [Outcome(ids[3], 3, error="too long")])
    check()
    with sessions() as s:  # the same batch delivered again: nothing moves, nothing is counted twice
        record_outcomes(s, job_id, [Outcome(i, 3, [_result_row(i, job_id, k, "again") for k in (0, 1)]) for i in ids[:3]])
    check()
    with sessions() as s:  # two handed back, then started again: retried
        release_requests(s, ids[4:6], "w1", "worker stopping")
        s.commit()
        assert claim_requests(s, job_id, ids[4:6], "w2") is not None
    check()
    with sessions() as s:
        settle_failures(s, job_id, {ids[4]: "poison"})
        s.commit()
    check()
    with sessions() as s:
        cancel_job(s, job_id)  # the queued ones are cancelled (ids[5] too: a re-claim takes one re-started request at a time)
    check()
    with sessions() as s:
        reopen_job(s, job_id)  # failed and cancelled go back to queued; the failed counter drops
    check()
    with sessions() as s:
        assert request_counts(s, job_id) == {"done": 3, "queued": 9}
    db.dispose()


def test_the_retried_count_reads_the_partial_index(sqlite_url: str) -> None:
    from models.reads import retried_count, retried_query

    db = make_engine(sqlite_url)
    job_id, _ = _job_of(db, 3)
    sessions = session_factory(db)
    with sessions() as s:
        assert retried_count(s, job_id) == 0
        compiled = str(retried_query(job_id).compile(db, compile_kwargs={"literal_binds": True}))
        plan = " ".join(str(row) for row in s.execute(text("EXPLAIN QUERY PLAN " + compiled)))
    assert "ix_requests_retried" in plan, plan
    db.dispose()


def test_the_result_counter_is_filled_in_for_jobs_stored_before_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from alembic import command

    from migrations import alembic_config

    url = f"sqlite:///{tmp_path / 'old.db'}"
    command.upgrade(alembic_config(url), "0003")
    db = create_engine(url)
    with db.begin() as c:
        c.execute(text("INSERT INTO jobs (id, model, status, defaults, total_requests, total_samples, done_count, failed_count, "
                       "rejected_count, prompt_tokens, completion_tokens, created_at) "
                       "VALUES (1, 'm', 'completed', '{}', 1, 3, 1, 0, 0, 3, 15, '2026-11-26')"))
        c.execute(text("INSERT INTO requests (id, job_id, line_no, custom_id, params, status, attempts) "
                       "VALUES (1, 1, 1, '1', '{}', 'done', 1)"))
        for k in range(3):
            c.execute(text("INSERT INTO results (request_id, job_id, sample_index, text, finish_reason, prompt_tokens, "
                           "completion_tokens, params, model, dtype, quantization, worker_host, device, started_at, "
                           "finished_at, generation_seconds) VALUES (1, 1, :k, 't', 'length', 3, 5, '{}', 'm', 'float32', "
                           "'none', 'h', 'cpu', '2026-11-26', '2026-11-26', 0.1)"), {"k": k})
    command.upgrade(alembic_config(url), "head")
    with db.connect() as c:
        assert c.execute(text("SELECT result_count FROM jobs WHERE id = 1")).scalar_one() == 3
    db.dispose()


def test_the_speculation_columns_go_in_and_out_with_migration_0007(store_url: str) -> None:
    """Down to 0006 drops both columns and keeps the results; back up, those results read NULL draft counts,
    which stats count as nothing said."""
    from alembic import command

    from migrations import alembic_config
    from producer.stats import collect

    db = make_engine(store_url)
    job_id, ids = _job_of(db, 2)
    with session_factory(db)() as session:
        assert claim_requests(session, job_id, ids, "w1") is not None
        record_outcomes(session, job_id, [Outcome(i, 3, [_result_row(i, job_id, 0, f"old {i}")]) for i in ids])
    db.dispose()

    command.downgrade(alembic_config(store_url), "0006")
    assert "cached_prompt_tokens" in table_columns(store_url, "results") and not table_columns(store_url, "results") & {"draft_tokens", "accepted_draft_tokens"}
    command.upgrade(alembic_config(store_url), "head")
    assert table_columns(store_url, "results") >= {"draft_tokens", "accepted_draft_tokens"}
    db = make_engine(store_url)
    with db.connect() as c:
        rows = c.execute(select(Result.draft_tokens, Result.accepted_draft_tokens).where(Result.job_id == job_id)).all()
    assert [tuple(r) for r in rows] == [(None, None), (None, None)]  # both results kept, neither with a count
    info = collect(db, job_id)
    assert (info["draft_tokens"], info["accepted_draft_tokens"], info["speculation_acceptance"]) == (0, 0, None)
    assert info["per_worker"][0]["speculation_acceptance"] is None
    db.dispose()
