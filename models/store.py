"""Reads and writes of the store that the producer and the workers share.

Writes are idempotent: a result is keyed by (request_id, sample_index) and inserted with
"on conflict do nothing", and a request's counters move only on its first transition to done/failed,
so a redelivered message never duplicates a row or double-counts a token.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, func, insert, select, update
from sqlalchemy.orm import Session

from models.db import utcnow
from models.tables import Job, JobStatus, Reject, Request, RequestStatus, Result

OPEN_JOB_STATES = (JobStatus.SUBMITTING, JobStatus.QUEUED, JobStatus.RUNNING)


def insert_ignore(connection: Connection | Session, table: Any, rows: Sequence[dict[str, Any]], keys: list[str]) -> None:
    """INSERT ... ON CONFLICT (keys) DO NOTHING, on SQLite and PostgreSQL alike."""
    if not rows:
        return
    dialect = connection.get_bind().dialect.name if isinstance(connection, Session) else connection.dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    else:
        raise NotImplementedError(f"no upsert for database dialect {dialect!r}")
    connection.execute(dialect_insert(table).on_conflict_do_nothing(index_elements=keys), list(rows))


# --- submitting -------------------------------------------------------------------------------

def create_job(connection: Connection, *, name: str | None, model: str, source: str | None, defaults: dict[str, Any]) -> int:
    return connection.execute(
        insert(Job)
        .values(name=name, model=model, source=source, defaults=defaults, status=JobStatus.SUBMITTING, created_at=utcnow())
        .returning(Job.id)
    ).scalar_one()


def insert_requests(connection: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Insert a chunk of request rows in one executemany."""
    if rows:
        connection.execute(insert(Request), list(rows))


def insert_rejects(connection: Connection, rows: Sequence[dict[str, Any]]) -> None:
    if rows:
        connection.execute(insert(Reject), list(rows))


def set_job_totals(connection: Connection, job_id: int, *, total_requests: int, total_samples: int, rejected: int) -> None:
    connection.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(total_requests=total_requests, total_samples=total_samples, rejected_count=rejected)
    )


def iter_request_ids(engine: Engine, job_id: int, statuses: Sequence[str] = (RequestStatus.QUEUED,), chunk: int = 10_000) -> Iterator[int]:
    """Ids of a job's requests in id order, streamed in chunks (keyset pagination, bounded memory)."""
    last = 0
    while True:
        with engine.connect() as connection:
            ids = connection.execute(
                select(Request.id)
                .where(Request.job_id == job_id, Request.status.in_(statuses), Request.id > last)
                .order_by(Request.id)
                .limit(chunk)
            ).scalars().all()
        if not ids:
            return
        yield from ids
        last = ids[-1]


def mark_enqueued(connection: Connection, job_id: int) -> None:
    """The submit finished sending: record it, and settle the job if workers already did everything."""
    connection.execute(
        update(Job).where(Job.id == job_id, Job.status == JobStatus.SUBMITTING).values(status=JobStatus.QUEUED)
    )
    connection.execute(update(Job).where(Job.id == job_id).values(enqueued_at=utcnow()))
    complete_job_if_finished(connection, job_id)


def complete_job_if_finished(connection: Connection | Session, job_id: int) -> None:
    connection.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.status.in_(OPEN_JOB_STATES),
            Job.enqueued_at.is_not(None),
            Job.done_count + Job.failed_count >= Job.total_requests,
        )
        .values(status=JobStatus.COMPLETED, finished_at=utcnow())
    )


# --- working ----------------------------------------------------------------------------------

@dataclass
class Claim:
    job_id: int
    model: str
    defaults: dict[str, Any]
    requests: list[Request]


