"""The store's schema comes from the migrations, and its writes are idempotent."""
from __future__ import annotations

import subprocess
import sys

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, select

from models.base import Base
from models.db import make_engine, session_factory
from models.store import Outcome, claim_requests, create_job, insert_requests, mark_enqueued, record_outcomes, set_job_totals
from models.tables import Job, Request, Result


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
        insert_requests(connection, [
            {"job_id": job_id, "line_no": i, "custom_id": str(i), "prompt": "p", "messages": None, "params": {"n": 2},
             "status": "queued", "attempts": 0}
            for i in (1, 2)
        ])
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
