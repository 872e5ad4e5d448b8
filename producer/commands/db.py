"""`producer db`: the store's schema (Alembic migrations)."""
from __future__ import annotations

import click

from models.db import make_engine, schema_revisions, upgrade_schema
from producer.context import database_option, settings_with
from workers.settings import redact


@click.group()
def db() -> None:
    """Manage the store's schema (Alembic migrations)."""


@db.command()
@database_option
def upgrade(database_url: str | None) -> None:
    """Create the store or migrate it to the schema this code needs."""
    settings = settings_with(database_url)
    try:
        upgrade_schema(settings.database_url)
    except Exception as exc:
        raise click.ClickException(f"cannot migrate {redact(settings.database_url)}: {exc}") from None
    click.echo(f"{redact(settings.database_url)} is at the current schema")


@db.command()
@database_option
def current(database_url: str | None) -> None:
    """Show the store's schema revision and the one this code needs."""
    settings = settings_with(database_url)
    revision, head = schema_revisions(make_engine(settings.database_url))
    click.echo(f"database: {revision or 'empty'}; code needs: {head}")
