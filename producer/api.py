"""The producer as a library: submit, resume, retry, cancel and reconcile from Python, with the guarantees
and the validation of the CLI (whose commands are thin calls into this module).

    from producer import api
    job = api.submit([{"prompt": "Once upon a time"}, {"messages": [...]}], max_new_tokens=64)
    job = api.submit("prompts.jsonl", model="smollm2-135m-instruct")
    info = job.wait(progress=True)              # JobInfo: status, counts, tokens
    for record in job.results(): ...            # streamed, bounded memory
    frame = job.to_pandas()                     # or to_arrow(), to_dataset()
    api.job(7).retry()                          # a handle on an existing job

Every failure is a contract.errors.BulkgenError: InvalidInput (every bad row with its position and reason;
nothing was written), ModelNotFound, BrokerUnreachable, StoreUnreachable, SchemaBehind, JobNotFound, ...
Settings come from BULKGEN_* (contract.settings); `database_url` and `broker_url` override them.

Importing this module is cheap (no SQLAlchemy, Celery or pydantic until a call needs them), and a call
leaves no thread behind and no database connection open: usable from a notebook and from a script that then exits.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from contract.errors import (
    BadRow,
    EmptyInput,
    EnqueueInterrupted,
    InvalidDefaults,
    InvalidInput,
    JobNotFound,
    ResumeRefused,
)

if TYPE_CHECKING:
    from contract.settings import Settings

    from reconciler.sweep import SweepReport

KEEP_ERRORS = 1000
"""Bad rows an InvalidInput carries (it counts them all)."""


def settings_for(database_url: str | None = None, broker_url: str | None = None, settings: Settings | None = None) -> Settings:
    """The settings a producer runs with: an argument wins, then the submitter's own URLs
    (BULKGEN_SUBMITTER_DATABASE_URL, BULKGEN_SUBMITTER_BROKER_URL), then the shared ones."""
    from contract.settings import get_settings

    settings = settings or get_settings()
    database_url = database_url or settings.submitter_database_url
    broker_url = broker_url or settings.submitter_broker_url
    updates = {k: v for k, v in {"database_url": database_url, "broker_url": broker_url}.items() if v}
    return settings.model_copy(update=updates) if updates else settings


@dataclass
class SubmitReport:
    """What a submit stored: good requests, their samples, and the rows rejected (with --skip-invalid)."""

    valid: int = 0
    samples: int = 0
    rejected: int = 0
    errors: list[BadRow] = field(default_factory=list)
    """The first KEEP_ERRORS reasons of the rejected rows."""
    error_count: int = 0
    source: str = ""
    unit: str = "line"
    """What a position counts: 'line' (JSONL) or 'row' (tables, rows from Python)."""


@dataclass(frozen=True)
class JobInfo:
    """A job as the store had it when it was read (Job.status(), Job.wait())."""

    id: int
    name: str | None
    model: str
    status: str
    """submitting, queued, running, then completed (every request done or failed: see `failed`) or cancelled."""
    requests: int
    done: int
    failed: int
    rejected: int
    """Input rows refused at submit (with skip_invalid)."""
    results: int
    """Results stored (a request with n samples has n)."""
    prompt_tokens: int
    completion_tokens: int
    tokens_per_s: float | None
    elapsed_s: float | None
    by_state: dict[str, int]
    """Requests by state: queued, running, done, failed, cancelled."""
    failures: list[dict[str, Any]]
    """The commonest reasons requests failed: [{'reason', 'count'}], at most 20."""
    source: str | None
    defaults: dict[str, Any]
    """The job's sampling defaults (a row's own values win)."""

    @property
    def finished(self) -> bool:
        from models.tables import JobStatus

        return self.status in JobStatus.FINAL


class Job:
    """A handle on a stored job: its id and the settings it is reached with. Holds no connection between calls."""

    def __init__(self, job_id: int, settings: Settings | None = None, report: SubmitReport | None = None) -> None:
        self.id = job_id
        self.settings = settings or settings_for()
        self.report = report
        """What the submit that made this handle stored (None for a handle on an existing job)."""

    def __repr__(self) -> str:
        return f"Job({self.id})"

    def status(self) -> JobInfo:
        """The job's state now (JobNotFound when the store has no such job)."""
        from migrations.schema import open_store
        from producer.views import job_status

        db = open_store(self.settings.database_url)
        try:
            info = job_status(db, self.id)
        finally:
            db.dispose()
        if info is None:
            raise JobNotFound(self.id)
        return JobInfo(
            id=info["id"], name=info["name"], model=info["model"], status=info["status"], requests=info["requests"],
            done=info["done"], failed=info["failed"], rejected=info["rejected"], results=info["results"],
            prompt_tokens=info["prompt_tokens"], completion_tokens=info["completion_tokens"],
            tokens_per_s=info["tokens_per_s"], elapsed_s=info["elapsed_s"], by_state=dict(info["by_state"]),
            failures=list(info["failures"]), source=info["source"],
            defaults=dict(info["defaults"] or {}),
        )

    def wait(self, progress: bool = False, timeout: float | None = None, poll_s: float = 0.5) -> JobInfo:
        """Block until the job ends (completed, failed or cancelled) and return its final state; `progress`
        draws a live bar on stderr. Raises TimeoutError after `timeout` seconds (the job goes on)."""
        from migrations.schema import open_store
        from producer.progress import follow

        db = open_store(self.settings.database_url)
        try:
            follow(db, self.id, poll_s=poll_s, timeout=timeout, show=progress)
        finally:
            db.dispose()
        return self.status()

    def results(self, logprobs: bool = False) -> Iterator[dict[str, Any]]:
        """Every result of the job as a dict (custom_id, sample_index, status, text, finish_reason, token
        counts, seed, error, metadata), in input order; a request without results (failed, cancelled or not
        done yet) gives one record with text None. Streamed from the store in pages: bounded memory for any
        job size. The store is released when the iteration ends (or the iterator is closed)."""
        from migrations.schema import open_store
        from producer.export import flat_records

        db = open_store(self.settings.database_url)
        try:
            yield from flat_records(db, self.id, logprobs=logprobs)
        finally:
            db.dispose()

    def to_arrow(self):  # type: ignore[no-untyped-def]
        """The results as a pyarrow.Table with the Parquet export's columns (metadata as JSON text). Held in
        memory: for a job too big for that, iterate results() or export to Parquet (`producer results`)."""
        import pyarrow as pa

        from migrations.schema import open_store
        from producer.export import arrow_batches, arrow_schema

        db = open_store(self.settings.database_url)
        try:
            return pa.Table.from_batches(list(arrow_batches(db, self.id)), schema=arrow_schema())
        finally:
            db.dispose()

    def to_pandas(self):  # type: ignore[no-untyped-def]
        """The results as a pandas DataFrame (to_arrow()'s columns; needs pandas)."""
        return self.to_arrow().to_pandas()

    def to_dataset(self):  # type: ignore[no-untyped-def]
        """The results as a Hugging Face datasets.Dataset (to_arrow()'s columns; needs datasets)."""
        import datasets

        return datasets.Dataset(datasets.table.InMemoryTable(self.to_arrow()))

    def cancel(self) -> dict[str, Any]:
        """Drop the job's queued requests (workers skip their messages); those running finish."""
        return cancel(self.id, settings=self.settings)

    def retry(self) -> int:
        """Send again the failed, cancelled and missing requests; returns how many were sent."""
        return retry(self.id, settings=self.settings)

    def resume(self, source: Any, **options: Any) -> int:
        """Finish this job from the input it was submitted from; returns how many requests were sent."""
        return resume(source, self.id, settings=self.settings, **options)


