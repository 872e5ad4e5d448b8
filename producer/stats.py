"""Numbers for `producer stats`: requests by state, tokens, throughput per worker and per model, ETA."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Engine, case, func, select
from sqlalchemy.orm import Session

from models.db import as_utc
from models.tables import Job, Request, RequestStatus, Result


def _rate(tokens: int, start: datetime | None, end: datetime | None) -> float | None:
    start, end = as_utc(start), as_utc(end)
    if start is None or end is None or end <= start:
        return None
    return round(tokens / (end - start).total_seconds(), 1)


def _counted_prompt_tokens() -> Any:
    """Prompt tokens of the results that say how many of theirs came from the prefix cache."""
    return func.sum(case((Result.cached_prompt_tokens.is_not(None), Result.prompt_tokens), else_=0))


def _share(part: int | None, whole: int | None) -> float | None:
    """part / whole to 3 places: the prefix hit rate (cached of prompt tokens), the speculation acceptance (kept of
    draft tokens); None when nothing was counted."""
    return round(int(part) / int(whole), 3) if part is not None and whole else None


def collect(db: Engine, job_id: int | None = None) -> dict[str, Any]:
    """Stats for one job, or for every job when job_id is None."""
    on_requests = [Request.job_id == job_id] if job_id is not None else []
    on_results = [Result.job_id == job_id] if job_id is not None else []
    on_jobs = [Job.id == job_id] if job_id is not None else []
    with Session(db) as session:
        by_state = dict(session.execute(select(Request.status, func.count()).where(*on_requests).group_by(Request.status)).all())
        totals = session.execute(
            select(
                func.coalesce(func.sum(Job.total_requests), 0), func.coalesce(func.sum(Job.prompt_tokens), 0),
                func.coalesce(func.sum(Job.completion_tokens), 0), func.min(Job.started_at), func.max(Job.finished_at),
                func.count(Job.id), func.sum(func.cast(Job.finished_at.is_(None), Job.total_requests.type)),
            ).where(*on_jobs)
        ).one()
        total, prompt_tokens, completion_tokens, started, finished, jobs, open_jobs = totals
        cached, counted, draft, accepted = session.execute(
            select(
                func.sum(Result.cached_prompt_tokens), _counted_prompt_tokens(),
                func.sum(Result.draft_tokens), func.sum(Result.accepted_draft_tokens),
            ).where(*on_results)
        ).one()
        constrained = session.scalar(select(func.count()).where(*on_requests, Request.constraint_key.is_not(None)))
        groups = {}
        for name, column in (("workers", Result.worker_host), ("models", Result.model)):
            groups[name] = [
                {
                    name[:-1]: key, "results": count, "completion_tokens": int(tokens or 0),
                    "tokens_per_s": _rate(int(tokens or 0), first, last),
                    "mean_occupancy": None if occupancy is None else round(float(occupancy), 3),
                    "prefix_hit_rate": _share(cached, prompt),
                    "draft_tokens": int(draft or 0), "accepted_draft_tokens": int(accepted or 0),
                    "speculation_acceptance": _share(accepted, draft),
                }
                for key, count, tokens, first, last, occupancy, cached, prompt, draft, accepted in session.execute(
                    select(
                        column, func.count(), func.sum(Result.completion_tokens), func.min(Result.started_at),
                        func.max(Result.finished_at), func.avg(Result.batch_occupancy),
                        func.sum(Result.cached_prompt_tokens), _counted_prompt_tokens(),
                        func.sum(Result.draft_tokens), func.sum(Result.accepted_draft_tokens),
                    )
                    .where(*on_results).group_by(column).order_by(column)
                ).all()
            ]
        failures = [
            {"reason": reason, "count": count}
            for reason, count in session.execute(
                select(Request.error, func.count()).where(*on_requests, Request.status == RequestStatus.FAILED)
                .group_by(Request.error).order_by(func.count().desc()).limit(20)
            ).all()
        ]
    end = finished if not open_jobs else datetime.now(timezone.utc)
    started_aware = as_utc(started)
    elapsed = (as_utc(end) - started_aware).total_seconds() if started_aware and end else None
    settled = by_state.get(RequestStatus.DONE, 0) + by_state.get(RequestStatus.FAILED, 0)
    remaining = max(0, int(total) - settled)
    eta = round(remaining * elapsed / settled, 1) if elapsed and settled and remaining else (0.0 if not remaining else None)
    return {
        "job": job_id,
        "jobs": jobs,
        "requests": int(total),
        "constrained_requests": int(constrained or 0),
        "by_state": by_state,
        "prompt_tokens": int(prompt_tokens),
        "prefix_hit_rate": _share(cached, counted),
        "completion_tokens": int(completion_tokens),
        "draft_tokens": int(draft or 0),
        "accepted_draft_tokens": int(accepted or 0),
        "speculation_acceptance": _share(accepted, draft),
        "elapsed_s": None if elapsed is None else round(elapsed, 1),
        "tokens_per_s": round(int(completion_tokens) / elapsed, 1) if elapsed else None,
        "eta_s": eta,
        "per_worker": groups["workers"],
        "per_model": groups["models"],
        "failures": failures,
    }
