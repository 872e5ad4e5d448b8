"""Reading jobs: `producer jobs`, `producer status`."""
from __future__ import annotations

import json

import click

from contract.errors import JobNotFound
from producer.context import database_option, settings_with


@click.command()
@click.option("--limit", type=int, default=20, show_default=True, help="How many of the newest jobs to show.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")
@database_option
def jobs(limit: int, as_json: bool, database_url: str | None) -> None:
    """List the newest jobs with their progress."""
    from migrations.schema import open_store
    from producer.views import job_rows, print_table

    rows = job_rows(open_store(settings_with(database_url).database_url), limit)
    if as_json:
        for row in rows:
            click.echo(json.dumps(row, default=str))
    else:
        print_table("jobs", rows)


@click.command()
@click.argument("job_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="JSON instead of tables.")
@database_option
def status(job_id: int, as_json: bool, database_url: str | None) -> None:
    """Show a job: its state, requests by state, token totals, throughput and failures."""
    from migrations.schema import open_store
    from producer.views import job_status, print_status

    info = job_status(open_store(settings_with(database_url).database_url), job_id)
    if info is None:
        raise JobNotFound(job_id)
    if as_json:
        click.echo(json.dumps(info, default=str, indent=2))
    else:
        print_status(info)
