"""What the producer shows: job lists, a job's status, result records; rich tables for terminals."""
from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from models.reads import request_counts, retried_count
from models.store import lease_lapsed
from models.db import as_utc, utcnow
from models.tables import Job, JobStatus, Reject, Request, RequestStatus


def elapsed_seconds(job: Job) -> float | None:
    started = as_utc(job.started_at)
    if started is None:
        return None
    end = as_utc(job.finished_at) or datetime.now(timezone.utc)
    return max(0.0, (end - started).total_seconds())


def job_summary(job: Job) -> dict[str, Any]:
    seconds = elapsed_seconds(job)
    return {
        "id": job.id,
        "name": job.name,
        "model": job.model,
        "status": job.status,
        "requests": job.total_requests,
        "done": job.done_count,
        "failed": job.failed_count,
        "rejected": job.rejected_count,
        "prompt_tokens": job.prompt_tokens,
        "completion_tokens": job.completion_tokens,
        "tokens_per_s": round(job.completion_tokens / seconds, 1) if seconds else None,
        "created_at": job.created_at,
        "submit_finished": job.enqueued_at is not None,
    }


def job_rows(db: Engine, limit: int) -> list[dict[str, Any]]:
    with Session(db) as session:
        return [job_summary(job) for job in session.scalars(select(Job).order_by(Job.id.desc()).limit(limit))]


def job_status(db: Engine, job_id: int) -> dict[str, Any] | None:
    with Session(db) as session:
        job = session.get(Job, job_id)
        if job is None:
            return None
        info = job_summary(job)
        info["source"] = job.source
        info["defaults"] = job.defaults
        info["elapsed_s"] = elapsed_seconds(job)
        info["by_state"] = request_counts(session, job_id)
        failures = session.execute(
            select(Request.error, func.count())
            .where(Request.job_id == job_id, Request.status == RequestStatus.FAILED)
            .group_by(Request.error)
            .order_by(func.count().desc())
            .limit(20)
        ).all()
        info["failures"] = [{"reason": reason, "count": count} for reason, count in failures]
        info["results"] = job.result_count
        info["retried"] = retried_count(session, job_id)
        info["lease_lapsed"] = session.scalar(select(func.count()).where(Request.job_id == job_id, lease_lapsed(utcnow())))
        rejects = session.execute(select(Reject.line_no, Reject.reason).where(Reject.job_id == job_id).order_by(Reject.line_no).limit(20)).all()
        info["rejects"] = [{"line": line, "reason": reason} for line, reason in rejects]
        return info


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    table = Table(title=title)
    if not rows:
        Console().print(f"no {title}")
        return
    for column in rows[0]:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row.values()))
    Console().print(table)


def print_status(info: dict[str, Any]) -> None:
    console = Console()
    head = Table(title=f"job {info['id']}", show_header=False)
    for key in ("name", "model", "status", "source", "requests", "done", "failed", "rejected", "results", "retried",
                "lease_lapsed", "prompt_tokens", "completion_tokens", "tokens_per_s", "elapsed_s", "created_at",
                "submit_finished"):
        head.add_row(key, "" if info.get(key) is None else str(info[key]))
    console.print(head)
    states = Table(title="requests by state")
    states.add_column("state")
    states.add_column("count", justify="right")
    for state, count in sorted(info["by_state"].items()):
        states.add_row(state, str(count))
    console.print(states)
    if info["failures"]:
        print_table("failures by reason", info["failures"])
    if info["rejects"]:
        print_table("rejected lines", info["rejects"])
    if not info["submit_finished"] and info["status"] not in JobStatus.FINAL:
        console.print(f"its submit has not finished enqueueing; if it was interrupted: producer submit {info['source']} --resume {info['id']}")


def print_results_table(records: Iterator[dict[str, Any]], width: int = 70) -> None:
    table = Table(title="results", show_lines=True)
    for column in ("custom_id", "#", "text", "prompt tok", "completion tok", "finish"):
        table.add_column(column)
    for record in records:
        text = record.get("text") if "text" in record else f"[red]{record.get('error')}[/red]"
        text = text if len(text) <= width * 3 else text[: width * 3] + "…"
        table.add_row(
            record["custom_id"], str(record.get("sample_index", "")), text,
            str(record.get("prompt_tokens", "")), str(record.get("completion_tokens", "")), str(record.get("finish_reason", "")),
        )
    Console(width=max(120, width + 60)).print(table)
