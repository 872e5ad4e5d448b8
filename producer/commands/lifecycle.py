"""A job's life after its submit: `producer cancel`, `producer retry`, `producer reconcile`,
and `submit --resume` (its command lives in producer.commands.submit)."""
from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import click

from producer.context import broker_option, database_option, open_store, settings_with
from workers.settings import Settings, redact

if TYPE_CHECKING:
    from celery import Celery


def scrub(text: str, settings: Settings) -> str:
    """The text with the passwords of the configured URLs replaced by ***."""
    from workers.app import url_secrets

    for secret in url_secrets(settings.database_url, settings.broker_url):
        text = text.replace(secret, "***")
    return text


def connect_broker(settings: Settings) -> Celery:
    from workers.app import make_app

    app = make_app(settings.broker_url, settings)
    try:
        app.connection_for_write().ensure_connection(max_retries=2, interval_start=0.2, interval_step=0.5)
    except Exception as exc:
        raise click.ClickException(f"cannot reach the broker {redact(settings.broker_url)}: {scrub(str(exc), settings)}") from None
    return app


@click.command()
@click.argument("job_id", type=int)
@database_option
def cancel(job_id: int, database_url: str | None) -> None:
    """Cancel JOB: its queued requests are dropped (workers skip their messages) and it ends 'cancelled'.

    Requests being generated right now finish; results already written stay.
    `producer retry JOB` queues the cancelled requests again.
    """
    from models.db import session_factory
    from models.store import cancel_job

    db = open_store(settings_with(database_url))
    with session_factory(db)() as session:
        info = cancel_job(session, job_id)
    if info is None:
        raise click.ClickException(f"no job {job_id}")
    if not info["changed"]:
        click.echo(f"job {job_id} is already {info['status']}; nothing to cancel")
        return
    click.echo(
        f"job {job_id} cancelled: {info['cancelled']} queued requests dropped, "
        f"{info['running']} being generated will finish"
    )


@click.command()
@click.argument("job_id", type=int)
@database_option
@broker_option
def retry(job_id: int, database_url: str | None, broker_url: str | None) -> None:
    """Enqueue again the failed and the missing requests of JOB, and only those.

    Failed requests start over with a fresh attempt count; cancelled ones, queued ones that no
    message in Redis carries, and running ones whose worker is gone (lapsed lease) are sent again.
    Requests done, or queued and still on the queue, are left alone. A finished job is open again.
    """
    from models.db import session_factory
    from models.store import reopen_job
    from workers.reconcile import enqueue_missing

    settings = settings_with(database_url, broker_url)
    db = open_store(settings)
    app = connect_broker(settings)
    with session_factory(db)() as session:
        info = reopen_job(session, job_id)
    if info is None:
        raise click.ClickException(f"no job {job_id}")
    sent = enqueue_missing(db, app, job_id, settings)
    click.echo(
        f"job {job_id}: {info['failed']} failed and {info['cancelled']} cancelled requests reopened; "
        f"{sent} requests enqueued"
    )


@click.command()
@click.option("--loop", "loop_s", type=float, default=None, metavar="SECONDS",
              help="Sweep every SECONDS until interrupted, taking turns with the workers' own sweeps.")
@click.option("--job", "job_ids", type=int, multiple=True, help="Only this job (repeatable).")
@database_option
@broker_option
def reconcile(loop_s: float | None, job_ids: tuple[int, ...], database_url: str | None, broker_url: str | None) -> None:
    """Re-enqueue the requests the store says are owed and Redis no longer carries.

    Running requests whose lease has passed go back to the queue (or end failed after the
    max_attempts setting); queued requests enqueued more than reconcile_grace_s ago that no message
    carries are sent again. Workers run this sweep themselves every reconcile_interval_s; run it by
    hand after losing Redis, or with --loop where workers run with BULKGEN_RECONCILE_INTERVAL_S=0.
    """
    from workers.reconcile import sweep, take_lock

    settings = settings_with(database_url, broker_url)
    db = open_store(settings)
    app = connect_broker(settings)
    only = job_ids or None
    if loop_s is None:
        click.echo(str(sweep(db, app, settings, only)))
        return
    if loop_s <= 0:
        raise click.BadParameter("must be > 0", param_hint="--loop")
    token = f"producer-{uuid.uuid4().hex[:8]}"
    try:
        while True:
            try:
                if take_lock(app, token, loop_s * 0.9):
                    click.echo(f"{time.strftime('%H:%M:%S')} {sweep(db, app, settings, only)}")
            except Exception as exc:  # Redis or the store is down: try again next time
                click.echo(f"{time.strftime('%H:%M:%S')} sweep skipped: {type(exc).__name__}: {scrub(str(exc), settings)}", err=True)
            time.sleep(loop_s)
    except KeyboardInterrupt:
        pass


def resume_submit(file: Path, job_id: int, settings: Settings, wait: bool) -> None:
    """`producer submit FILE --resume JOB`: check FILE is the one JOB was submitted from, then enqueue
    the requests of JOB that have no result yet and that no message carries (also what finishes a
    submit that was interrupted while it enqueued)."""
    from sqlalchemy import func, select
    from sqlalchemy.orm import Session

    from models.tables import Job, JobStatus, Request
    from producer.reader import EmptyInput, InputFileError, read_requests
    from workers.reconcile import enqueue_missing
    from workers.registry import ModelNotFound, context_length

    if not file.is_file():
        raise click.ClickException(f"{file}: no such file")
    db = open_store(settings)
    with Session(db) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise click.ClickException(f"no job {job_id}")
        if job.status == JobStatus.CANCELLED:
            raise click.ClickException(f"job {job_id} is cancelled; `producer retry {job_id}` queues its requests again")
        model, defaults, total, rejected = job.model, dict(job.defaults or {}), job.total_requests, job.rejected_count
    try:
        context = context_length(model)
    except ModelNotFound as exc:
        raise click.ClickException(str(exc)) from None

    valid = invalid = 0
    custom_ids: list[str] = []
    with Session(db) as session:

        def check(ids: list[str]) -> None:
            known = session.scalar(select(func.count()).where(Request.job_id == job_id, Request.custom_id.in_(ids)))
            if known != len(ids):
                raise click.ClickException(f"{file.name} is not the file job {job_id} was submitted from: "
                                           f"{len(ids) - known} of its requests are not in the job")

        try:
            for outcome in read_requests(file, defaults, context):
                if outcome.request is None:
                    invalid += 1
                    continue
                valid += 1
                custom_ids.append(outcome.request.custom_id)
                if len(custom_ids) == 5000:
                    check(custom_ids)
                    custom_ids = []
        except (EmptyInput, InputFileError) as exc:
            raise click.ClickException(str(exc)) from None
        if custom_ids:
            check(custom_ids)
    if (valid, invalid) != (total, rejected):
        raise click.ClickException(
            f"{file.name} is not the file job {job_id} was submitted from: it has {valid} valid and {invalid} "
            f"invalid lines, the job {total} requests and {rejected} rejected lines"
        )
    app = connect_broker(settings)
    sent = enqueue_missing(db, app, job_id, settings)
    click.echo(f"job {job_id}: {sent} requests without results enqueued again", err=True)
    click.echo(job_id)
    if wait:
        from producer.progress import watch

        if watch(db, job_id) != "completed":
            sys.exit(1)
