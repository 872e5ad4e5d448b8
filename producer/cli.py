"""The producer CLI: submit a JSONL file, watch jobs, read results, manage the store's schema."""
from __future__ import annotations

import click

from producer.commands import db, jobs, lifecycle, query, results, stats, submit

CONTEXT = {"help_option_names": ["-h", "--help"]}


@click.group(context_settings=CONTEXT)
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
main.add_command(query.query)
main.add_command(stats.stats)
main.add_command(lifecycle.cancel)
main.add_command(lifecycle.retry)
main.add_command(lifecycle.reconcile)