def job(job_id: int, *, database_url: str | None = None, settings: Settings | None = None) -> Job:
    """A handle on an existing job; raises JobNotFound when the store has none with this id."""
    handle = Job(job_id, settings_for(database_url, None, settings))
    handle.status()
    return handle


def submit(
    source: Any,
    *,
    model: str | None = None,
    name: str | None = None,
    skip_invalid: bool = False,
    database_url: str | None = None,
    broker_url: str | None = None,
    settings: Settings | None = None,
    columns: Mapping[str, str] | None = None,
    csv_nulls: Sequence[str] = (),
    context_length: int | None = None,
    **defaults: Any,
) -> Job:
    """Validate every row of `source`, store the job and its requests in one transaction, then enqueue them.

    `source`: a path to a JSONL file (native or OpenAI Batch lines), a Parquet or CSV file, or a directory
    saved by `datasets`' save_to_disk; a pyarrow.Table, pandas.DataFrame or datasets.Dataset; or rows from
    Python (a list or any iterable of dicts, native or OpenAI Batch lines; read once). `columns` maps fields
    to column names for tables (`prompt`, `messages`, `custom_id`, and any sampling field; unmapped fields
    take the column of their own name); other columns become metadata, and the job records the mapping
    (resume reads the table again with it) and the schema (`results --join`). `csv_nulls`: CSV cells read as
    null besides an empty one (none by default: a cell `NA` is the text NA; recorded for resume). Keyword arguments are
    the job's defaults (max_new_tokens, temperature, top_p, top_k, seed, n, ...); a row's own value wins.
    `context_length`: the model's context, for a model this machine does not hold (else read from the model).

    Raises InvalidInput with every bad row before anything is written (unless skip_invalid, which stores
    the good rows and records the bad ones as rejects), ModelNotFound, StoreUnreachable, SchemaBehind,
    BrokerUnreachable, and EnqueueInterrupted when the job is stored but its enqueue stopped.
    """
    from contract.broker import Sender, connect
    from contract.registry import canonical_name, context_length as model_context
    from migrations.schema import open_store
    from producer import interrupt
    from producer.inputs import open_input
    from producer.schema import validate_defaults
    from producer.submit import enqueue_job, store_job, validate_file

    settings = settings_for(database_url, broker_url, settings)
    model = canonical_name(model or settings.model)
    context = _context(model_context, model, context_length)
    defaults = {k: v for k, v in defaults.items() if v is not None}
    problems = validate_defaults(defaults, context)
    if problems:
        raise InvalidDefaults("; ".join(problems))
    data = open_input(source, columns, csv_nulls)
    validation = validate_file(data, defaults, context, keep_errors=KEEP_ERRORS)
    report = SubmitReport(
        valid=validation.valid, samples=validation.samples, rejected=validation.rejected_lines,
        errors=[BadRow(p, r) for p, r in validation.errors], error_count=validation.error_count, source=data.name,
        unit=data.unit,
    )
    try:
        if validation.rejected_lines and not skip_invalid:
            raise InvalidInput(data.name, report.errors, error_count=validation.error_count,
                               rejected=validation.rejected_lines, unit=data.unit)
        if validation.valid == 0:
            raise EmptyInput(f"{data.name}: no valid request to submit")
        db = open_store(settings.database_url)
        app = connect(settings)
    except BaseException:
        if validation.spool is not None:
            validation.spool.close()
        raise
    try:
        with interrupt.remembering():
            job_id = store_job(db, data, model=model, name=name, defaults=defaults, context_length=context, validation=validation)
            try:
                with Sender(app) as send:
                    enqueue_job(db, job_id, model, settings.ids_per_message, send)
            except (Exception, KeyboardInterrupt) as exc:
                raise EnqueueInterrupted(
                    job_id, f"job {job_id} is stored, but enqueueing it stopped ({type(exc).__name__}); "
                    f"finish it with: producer submit {data.path} --resume {job_id}"
                ) from None
    finally:
        db.dispose()
    return Job(job_id, settings, report)


