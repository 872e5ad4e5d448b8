"""The requests' state machine in the store, shared by the workers, the reconciler and the producer's lifecycle
commands: claims and leases, recorded outcomes, cancel, retry and the reconciler's repairs. A job's intake is
models.intake, plain reads are models.reads.

Writes are idempotent: a result is keyed by (request_id, sample_index) and inserted with
"on conflict do nothing", and a request's counters move only on its first transition to done/failed,
so a redelivered message never duplicates a row or double-counts a token.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NotRequired, TypedDict

from sqlalchemy import ColumnElement, Connection, Engine, and_, func, or_, select, update
from sqlalchemy.orm import Session

from contract.policy import gave_up_reason, gives_up
from models.db import as_utc, utcnow
from models.tables import Job, JobStatus, OutputConstraint, Request, RequestStatus, Result

OPEN_JOB_STATES = (JobStatus.SUBMITTING, JobStatus.QUEUED, JobStatus.RUNNING)


def insert_ignore(connection: Connection | Session, table: Any, rows: Sequence[Mapping[str, Any]], keys: list[str]) -> None:
    """INSERT ... ON CONFLICT (keys) DO NOTHING, on SQLite and PostgreSQL alike."""
    if not rows:
        return
    if isinstance(connection, Session):  # Core executemany, not the ORM bulk insert (which splits on None values)
        connection = connection.connection()
        table = getattr(table, "__table__", table)
    dialect = connection.dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    else:
        raise NotImplementedError(f"no upsert for database dialect {dialect!r}")
    connection.execute(dialect_insert(table).on_conflict_do_nothing(index_elements=keys), list(rows))


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
    one_by_one: bool = False
    """The claimed request was started before and did not finish: it is generated alone, so that a
    request that kills its worker takes no other request down with it."""
    gave_up: list[int] = field(default_factory=list)
    """Ids this claim marked failed because they had been started max_attempts times already."""
    job_created_at: datetime | None = None
    """When the job was stored: the enqueue time of requests never re-enqueued (for queue-wait metrics)."""
    constraints: dict[str, tuple[str, str]] = field(default_factory=dict)
    """The structured-output constraints its requests name (Request.constraint_key): {key: (kind, spec)}."""


def lease_lapsed(now: datetime) -> ColumnElement[bool]:
    """A running request whose worker is presumed lost: its lease has passed, or it never had one. The one
    definition that the workers' claims, the reconciler and `producer status` all use."""
    return and_(Request.status == RequestStatus.RUNNING, or_(Request.lease_until.is_(None), Request.lease_until < now))


def takeable(worker: str, now: datetime) -> ColumnElement[bool]:
    """A request a worker may start: queued, or running under a lease that has lapsed (or is its own)."""
    return or_(
        Request.status == RequestStatus.QUEUED,
        lease_lapsed(now),
        and_(Request.status == RequestStatus.RUNNING, Request.worker == worker),
    )


def claim_requests(
    session: Session, job_id: int, request_ids: Sequence[int], worker: str, *, lease_s: float = 120, max_attempts: int = 3
) -> Claim | None:
    """Start the takeable requests among request_ids under a lease, and return them; commits.

    Requests done, failed, or running under another worker's live lease are left out, so a redelivered
    or duplicated message does no work twice. Requests never started are claimed together; once none
    is left, one request that was started before (and did not finish) is claimed alone (one_by_one).
    A request already started max_attempts times is marked failed instead (contract.policy, 4). Each claim is one
    conditional UPDATE, so two workers never both start the same request.
    None when the job is gone or cancelled.
    """
    job = session.get(Job, job_id)
    if job is None or job.status == JobStatus.CANCELLED:
        session.rollback()
        return None
    now = utcnow()
    mine = and_(Request.job_id == job_id, Request.id.in_(list(request_ids)), takeable(worker, now))
    gave_up = _give_up(session, job_id, mine, max_attempts, now)
    start = {
        "status": RequestStatus.RUNNING,
        "attempts": Request.attempts + 1,
        "worker": worker,
        "lease_until": now + timedelta(seconds=lease_s),
        "started_at": now,
    }
    ids = _returning_ids(session, update(Request).where(mine, Request.attempts == 0).values(**start))
    one_by_one = False
    if not ids:
        first = session.scalar(
            select(Request.id).where(mine, ~gives_up(Request.attempts, max_attempts)).order_by(Request.id).limit(1)
        )
        if first is not None:
            ids = _returning_ids(session, update(Request).where(mine, Request.id == first).values(**start))
            one_by_one = bool(ids)
    requests = list(session.scalars(select(Request).where(Request.id.in_(ids)).order_by(Request.id))) if ids else []
    if requests and job.status in (JobStatus.SUBMITTING, JobStatus.QUEUED):
        job.status = JobStatus.RUNNING
    if requests and job.started_at is None:
        job.started_at = now
    claim = Claim(job.id, job.model, dict(job.defaults or {}), requests, one_by_one, gave_up, job.created_at,
                  _constraints(session, job_id, {r.constraint_key for r in requests if r.constraint_key is not None}))
    session.commit()
    return claim


