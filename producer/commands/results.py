"""`producer results`: export a job's results, streamed, as JSONL, CSV, Parquet or OpenAI Batch output."""
from __future__ import annotations

import sys
from pathlib import Path

import click
from sqlalchemy.orm import Session

from contract.errors import JobNotFound
from producer.context import database_option, settings_with
from producer.export import FORMATS, flat_records, write_csv, write_jsonl, write_openai, write_parquet


@click.command()
@click.argument("job_id", type=int)
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="jsonl", show_default=True, help="Output format.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write here instead of stdout (required for parquet).")
@click.option("--table", is_flag=True, help="Print a table for reading in a terminal instead.")
@click.option("--join", is_flag=True,
              help="For a job submitted from a table (Parquet, CSV, a dataset, a DataFrame): write Parquet (-o required) with "
                   "the input's columns, as the input named and typed them, plus input_row, sample_index, status, text, "
                   "finish_reason, token counts, seed and error (result_<name> where an input column has the name); "
                   "one row per result. Rows rejected with --skip-invalid are not in it.")
@database_option
@click.pass_context
def results(ctx: click.Context, job_id: int, fmt: str, output: Path | None, table: bool, join: bool, database_url: str | None) -> None:
    """Export a job's results: custom_id, sample_index, text, token counts, finish_reason, seed, metadata.

    Requests without a result (failed, cancelled, not done yet) appear with their status and error.
    Streams: a job of any size exports in bounded memory.

    \b
    producer results 7 -o out.jsonl
    producer results 7 --format openai -o batch_output.jsonl   # OpenAI Batch output format
    producer results 7 --format parquet -o out.parquet         # pandas / datasets.load_dataset("parquet", ...)
    producer results 7 --join -o joined.parquet                # the input's columns with the generated ones
    """
    from migrations.schema import open_store
    from models.tables import Job

    db = open_store(settings_with(database_url).database_url)
    with Session(db) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise JobNotFound(job_id)
        model = job.model
    if join:
        from click.core import ParameterSource

        if table or (ctx.get_parameter_source("fmt") != ParameterSource.DEFAULT and fmt != "parquet"):
            raise click.BadParameter("--join writes Parquet: drop --format/--table, and give -o FILE.parquet", param_hint="--join")
        if output is None:
            raise click.BadParameter("--join writes Parquet and needs a file: -o joined.parquet", param_hint="--output")
        from producer.export import write_joined

        write_joined(db, job_id, str(output))
        return
    if table:
        from producer.views import print_results_table

        print_results_table(flat_records(db, job_id))
        return
    if fmt == "parquet":
        if output is None:
            raise click.BadParameter("parquet needs a file: -o results.parquet", param_hint="--output")
        write_parquet(db, job_id, str(output))
        return
    out = output.open("w", encoding="utf-8", newline="") if output else sys.stdout
    try:
        if fmt == "jsonl":
            write_jsonl(db, job_id, out)
        elif fmt == "csv":
            write_csv(db, job_id, out)
        else:
            write_openai(db, job_id, out, model)
    finally:
        if output:
            out.close()
