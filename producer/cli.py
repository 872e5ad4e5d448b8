"""The producer CLI: submit a JSONL file, watch jobs, read results, manage the store's schema."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from sqlalchemy import Engine

from models.db import SchemaBehind, check_schema, make_engine, schema_revisions, upgrade_schema
from workers.settings import Settings, get_settings, redact

CONTEXT = {"help_option_names": ["-h", "--help"]}


def _settings(database_url: str | None = None, broker_url: str | None = None) -> Settings:
    settings = get_settings()
    updates = {k: v for k, v in {"database_url": database_url, "broker_url": broker_url}.items() if v}
    return settings.model_copy(update=updates) if updates else settings


def open_store(settings: Settings) -> Engine:
    """The store's engine, refusing a schema that is behind the code."""
    db = make_engine(settings.database_url)
    try:
        check_schema(db)
    except SchemaBehind as exc:
        raise click.ClickException(str(exc)) from None
    except Exception as exc:
        raise click.ClickException(f"cannot reach the database {redact(settings.database_url)}: {exc}") from None
    return db


database_option = click.option("--database-url", default=None, help="Results store URL [env BULKGEN_DATABASE_URL].")


@click.group(context_settings=CONTEXT)
def main() -> None:
    """Submit bulk LLM generation jobs and read their results.

    \b
    producer db upgrade                     # create or migrate the store
    producer submit prompts.jsonl --wait    # validate, store, enqueue, watch
    producer results 1 -o out.jsonl
    """


@main.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--model", default=None, help="Model that generates this job [env BULKGEN_MODEL].")
@click.option("--name", default=None, help="A name for the job.")
@click.option("--max-new-tokens", type=int, default=None, help="Default max_new_tokens for lines without one.")
@click.option("--temperature", type=float, default=None, help="Default temperature (0 = greedy; 1.0 if unset).")
@click.option("--top-p", type=float, default=None, help="Default top_p (1.0 if unset).")
@click.option("--top-k", type=int, default=None, help="Default top_k (0 = off if unset).")
@click.option("--seed", type=int, default=None, help="Default seed (a random one, recorded with each result, if unset).")
@click.option("--n", "n", type=int, default=None, help="Default samples per prompt (1 if unset).")
@click.option("--skip-invalid", is_flag=True, help="Enqueue the good lines; record the bad ones as rejects.")
@click.option("--wait", is_flag=True, help="Show a live progress bar until the job ends.")
@database_option
@click.option("--broker-url", default=None, help="Redis URL [env BULKGEN_BROKER_URL].")
def submit(file: Path, model, name, max_new_tokens, temperature, top_p, top_k, seed, n, skip_invalid, wait, database_url, broker_url) -> None:  # type: ignore[no-untyped-def]
    """Validate FILE (JSONL, one request per line), store it as a job and enqueue it; print the job id.

    Every bad line is reported as FILE:LINE: reason, and then nothing is written or enqueued
    (unless --skip-invalid). Values on a line override the flags.

    \b
    {"prompt": "Once upon a time", "max_new_tokens": 50}
    {"messages": [{"role": "user", "content": "Hi!"}], "temperature": 0.7, "n": 3}
    """
    from producer.reader import EmptyInput, InputFileError, format_error
    from producer.schema import validate_defaults
    from producer.submit import enqueue_job, store_job, validate_file
    from workers.registry import ModelNotFound, context_length

    settings = _settings(database_url, broker_url)
    model = model or settings.model
    if not file.exists():
        raise click.ClickException(f"{file}: no such file")
    if not file.is_file():
        raise click.ClickException(f"{file}: not a regular file")
    try:
        context = context_length(model)
    except ModelNotFound as exc:
        raise click.ClickException(str(exc)) from None
    flags = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed, "n": n}
    defaults = {k: v for k, v in flags.items() if v is not None}
    flag_errors = validate_defaults(defaults, context)
    if flag_errors:
        raise click.ClickException("; ".join(flag_errors))

    try:
        validation = validate_file(file, defaults, context)
    except (EmptyInput, InputFileError) as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"{file}: {exc.strerror or exc}") from None
    for line_no, reason in validation.errors:
        click.echo(format_error(file.name, line_no, reason), err=True)
    if validation.error_count > len(validation.errors):
        click.echo(f"... and {validation.error_count - len(validation.errors)} more errors", err=True)
    if validation.rejected_lines and not skip_invalid:
        raise click.ClickException(
            f"{validation.rejected_lines} invalid line(s) in {file.name}; nothing was submitted (fix them, or use --skip-invalid)"
        )
    if validation.valid == 0:
        raise click.ClickException(f"{file.name}: no valid request to submit")

    db = open_store(settings)
    from workers.app import GENERATE_TASK, make_app

    app = make_app(settings.broker_url)
    try:
        app.connection_for_write().ensure_connection(max_retries=2, interval_start=0.2, interval_step=0.5)
    except Exception as exc:
        raise click.ClickException(f"cannot reach the broker {redact(settings.broker_url)}: {exc}") from None

    job_id = store_job(db, file, model=model, name=name, defaults=defaults, context_length=context, validation=validation)
    with app.producer_or_acquire() as amqp_producer:

        def send(queue: str, job: int, ids: list[int]) -> None:
            app.send_task(GENERATE_TASK, args=[job, ids], queue=queue, producer=amqp_producer)

        enqueue_job(db, job_id, model, settings.ids_per_message, send)
    if validation.rejected_lines:
        click.echo(f"skipped {validation.rejected_lines} invalid line(s); see: producer status {job_id}", err=True)
    click.echo(job_id)
    if wait:
        from producer.progress import watch

        status = watch(db, job_id)
        if status != "completed":
            sys.exit(1)


