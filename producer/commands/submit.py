"""`producer submit`: validate a JSONL file, store it as a job, enqueue it."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from producer.context import broker_option, database_option, open_store, settings_with
from workers.settings import redact


@click.command()
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
@click.option("--resume", "resume_job", type=int, default=None, metavar="JOB",
              help="Finish JOB, submitted from this same FILE: enqueue only its requests that have no result yet "
                   "(and are on no queue). Also finishes a submit interrupted while enqueueing. The job keeps its own flags.")
@database_option
@broker_option
def submit(file: Path, model, name, max_new_tokens, temperature, top_p, top_k, seed, n, skip_invalid, wait, resume_job, database_url, broker_url) -> None:  # type: ignore[no-untyped-def]
    """Validate FILE (JSONL, one request per line), store it as a job and enqueue it; print the job id.

    Every bad line is reported as FILE:LINE: reason, and then nothing is written or enqueued
    (unless --skip-invalid). Values on a line override the flags.

    \b
    {"prompt": "Once upon a time", "max_new_tokens": 50}
    {"messages": [{"role": "user", "content": "Hi!"}], "temperature": 0.7, "n": 3}

    An OpenAI Batch API input file is detected and taken as it is (lines with custom_id, method, url
    /v1/chat/completions or /v1/completions, and body); `producer results JOB --format openai` writes
    the matching output file.
    """
    from producer.reader import EmptyInput, InputFileError, format_error
    from producer.schema import validate_defaults
    from producer.submit import BatchSender, enqueue_job, store_job, validate_file
    from workers.registry import ModelNotFound, context_length

    settings = settings_with(database_url, broker_url)
    if resume_job is not None:
        from producer.commands.lifecycle import resume_submit

        resume_submit(file, resume_job, settings, wait)
        return
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
    try:
        with BatchSender(app, GENERATE_TASK) as send:
            enqueue_job(db, job_id, model, settings.ids_per_message, send)
    except (Exception, KeyboardInterrupt) as exc:
        raise click.ClickException(
            f"job {job_id} is stored, but enqueueing it stopped ({type(exc).__name__}); "
            f"finish it with: producer submit {file} --resume {job_id}"
        ) from None
    if validation.rejected_lines:
        click.echo(f"skipped {validation.rejected_lines} invalid line(s); see: producer status {job_id}", err=True)
    click.echo(job_id)
    if wait:
        from producer.progress import watch

        status = watch(db, job_id)
        if status != "completed":
            sys.exit(1)
