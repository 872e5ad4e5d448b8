"""What every producer command shares: settings with flag overrides, notices, and the common options.

Errors are raised as contract.errors (the CLI's group turns them into clean messages: producer.cli)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import click

from producer import api

if TYPE_CHECKING:
    from contract.settings import Settings


def settings_with(database_url: str | None = None, broker_url: str | None = None) -> Settings:
    """The settings a producer command runs with: a flag wins, then the submitter's own URLs
    (BULKGEN_SUBMITTER_DATABASE_URL, BULKGEN_SUBMITTER_BROKER_URL), then the shared ones."""
    return api.settings_for(database_url, broker_url)


def json_logs() -> bool:
    """BULKGEN_LOG_FORMAT=json: the producer's notices on stderr are JSON lines (contract.logs), like the workers' logs."""
    from contract.settings import get_settings

    try:
        return get_settings().log_format == "json"
    except Exception:  # settings that do not validate: their error is the command's to report
        return False


def say(message: str, *, level: str = "info", job_id: int | None = None, request_ids: list[int] | None = None,
        **fields: object) -> None:
    """A notice for people on stderr (stdout keeps what scripts read): the text, or one JSON line with the job id,
    the request ids and any other field given."""
    if json_logs():
        from contract.logs import json_line

        click.echo(json_line(level, "bulkgen.producer", message, job_id=job_id, request_ids=request_ids, **fields), err=True)
    else:
        click.echo(message, err=True)


database_option = click.option("--database-url", default=None, help="Results store URL [env BULKGEN_SUBMITTER_DATABASE_URL, else BULKGEN_DATABASE_URL].")

broker_option = click.option("--broker-url", default=None, help="Redis URL [env BULKGEN_SUBMITTER_BROKER_URL, else BULKGEN_BROKER_URL].")