@main.command()
@click.option("--limit", type=int, default=20, show_default=True, help="How many of the newest jobs to show.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")
@database_option
def jobs(limit: int, as_json: bool, database_url: str | None) -> None:
    """List the newest jobs with their progress."""
    from producer.views import job_rows, print_table

    rows = job_rows(open_store(_settings(database_url)), limit)
    if as_json:
        for row in rows:
            click.echo(json.dumps(row, default=str))
    else:
        print_table("jobs", rows)


@main.command()
@click.argument("job_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="JSON instead of tables.")
@database_option
def status(job_id: int, as_json: bool, database_url: str | None) -> None:
    """Show a job: its state, requests by state, token totals, throughput and failures."""
    from producer.views import job_status, print_status

    info = job_status(open_store(_settings(database_url)), job_id)
    if info is None:
        raise click.ClickException(f"no job {job_id}")
    if as_json:
        click.echo(json.dumps(info, default=str, indent=2))
    else:
        print_status(info)


@main.command()
@click.argument("job_id", type=int)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write JSONL here instead of stdout.")
@click.option("--table", is_flag=True, help="Print a table instead of JSONL.")
@database_option
def results(job_id: int, output: Path | None, table: bool, database_url: str | None) -> None:
    """Export a job's results as JSONL: custom_id, sample_index, text, token counts, finish_reason, metadata.

    Failed requests appear with their error instead of a text. Streams: any size in bounded memory.
    """
    from producer.views import print_results_table, result_records

    db = open_store(_settings(database_url))
    from models.tables import Job
    from sqlalchemy.orm import Session

    with Session(db) as session:
        if session.get(Job, job_id) is None:
            raise click.ClickException(f"no job {job_id}")
    records = result_records(db, job_id)
    if table:
        print_results_table(records)
        return
    out = output.open("w", encoding="utf-8") if output else sys.stdout
    try:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        if output:
            out.close()


@main.group()
def db() -> None:
    """Manage the store's schema (Alembic migrations)."""


@db.command()
@database_option
def upgrade(database_url: str | None) -> None:
    """Create the store or migrate it to the schema this code needs."""
    settings = _settings(database_url)
    try:
        upgrade_schema(settings.database_url)
    except Exception as exc:
        raise click.ClickException(f"cannot migrate {redact(settings.database_url)}: {exc}") from None
    click.echo(f"{redact(settings.database_url)} is at the current schema")


@db.command()
@database_option
def current(database_url: str | None) -> None:
    """Show the store's schema revision and the one this code needs."""
    settings = _settings(database_url)
    revision, head = schema_revisions(make_engine(settings.database_url))
    click.echo(f"database: {revision or 'empty'}; code needs: {head}")


