"""The producer CLI: submit a JSONL file, watch jobs, read results, manage the store's schema."""
from __future__ import annotations

import importlib
from typing import Any

import click

from contract.errors import BulkgenError

CONTEXT = {"help_option_names": ["-h", "--help"]}
COMMANDS = {
    "submit": "producer.commands.submit:submit",
    "jobs": "producer.commands.jobs:jobs",
    "status": "producer.commands.jobs:status",
    "results": "producer.commands.results:results",
    "db": "producer.commands.db:db",
    "query": "producer.commands.query:query",
    "redis": "producer.commands.redis:redis",
    "stats": "producer.commands.stats:stats",
    "cancel": "producer.commands.lifecycle:cancel",
    "retry": "producer.commands.lifecycle:retry",
    "reconcile": "producer.commands.lifecycle:reconcile",
}
"""Each command and where it lives: a command's module is imported only when that command runs (or when
`producer --help` lists them all), so `producer submit` never pays for SQLAlchemy's query machinery."""


class Commands(click.Group):
    """The producer's commands, loaded lazily (COMMANDS): an error the library raises (contract.errors) is
    printed as a message, after its details (each bad row of an input), and exits 1; never a traceback."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        where = COMMANDS.get(name)
        if where is None:
            return None
        module, attribute = where.split(":")
        command = getattr(importlib.import_module(module), attribute)
        assert isinstance(command, click.Command) and command.name == name, where
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BulkgenError as exc:
            from producer.context import json_logs, say

            for line in exc.details():
                say(line, level="error")
            if json_logs():
                say(str(exc), level="error", error=type(exc).__name__, job_id=getattr(exc, "job_id", None))
                raise click.exceptions.Exit(1) from None
            raise click.ClickException(str(exc)) from None


@click.group(cls=Commands, context_settings=CONTEXT)
def main() -> None:
    """Submit bulk LLM generation jobs and read their results.

    \b
    producer db upgrade                     # create or migrate the store
    producer submit prompts.jsonl --wait    # validate, store, enqueue, watch
    producer results 1 -o out.jsonl
    """

