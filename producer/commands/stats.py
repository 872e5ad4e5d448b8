"""`producer stats`: what runs, how fast, and what fails."""
from __future__ import annotations

import json

import click

from contract.errors import JobNotFound
from producer.context import database_option, settings_with

TOTALS_ONLY = ("draft_tokens", "accepted_draft_tokens")
"""Per-worker and per-model counts the tables leave to --json (their share, speculation_acceptance, is shown)."""


@click.command()
@click.argument("job_id", type=int, required=False)
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts instead of tables.")
@database_option
def stats(job_id: int | None, as_json: bool, database_url: str | None) -> None:
    """Requests by state, token totals, tokens/s overall, per worker and per model, elapsed time, ETA, failures.

    Without JOB_ID: over every job in the store.
    """
    from migrations.schema import open_store
    from producer.stats import collect

    info = collect(open_store(settings_with(database_url).database_url), job_id)
    if job_id is not None and info["jobs"] == 0:
        raise JobNotFound(job_id)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    summary = Table(title=f"job {job_id}" if job_id is not None else f"all {info['jobs']} jobs", show_header=False)
    for key in ("requests", "constrained_requests", "prompt_tokens", "prefix_hit_rate", "completion_tokens", "draft_tokens", "accepted_draft_tokens",
                "speculation_acceptance", "elapsed_s", "tokens_per_s", "eta_s"):
        summary.add_row(key, "" if info[key] is None else str(info[key]))
    for state, count in sorted(info["by_state"].items()):
        summary.add_row(f"requests {state}", str(count))
    console.print(summary)
    for title, rows in (("per worker", info["per_worker"]), ("per model", info["per_model"]), ("failures by reason", info["failures"])):
        if rows:
            table = Table(title=title)
            columns = [c for c in rows[0] if c not in TOTALS_ONLY]
            for column in columns:
                table.add_column(column.replace("_", " "))  # words: a narrow terminal wraps a header instead of cutting it
            for row in rows:
                table.add_row(*("" if row[c] is None else str(row[c]) for c in columns))
            console.print(table)