def _constraints(session: Session, job_id: int, keys: set[str]) -> dict[str, tuple[str, str]]:
    """The job's constraints under these keys (one query; none when no request names one)."""
    if not keys:
        return {}
    rows = session.execute(
        select(OutputConstraint.key, OutputConstraint.kind, OutputConstraint.spec)
        .where(OutputConstraint.job_id == job_id, OutputConstraint.key.in_(sorted(keys)))
    ).all()
    return {row.key: (row.kind, row.spec) for row in rows}


def _give_up(session: Session, job_id: int, among: ColumnElement[bool], max_attempts: int, now: datetime) -> list[int]:
    """End failed, with the policy's reason, the requests among these that it does not start again (contract.policy,
    4); returns their ids. No commit."""
    spent = session.execute(
        select(Request.id, Request.attempts, Request.error, Request.worker).where(among, gives_up(Request.attempts, max_attempts))
    ).all()
    return settle_failures(session, job_id, {r.id: gave_up_reason(r.attempts, r.error, r.worker) for r in spent}, now)


def _returning_ids(session: Session, statement: Any) -> list[int]:
    return list(
        session.scalars(statement.returning(Request.id), execution_options={"synchronize_session": False})
    )


def renew_leases(session: Session, request_ids: Sequence[int], worker: str, lease_s: float) -> int:
    """Extend the leases this worker still holds; returns how many it holds. Commits."""
    if not request_ids:
        return 0
    held = session.execute(
        update(Request)
        .where(Request.id.in_(list(request_ids)), Request.status == RequestStatus.RUNNING, Request.worker == worker)
        .values(lease_until=utcnow() + timedelta(seconds=lease_s))
        .execution_options(synchronize_session=False)
    ).rowcount
    session.commit()
    return held


def release_requests(session: Session, request_ids: Sequence[int], worker: str, reason: str | None) -> list[int]:
    """Hand requests this worker holds back to the queue state (their attempts stay counted). Commits.

    The store then shows them queued and missing from Redis, so the reconciler sends them again;
    the worker that released them may also take them again itself at once.
    """
    if not request_ids:
        return []
    ids = _returning_ids(
        session,
        update(Request)
        .where(Request.id.in_(list(request_ids)), Request.status == RequestStatus.RUNNING, Request.worker == worker)
        .values(status=RequestStatus.QUEUED, lease_until=None, error=reason),
    )
    session.commit()
    return ids


class ResultRow(TypedDict):
    """One sample of a request as it is written to `results`: models.tables.Result's columns but its id."""

    request_id: int
    job_id: int
    sample_index: int
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    params: dict[str, Any]
    """The sampling parameters actually used, with this sample's seed."""
    seed: int | None
    model: str
    dtype: str
    quantization: str
    worker_host: str
    device: str
    started_at: datetime
    finished_at: datetime
    generation_seconds: float
    logprobs: list[dict[str, Any]] | None
    batch_occupancy: float | None
    cached_prompt_tokens: int | None
    draft_tokens: int | None
    accepted_draft_tokens: int | None
    reasoning_content: NotRequired[str | None]
    """A reasoning model's thinking (absent or None: none kept apart)."""
    constrained: bool


@dataclass
class Outcome:
    """What one request produced: its result rows, or the reason it failed."""

    request_id: int
    prompt_tokens: int = 0
    results: list[ResultRow] = field(default_factory=list)
    error: str | None = None