def resume(
    source: Any,
    job_id: int,
    *,
    database_url: str | None = None,
    broker_url: str | None = None,
    settings: Settings | None = None,
    columns: Mapping[str, str] | None = None,
    csv_nulls: Sequence[str] | None = None,
    context_length: int | None = None,
) -> int:
    """Finish job_id from the input it was submitted from: check it is that input, then send every request
    of the job that has no result yet and that no message carries (what also finishes a submit that was
    interrupted while it enqueued). Returns how many requests were sent. A table is read with the column
    mapping and CSV null words the job recorded, unless `columns` / `csv_nulls` are given."""
    from sqlalchemy.orm import Session

    from contract.broker import connect
    from reconciler.sweep import enqueue_missing
    from contract.registry import context_length as model_context
    from migrations.schema import open_store
    from models.reads import known_custom_ids
    from models.tables import Job as JobRow
    from models.tables import JobStatus
    from producer.inputs import open_input

    settings = settings_for(database_url, broker_url, settings)
    data = open_input(source, columns, csv_nulls or ()) if columns is not None and csv_nulls is not None else None
    db = open_store(settings.database_url)
    try:
        with Session(db) as session:
            job = session.get(JobRow, job_id)
            if job is None:
                raise JobNotFound(job_id)
            if job.status == JobStatus.CANCELLED:
                raise ResumeRefused(f"job {job_id} is cancelled; `producer retry {job_id}` queues its requests again")
            model, defaults, total, rejected = job.model, dict(job.defaults or {}), job.total_requests, job.rejected_count
            recorded = job.input_columns or {}
        if data is None:
            # a table input is read again with the column mapping and null words the job recorded (jobs.input_columns)
            data = open_input(source, recorded.get("fields") if columns is None else columns,
                              recorded.get("csv_nulls", ()) if csv_nulls is None else csv_nulls)
        context = _context(model_context, model, context_length)
        valid = invalid = 0
        custom_ids: list[str] = []
        with Session(db) as session:

            def check(ids: list[str]) -> None:
                known = known_custom_ids(session, job_id, ids)
                if known != len(ids):
                    raise ResumeRefused(f"{data.name} is not the input job {job_id} was submitted from: "
                                        f"{len(ids) - known} of its requests are not in the job")

            for outcome in data.outcomes(defaults, context):
                if outcome.request is None:
                    invalid += 1
                    continue
                valid += 1
                custom_ids.append(outcome.request.custom_id)
                if len(custom_ids) == 5000:
                    check(custom_ids)
                    custom_ids = []
            if custom_ids:
                check(custom_ids)
        if (valid, invalid) != (total, rejected):
            raise ResumeRefused(
                f"{data.name} is not the input job {job_id} was submitted from: it has {valid} valid and {invalid} "
                f"invalid {data.unit}s, the job {total} requests and {rejected} rejected {data.unit}s"
            )
        return enqueue_missing(db, connect(settings), job_id, settings)
    finally:
        db.dispose()


