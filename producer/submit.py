"""Submitting a file: validate every line, store the job and its requests, then enqueue id groups.

Two streaming passes over the file keep memory bounded whatever its size: the first only validates
(nothing is written if a line is bad), the second inserts requests in chunks inside one transaction
and then sends one message per group of request ids.

If submit is interrupted while inserting, the transaction rolls back and nothing is left. If it is
interrupted while enqueueing, the job stays in status 'submitting' with no enqueued_at.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from models.store import create_job, insert_rejects, insert_requests, iter_request_ids, mark_enqueued, set_job_totals
from producer.reader import LineOutcome, read_requests
from workers.registry import queue_name
from workers.types import resolve_params

INSERT_CHUNK = 5_000


@dataclass
class Validation:
    valid: int = 0
    samples: int = 0
    rejected_lines: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)
    error_count: int = 0


def validate_file(path: Path, defaults: dict[str, Any], context_length: int, keep_errors: int = 1000) -> Validation:
    """First pass: count the good lines and collect (line_no, reason) for the bad ones."""
    summary = Validation()
    for outcome in read_requests(path, defaults, context_length):
        if outcome.request is not None:
            summary.valid += 1
            summary.samples += resolve_params(defaults, outcome.request.params).n
        else:
            summary.rejected_lines += 1
        for reason in outcome.errors:
            summary.error_count += 1
            if len(summary.errors) < keep_errors:
                summary.errors.append((outcome.line_no, reason))
    return summary


def _request_row(job_id: int, outcome: LineOutcome) -> dict[str, Any]:
    request = outcome.request
    assert request is not None
    return {
        "job_id": job_id,
        "line_no": request.line_no,
        "custom_id": request.custom_id,
        "prompt": request.prompt,
        "messages": request.messages,
        "params": request.params,
        "metadata": request.metadata,  # the column name (the ORM attribute is Request.meta)
        "status": "queued",
        "attempts": 0,
    }


def _chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    while chunk := list(islice(items, size)):
        yield chunk


def store_job(
    db: Engine,
    path: Path,
    *,
    model: str,
    name: str | None,
    defaults: dict[str, Any],
    context_length: int,
    validation: Validation,
) -> int:
    """Second pass: the job, its requests and its rejects, in one transaction."""
    with db.begin() as connection:
        job_id = create_job(connection, name=name, model=model, source=str(path), defaults=defaults)
        for chunk in _chunks(iter(read_requests(path, defaults, context_length)), INSERT_CHUNK):
            insert_requests(connection, [_request_row(job_id, o) for o in chunk if o.request is not None])
            insert_rejects(
                connection,
                [{"job_id": job_id, "line_no": o.line_no, "reason": "; ".join(o.errors)} for o in chunk if o.request is None],
            )
        set_job_totals(
            connection,
            job_id,
            total_requests=validation.valid,
            total_samples=validation.samples,
            rejected=validation.rejected_lines,
        )
    return job_id


def enqueue_job(db: Engine, job_id: int, model: str, ids_per_message: int, send: Callable[[str, int, list[int]], None]) -> int:
    """Send the job's queued request ids in groups; returns the number of messages sent."""
    queue = queue_name(model)
    messages = 0
    for ids in _chunks(iter_request_ids(db, job_id), ids_per_message):
        send(queue, job_id, ids)
        messages += 1
    with db.begin() as connection:
        mark_enqueued(connection, job_id)
    return messages
