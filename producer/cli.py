"""The producer CLI: submit a JSONL file, watch jobs, read results, manage the store's schema."""
from __future__ import annotations

from typing import Any

import click

from contract.errors import BulkgenError
from producer.commands import db, jobs, lifecycle, query, redis, results, stats, submit

CONTEXT = {"help_option_names": ["-h", "--help"]}


class Commands(click.Group):
    """The producer's commands: an error the library raises (contract.errors) is printed as a message,
    after its details (each bad row of an input), and exits 1; never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BulkgenError as exc:
            for line in exc.details():
                click.echo(line, err=True)
            raise click.ClickException(str(exc)) from None


@click.group(cls=Commands, context_settings=CONTEXT)
def main() -> None:
    """Submit bulk LLM generation jobs and read their results.

    \b
    producer db upgrade                     # create or migrate the store
    producer submit prompts.jsonl --wait    # validate, store, enqueue, watch
    producer results 1 -o out.jsonl
    """


main.add_command(submit.submit)
main.add_command(jobs.jobs)
main.add_command(jobs.status)
main.add_command(results.results)
main.add_command(db.db)
main.add_command(redis.redis)
main.add_command(query.query)
main.add_command(stats.stats)
main.add_command(lifecycle.cancel)
main.add_command(lifecycle.retry)
main.add_command(lifecycle.reconcile)
