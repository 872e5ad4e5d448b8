"""`producer submit`: validate an input (JSONL, Parquet, CSV, a saved dataset), store it as a job, enqueue it."""
from __future__ import annotations

import sys
from pathlib import Path

from typing import TYPE_CHECKING

import click

from producer.context import broker_option, database_option, say, settings_with

if TYPE_CHECKING:
    from contract.settings import Settings


@click.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--model", default=None, help="Model that generates this job [env BULKGEN_MODEL]: an alias, a model directory, "
              "a .gguf file or a Hugging Face id; a local path names one queue however it is spelt.")
@click.option("--context-length", type=click.IntRange(min=1), default=None, metavar="TOKENS",
              help="The model's context, for a model this machine does not hold (max_new_tokens is checked "
                   "against it; each prompt's length is checked by the worker). Default: read from the model.")
@click.option("--name", default=None, help="A name for the job.")
@click.option("--max-new-tokens", type=int, default=None, help="Default max_new_tokens for lines without one.")
@click.option("--temperature", type=float, default=None, help="Default temperature (0 = greedy; 1.0 if unset).")
@click.option("--top-p", type=float, default=None, help="Default top_p (1.0 if unset).")
@click.option("--top-k", type=int, default=None, help="Default top_k (0 = off if unset).")
@click.option("--seed", type=int, default=None, help="Default seed (a random one, recorded with each result, if unset).")
@click.option("--n", "n", type=int, default=None, help="Default samples per prompt (1 if unset).")
@click.option("--system-prompt", default=None, metavar="TEXT",
              help="A system message put first in each chat request (messages) that has none; plain prompts are left as they are.")
@click.option("--skip-invalid", is_flag=True, help="Enqueue the good lines; record the bad ones as rejects.")
@click.option("--wait", is_flag=True, help="Show a live progress bar until the job ends.")
@click.option("--resume", "resume_job", type=int, default=None, metavar="JOB",
              help="Finish JOB, submitted from this same FILE: enqueue only its requests that have no result yet "
                   "(and are on no queue). Also finishes a submit interrupted while enqueueing. The job keeps its own flags.")
@click.option("--prompt-column", default=None, metavar="COLUMN", help="Tables: the column holding the prompt (default: a column named prompt).")
@click.option("--messages-column", default=None, metavar="COLUMN",
              help="Tables: the column holding chat messages, a list of {role, content} or JSON text (default: messages).")
@click.option("--id-column", default=None, metavar="COLUMN", help="Tables: the column holding custom_id (default: custom_id; else the row number).")
@click.option("--column", "column_pairs", multiple=True, metavar="FIELD=COLUMN",
              help="Tables: read a field (max_new_tokens, temperature, top_p, top_k, seed, n, stop, ...) from COLUMN; repeatable. "
                   "A column named as a field is taken as it without this.")
@click.option("--csv-null", "csv_nulls", multiple=True, metavar="WORD",
              help="CSV/TSV: read a cell that is exactly WORD (unquoted) as null, i.e. not given; repeatable, e.g. "
                   "--csv-null NA --csv-null null. Without it a cell is the text it holds: NA, null, N/A, nan are text, "
                   "and only an empty cell is null.")
@database_option
@broker_option
def submit(file: Path, model, context_length, name, max_new_tokens, temperature, top_p, top_k, seed, n, system_prompt, skip_invalid, wait, resume_job,  # type: ignore[no-untyped-def]
           prompt_column, messages_column, id_column, column_pairs, csv_nulls, database_url, broker_url) -> None:
    """Validate FILE, store it as a job and enqueue it; print the job id.

    FILE is JSONL (one request per line), a Parquet or CSV file (one request per row), or a directory
    written by `datasets`' save_to_disk. Every bad line or row is reported as FILE:N: reason, and then
    nothing is written or enqueued (unless --skip-invalid). Values on a line or row override the flags.

    \b
    {"prompt": "Once upon a time", "max_new_tokens": 50}
    {"messages": [{"role": "user", "content": "Hi!"}], "temperature": 0.7, "n": 3}

    An OpenAI Batch API input file is detected and taken as it is (lines with custom_id, method, url
    /v1/chat/completions or /v1/completions, and body); `producer results JOB --format openai` writes
    the matching output file.

    Tables: columns map to fields (--prompt-column, --messages-column, --id-column, --column FIELD=COLUMN),
    else a column named prompt, messages, custom_id or as a sampling field is taken as it; every other
    column is kept as the request's metadata, and `producer results JOB --join -o out.parquet` writes
    them back beside the generated text. A null cell is "not given"; a null prompt is an error. CSV cells
    are text as written (the sampling fields are parsed): a cell NA, null or nan is that text, not null;
    only an empty cell is null, unless --csv-null names more. The job records the mapping and the null
    words: --resume needs neither.

    \b
    producer submit data.parquet --prompt-column question --column max_new_tokens=budget
    """
    import os

    # Arrow's default allocator (mimalloc) keeps ~40 MiB of freed batches; the system one returns them (measured on a
    # 1M-row Parquet submit: peak RSS 289 -> 250 MiB, docs/benchmarks.md). Set before pyarrow is first used; this process only.
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    from producer import api

    settings = settings_with(database_url, broker_url)
    columns = _columns(prompt_column, messages_column, id_column, column_pairs)
    if resume_job is not None:
        sent = api.resume(file, resume_job, settings=settings, columns=columns, csv_nulls=csv_nulls or None,
                          context_length=context_length)
        say(f"job {resume_job}: {sent} requests without results enqueued again", job_id=resume_job, sent=sent)
        click.echo(resume_job)
        _wait(resume_job, settings, wait)
        return
    flags = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed, "n": n,
             "system_prompt": system_prompt}
    job = api.submit(file, model=model, name=name, skip_invalid=skip_invalid, settings=settings, columns=columns,
                     csv_nulls=csv_nulls, context_length=context_length, **flags)
    report = job.report
    assert report is not None
    if report.rejected:
        for bad in report.errors:
            say(f"{report.source}:{bad.position}: {bad.reason}", level="warning", job_id=job.id, position=bad.position)
        if report.error_count > len(report.errors):
            say(f"... and {report.error_count - len(report.errors)} more errors", level="warning", job_id=job.id)
        say(f"skipped {report.rejected} invalid {report.unit}(s); see: producer status {job.id}", level="warning", job_id=job.id,
            rejected=report.rejected)
    click.echo(job.id)
    _wait(job.id, settings, wait)


def _columns(prompt: str | None, messages: str | None, custom_id: str | None, pairs: tuple[str, ...]) -> dict[str, str] | None:
    """The column mapping the options give (field -> column), or None when none is given."""
    columns = {key: value for key, value in (("prompt", prompt), ("messages", messages), ("custom_id", custom_id)) if value}
    for pair in pairs:
        key, sep, column = pair.partition("=")
        if not sep or not key.strip() or not column:
            raise click.BadParameter(f"expected FIELD=COLUMN, got {pair!r}", param_hint="--column")
        key = key.strip()
        if key in columns and columns[key] != column:
            raise click.BadParameter(f"{key} is given two columns ({columns[key]!r} and {column!r})", param_hint="--column")
        columns[key] = column
    return columns or None


def _wait(job_id: int, settings: Settings, wait: bool) -> None:
    if not wait:
        return
    from migrations.schema import open_store
    from models.tables import JobStatus
    from producer.progress import watch

    db = open_store(settings.database_url)
    try:
        status = watch(db, job_id)
    finally:
        db.dispose()
    if status != JobStatus.COMPLETED:
        sys.exit(1)