def _context(lookup: Any, model: str, given: int | None) -> int:
    if given is not None and (isinstance(given, bool) or not isinstance(given, int) or given < 1):
        raise InvalidDefaults(f"context_length: must be an integer >= 1, got {given!r}")
    return lookup(model, given)


def cancel(job_id: int, *, database_url: str | None = None, settings: Settings | None = None) -> dict[str, Any]:
    """Cancel a job: its queued requests are dropped and it ends 'cancelled'; requests being generated
    finish. Returns {'changed', 'status', 'cancelled', 'running'}; raises JobNotFound."""
    from migrations.schema import open_store
    from models.db import session_factory
    from models.store import cancel_job

    db = open_store(settings_for(database_url, None, settings).database_url)
    try:
        with session_factory(db)() as session:
            info = cancel_job(session, job_id)
    finally:
        db.dispose()
    if info is None:
        raise JobNotFound(job_id)
    return info


def retry(job_id: int, *, database_url: str | None = None, broker_url: str | None = None,
          settings: Settings | None = None, report: dict[str, Any] | None = None) -> int:
    """Send again the failed and the missing requests of a job, and only those; returns how many were sent.
    `report`, when given, receives the counts of failed and cancelled requests reopened."""
    from contract.broker import connect
    from reconciler.sweep import enqueue_missing
    from migrations.schema import open_store
    from models.db import session_factory
    from models.store import reopen_job

    settings = settings_for(database_url, broker_url, settings)
    db = open_store(settings.database_url)
    try:
        app = connect(settings)
        with session_factory(db)() as session:
            info = reopen_job(session, job_id)
        if info is None:
            raise JobNotFound(job_id)
        if report is not None:
            report.update(info)
        return enqueue_missing(db, app, job_id, settings)
    finally:
        db.dispose()


def reconcile(job_ids: list[int] | None = None, *, database_url: str | None = None, broker_url: str | None = None,
              settings: Settings | None = None) -> SweepReport:
    """One pass of the reconciler (reconciler.sweep.sweep) over every open job, or only job_ids."""
    from contract.broker import connect
    from reconciler.sweep import sweep
    from migrations.schema import open_store

    settings = settings_for(database_url, broker_url, settings)
    db = open_store(settings.database_url)
    try:
        return sweep(db, connect(settings), settings, job_ids or None)
    finally:
        db.dispose()