def record_outcomes(session: Session, job_id: int, outcomes: Sequence[Outcome]) -> None:
    """Write a batch's results and settle its requests in ONE transaction.

    The first write wins: results go in with "on conflict do nothing", and a request's tokens reach
    the job's counters only on its first move to done or failed, whoever (and however often) writes it.
    """
    rows = [row for outcome in outcomes if outcome.error is None for row in outcome.results]
    insert_ignore(session, Result, rows, ["request_id", "sample_index"])
    now = utcnow()
    by_id = {outcome.request_id: outcome for outcome in outcomes}
    done_ids = [o.request_id for o in outcomes if o.error is None]
    moved_done = _settle(session, done_ids, RequestStatus.DONE, now)
    if moved_done:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                done_count=Job.done_count + len(moved_done),
                result_count=Job.result_count + sum(len(by_id[i].results) for i in moved_done),
                prompt_tokens=Job.prompt_tokens + sum(by_id[i].prompt_tokens for i in moved_done),
                completion_tokens=Job.completion_tokens
                + sum(row["completion_tokens"] for i in moved_done for row in by_id[i].results),
            )
        )
    failures = {o.request_id: o.error for o in outcomes if o.error is not None}
    if not settle_failures(session, job_id, failures, now) and moved_done:
        complete_job_if_finished(session, job_id)
    session.commit()


def settle_failures(session: Session, job_id: int, reasons: dict[int, str], now: datetime | None = None) -> list[int]:
    """Mark requests failed with their reasons (those not final yet), count them once; no commit."""
    now = now or utcnow()
    moved: list[int] = []
    for request_id, reason in reasons.items():
        moved += _settle(session, [request_id], RequestStatus.FAILED, now, error=reason)
    if moved:
        session.execute(update(Job).where(Job.id == job_id).values(failed_count=Job.failed_count + len(moved)))
        complete_job_if_finished(session, job_id)
    return moved


def _settle(session: Session, request_ids: list[int], status: str, now: Any, error: str | None = None) -> list[int]:
    """Move requests that are not yet final to status; return the ids that moved (for counting once)."""
    if not request_ids:
        return []
    return _returning_ids(
        session,
        update(Request)
        .where(Request.id.in_(request_ids), Request.status.not_in(RequestStatus.FINAL))
        .values(status=status, finished_at=now, error=error, lease_until=None),
    )


# --- lifecycle: cancel, retry, reconcile ---------------------------------------------------------

def cancel_job(session: Session, job_id: int) -> dict[str, Any] | None:
    """Cancel a job: its queued requests become 'cancelled' and workers skip its messages. Commits.

    Requests already running finish and keep their results; results already written stay.
    """
    job = session.get(Job, job_id)
    if job is None:
        return None
    if job.status in JobStatus.FINAL:
        session.rollback()
        return {"job_id": job_id, "status": job.status, "cancelled": 0, "running": 0, "changed": False}
    now = utcnow()
    session.execute(
        update(Job).where(Job.id == job_id, Job.status.in_(OPEN_JOB_STATES)).values(status=JobStatus.CANCELLED, finished_at=now)
    )
    cancelled = session.execute(
        update(Request)
        .where(Request.job_id == job_id, Request.status == RequestStatus.QUEUED)
        .values(status=RequestStatus.CANCELLED, lease_until=None)
        .execution_options(synchronize_session=False)
    ).rowcount
    running = session.scalar(
        select(func.count()).where(Request.job_id == job_id, Request.status == RequestStatus.RUNNING)
    )
    session.commit()
    return {"job_id": job_id, "status": JobStatus.CANCELLED, "cancelled": cancelled, "running": running, "changed": True}


def reopen_job(session: Session, job_id: int) -> dict[str, Any] | None:
    """For `producer retry`: failed and cancelled requests go back to queued (failed ones with a fresh
    attempt count), the job's failed counter drops by as many, and a finished job is open again; a job with nothing
    left to run (cancelled after its last requests had started) is completed. Commits.
    """
    job = session.get(Job, job_id)
    if job is None:
        return None
    failed = _returning_ids(
        session,
        update(Request)
        .where(Request.job_id == job_id, Request.status == RequestStatus.FAILED)
        .values(status=RequestStatus.QUEUED, attempts=0, error=None, finished_at=None, lease_until=None),
    )
    cancelled = _returning_ids(
        session,
        update(Request)
        .where(Request.job_id == job_id, Request.status == RequestStatus.CANCELLED)
        .values(status=RequestStatus.QUEUED),
    )
    unfinished = session.scalar(
        select(func.count()).where(Request.job_id == job_id, Request.status.not_in(RequestStatus.FINAL))
    )
    values: dict[str, Any] = {"failed_count": Job.failed_count - len(failed)}
    # A job cancelled while its last requests ran has nothing left to reopen: it opens too, and is settled below
    # by its counters like any other (else it would stay cancelled with every request done).
    if job.status in JobStatus.FINAL and (unfinished or job.status == JobStatus.CANCELLED):
        values |= {"status": JobStatus.QUEUED if job.enqueued_at is not None else JobStatus.SUBMITTING, "finished_at": None}
    session.execute(update(Job).where(Job.id == job_id).values(**values))
    complete_job_if_finished(session, job_id)
    session.commit()
    return {"job_id": job_id, "failed": len(failed), "cancelled": len(cancelled), "unfinished": unfinished}


