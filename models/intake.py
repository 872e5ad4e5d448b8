"""How a job and its requests enter the store: the producer's writes, all before a single message is sent
(the job, its requests in one bulk insert, the rejected lines, the totals), then the ids to send and the mark that
sending is done."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from sqlalchemy import Connection, Engine, insert, select, update

from models.db import utcnow
from models.store import complete_job_if_finished
from models.tables import Job, JobStatus, OutputConstraint, Reject, Request, RequestStatus


def create_job(connection: Connection, *, name: str | None, model: str, source: str | None, defaults: dict[str, Any],
               input_columns: dict[str, Any] | None = None) -> int:
    return connection.execute(
        insert(Job)
        .values(name=name, model=model, source=source, defaults=defaults, input_columns=input_columns,
                status=JobStatus.SUBMITTING, created_at=utcnow())
        .returning(Job.id)
    ).scalar_one()


REQUEST_COLUMNS = (
    "job_id", "line_no", "custom_id", "prompt", "messages", "params", "metadata", "constraint_key", "status", "attempts",
)
"""The columns `insert_requests` fills; the others take their defaults (id from its sequence)."""

RequestRow = tuple[int, str, str | None, str, str, str, str | None]
"""A new request as `insert_requests` takes it: (line_no, custom_id, prompt, messages, params, metadata,
constraint_key), messages, params and metadata as JSON text (`request_row`). job_id, status (queued) and attempts (0) are the same for every row of a job."""


def _json_encoder() -> Callable[[Any], str]:
    """json.dumps with its defaults (the text SQLAlchemy's JSON type writes; None is JSON null), set up once.

    json.dumps builds a new C encoder on every call; three calls a row made that a tenth of a submit.
    The circular-reference check is off: values parsed from JSON cannot hold a cycle.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return json.JSONEncoder().encode
    encode = make(None, json.JSONEncoder().default, json.encoder.encode_basestring_ascii, None, ": ", ", ", False, False, True)
    return lambda value: "".join(encode(value, 0))


dump_json = _json_encoder()


def request_row(line_no: int, custom_id: str, prompt: str | None, messages: list[dict[str, Any]] | None,
                params: dict[str, Any], metadata: dict[str, Any] | None, constraint_key: str | None = None) -> RequestRow:
    """A new request's row for `insert_requests`; constraint_key names an `insert_constraints` row of its job."""
    return (line_no, custom_id, prompt, dump_json(messages), dump_json(params), dump_json(metadata), constraint_key)


def insert_constraints(connection: Connection, job_id: int, constraints: dict[str, tuple[str, str]]) -> None:
    """A job's structured-output constraints, {key: (kind, spec)}, one row each (its requests name them by key)."""
    if constraints:
        rows = [{"job_id": job_id, "key": key, "kind": kind, "spec": spec} for key, (kind, spec) in constraints.items()]
        connection.execute(insert(OutputConstraint), rows)


def insert_requests(connection: Connection, job_id: int, chunks: Iterable[Sequence[RequestRow]]) -> None:
    """Insert a job's new requests, queued with no attempt, chunk by chunk, in the caller's transaction: COPY on
    PostgreSQL, one executemany per chunk on SQLite. The one writer of new requests (submit's, and the tests')."""
    tail = (RequestStatus.QUEUED, 0)
    dialect = connection.dialect.name
    if dialect == "postgresql":
        cursor = connection.connection.driver_connection.cursor()  # psycopg 3, in this transaction
        with cursor.copy(f"COPY requests ({', '.join(REQUEST_COLUMNS)}) FROM STDIN") as copy:
            write_row = copy.write_row
            for rows in chunks:
                for row in rows:
                    write_row((job_id, *row, *tail))
        cursor.close()
    elif dialect == "sqlite":
        placeholders = ", ".join("?" * len(REQUEST_COLUMNS))
        sql = f"INSERT INTO requests ({', '.join(REQUEST_COLUMNS)}) VALUES ({placeholders})"
        for rows in chunks:
            if rows:
                connection.exec_driver_sql(sql, [(job_id, *row, *tail) for row in rows])
    else:
        raise NotImplementedError(f"no bulk insert for database dialect {dialect!r}")


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
