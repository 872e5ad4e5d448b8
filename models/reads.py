"""Reads of a job's state and results that change nothing: counts for `producer status` and the API, and
every result of a job streamed in line order for export."""
from __future__ import annotations

from collections.abc import Iterator, Sequence

from sqlalchemy import Engine, Select, func, select, text
from sqlalchemy.orm import Session

from models.tables import RETRIED, Job, Request, RequestStatus, Result


def known_custom_ids(session: Session, job_id: int, custom_ids: Sequence[str]) -> int:
    """How many of these custom_ids the job has (`submit --resume` checks its input is the job's)."""
    return session.scalar(
        select(func.count()).where(Request.job_id == job_id, Request.custom_id.in_(list(custom_ids)))
    ) or 0


def request_counts(session: Session, job_id: int) -> dict[str, int]:
    """A job's requests by state, without reading the whole job: done and failed come from the job's counters
    (they move in the same transaction as the requests' states), running and cancelled from an index range
    scan (few rows), and queued is the rest."""
    job = session.get(Job, job_id)
    if job is None:
        return {}
    counts = {RequestStatus.DONE: job.done_count, RequestStatus.FAILED: job.failed_count}
    counts |= dict(
        session.execute(
            select(Request.status, func.count())
            .where(Request.job_id == job_id, Request.status.in_((RequestStatus.RUNNING, RequestStatus.CANCELLED)))
            .group_by(Request.status)
        ).all()
    )
    counts[RequestStatus.QUEUED] = max(0, job.total_requests - sum(counts.values()))
    return {status: count for status, count in counts.items() if count}


def retried_query(job_id: int) -> Select[tuple[int]]:
    """Count of the job's requests started more than once. The predicate is the index's own literal text, not a
    bound parameter, so that SQLite, too, matches it to the partial index ix_requests_retried."""
    return select(func.count()).where(Request.job_id == job_id, text(RETRIED))


def retried_count(session: Session, job_id: int) -> int:
    return session.scalar(retried_query(job_id)) or 0


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