@dataclass
class OpenJob:
    id: int
    model: str
    status: str
    enqueued_at: datetime | None


def open_jobs(session: Session) -> list[OpenJob]:
    """Jobs whose submit finished and that are not final: those the reconciler looks after."""
    rows = session.execute(
        select(Job.id, Job.model, Job.status, Job.enqueued_at)
        .where(Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)), Job.enqueued_at.is_not(None))
        .order_by(Job.id)
    ).all()
    return [OpenJob(*row) for row in rows]


def expire_leases(session: Session, job_id: int, max_attempts: int, now: datetime | None = None) -> tuple[list[int], list[int]]:
    """Running requests of a job whose lease has passed: those started max_attempts times fail, the
    others go back to queued. Returns (requeued ids, failed ids). Commits.
    """
    now = now or utcnow()
    lapsed = and_(Request.job_id == job_id, lease_lapsed(now))
    failed = _give_up(session, job_id, lapsed, max_attempts, now)
    requeued = _returning_ids(
        session, update(Request).where(lapsed, ~gives_up(Request.attempts, max_attempts)).values(status=RequestStatus.QUEUED, lease_until=None)
    )
    session.commit()
    return requeued, failed


def close_cancelled_leases(session: Session, now: datetime | None = None) -> int:
    """Requests of cancelled jobs still 'running' under a lapsed lease (their worker died after the
    cancel) become 'cancelled' too, rather than running forever. Commits."""
    cancelled_jobs = select(Job.id).where(Job.status == JobStatus.CANCELLED).scalar_subquery()
    moved = session.execute(
        update(Request)
        .where(Request.job_id.in_(cancelled_jobs), lease_lapsed(now or utcnow()))
        .values(status=RequestStatus.CANCELLED, lease_until=None)
        .execution_options(synchronize_session=False)
    ).rowcount
    session.commit()
    return moved


def not_enqueued_since(job_enqueued_at: datetime | None, before: datetime) -> ColumnElement[bool]:
    """Requests last enqueued before `before`: by their own enqueued_at, or, where that is NULL (sent
    with the submit), by their job's; a job whose submit never finished counts as never enqueued."""
    own = and_(Request.enqueued_at.is_not(None), Request.enqueued_at < before)
    if job_enqueued_at is None or as_utc(job_enqueued_at) < before:
        return or_(Request.enqueued_at.is_(None), own)
    return own


def iter_stale_queued(engine: Engine, job: OpenJob, before: datetime, chunk: int = 10_000) -> Iterator[list[int]]:
    """Ids of a job's queued requests not enqueued since `before`, in id order, chunk by chunk."""
    last = 0
    condition = not_enqueued_since(job.enqueued_at, before)
    while True:
        with engine.connect() as connection:
            ids = list(
                connection.execute(
                    select(Request.id)
                    .where(Request.job_id == job.id, Request.status == RequestStatus.QUEUED, Request.id > last, condition)
                    .order_by(Request.id)
                    .limit(chunk)
                ).scalars()
            )
        if not ids:
            return
        yield ids
        last = ids[-1]


def mark_requests_enqueued(session: Session, request_ids: Sequence[int], now: datetime | None = None) -> list[int]:
    """Record that a message with these requests is being sent; returns those still queued. Commits."""
    if not request_ids:
        return []
    ids = _returning_ids(
        session,
        update(Request)
        .where(Request.id.in_(list(request_ids)), Request.status == RequestStatus.QUEUED)
        .values(enqueued_at=now or utcnow()),
    )
    session.commit()
    return ids