def claim_requests(session: Session, job_id: int, request_ids: Sequence[int], worker: str) -> Claim | None:
    """Mark the still-open requests among request_ids as running and return them.

    Requests already done or failed are left out (a redelivered message does no work twice);
    None when the job is gone or cancelled.
    """
    job = session.get(Job, job_id)
    if job is None or job.status == JobStatus.CANCELLED:
        return None
    requests = list(
        session.scalars(
            select(Request)
            .where(Request.job_id == job_id, Request.id.in_(request_ids), Request.status.in_((RequestStatus.QUEUED, RequestStatus.RUNNING)))
            .order_by(Request.id)
        )
    )
    now = utcnow()
    for request in requests:
        request.status = RequestStatus.RUNNING
        request.attempts += 1
        request.worker = worker
        request.started_at = now
    if requests and job.status in (JobStatus.SUBMITTING, JobStatus.QUEUED):
        job.status = JobStatus.RUNNING
    if requests and job.started_at is None:
        job.started_at = now
    claim = Claim(job_id=job.id, model=job.model, defaults=dict(job.defaults or {}), requests=requests)
    session.commit()
    return claim


@dataclass
class Outcome:
    """What one request produced: its result rows, or the reason it failed."""

    request_id: int
    prompt_tokens: int = 0
    results: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


def record_outcomes(session: Session, job_id: int, outcomes: Sequence[Outcome]) -> None:
    """Write a batch's results and settle its requests in ONE transaction."""
    rows = [row for outcome in outcomes if outcome.error is None for row in outcome.results]
    insert_ignore(session, Result, rows, ["request_id", "sample_index"])
    now = utcnow()
    by_id = {outcome.request_id: outcome for outcome in outcomes}
    done_ids = [o.request_id for o in outcomes if o.error is None]
    moved_done = _settle(session, done_ids, RequestStatus.DONE, now)
    moved_failed: list[int] = []
    for outcome in outcomes:
        if outcome.error is not None:
            moved_failed += _settle(session, [outcome.request_id], RequestStatus.FAILED, now, error=outcome.error)
    if moved_done or moved_failed:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                done_count=Job.done_count + len(moved_done),
                failed_count=Job.failed_count + len(moved_failed),
                prompt_tokens=Job.prompt_tokens + sum(by_id[i].prompt_tokens for i in moved_done),
                completion_tokens=Job.completion_tokens
                + sum(row["completion_tokens"] for i in moved_done for row in by_id[i].results),
            )
        )
        complete_job_if_finished(session, job_id)
    session.commit()


def _settle(session: Session, request_ids: list[int], status: str, now: Any, error: str | None = None) -> list[int]:
    """Move requests that are not yet final to status; return the ids that moved (for counting once)."""
    if not request_ids:
        return []
    return list(
        session.scalars(
            update(Request)
            .where(Request.id.in_(request_ids), Request.status.not_in((RequestStatus.DONE, RequestStatus.FAILED)))
            .values(status=status, finished_at=now, error=error)
            .returning(Request.id)
        )
    )


# --- reading ----------------------------------------------------------------------------------

def request_counts(session: Session, job_id: int) -> dict[str, int]:
    rows = session.execute(
        select(Request.status, func.count()).where(Request.job_id == job_id).group_by(Request.status)
    ).all()
    return {status: count for status, count in rows}


def iter_results(engine: Engine, job_id: int, chunk: int = 5_000) -> Iterator[tuple[Request, Result | None]]:
    """Every request of a job in line order with each of its results (None for a request with none), streamed."""
    last = 0
    while True:
        with Session(engine) as session:
            requests = list(
                session.scalars(
                    select(Request).where(Request.job_id == job_id, Request.id > last).order_by(Request.id).limit(chunk)
                )
            )
            if not requests:
                return
            results: dict[int, list[Result]] = {}
            for result in session.scalars(
                select(Result)
                .where(Result.request_id.in_([r.id for r in requests]))
                .order_by(Result.request_id, Result.sample_index)
            ):
                results.setdefault(result.request_id, []).append(result)
            session.expunge_all()
        for request in requests:
            for result in results.get(request.id) or [None]:
                yield request, result
        last = requests[-1].id
