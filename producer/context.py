"""What every producer command shares: settings with flag overrides, and opening the store."""
from __future__ import annotations

import click
from sqlalchemy import Engine

from models.db import SchemaBehind, check_schema, make_engine
from workers.settings import Settings, get_settings, redact


def settings_with(database_url: str | None = None, broker_url: str | None = None) -> Settings:
    """The settings a producer command runs with: a flag wins, then the submitter's own URLs
    (BULKGEN_SUBMITTER_DATABASE_URL, BULKGEN_SUBMITTER_BROKER_URL), then the shared ones."""
    settings = get_settings()
    database_url = database_url or settings.submitter_database_url
    broker_url = broker_url or settings.submitter_broker_url
    updates = {k: v for k, v in {"database_url": database_url, "broker_url": broker_url}.items() if v}
    return settings.model_copy(update=updates) if updates else settings


def open_store(settings: Settings) -> Engine:
    """The store's engine, refusing a schema that is behind the code."""
    db = make_engine(settings.database_url)
    check_store(db, settings.database_url)
    return db


def check_store(db: Engine, url: str) -> None:
    """A clean CLI error when the store at url is unreachable or its schema is behind the code."""
    try:
        check_schema(db)
    except SchemaBehind as exc:
        raise click.ClickException(str(exc)) from None
    except Exception as exc:
        raise click.ClickException(f"cannot reach the database {redact(url)}: {exc}") from None


database_option = click.option("--database-url", default=None, help="Results store URL [env BULKGEN_SUBMITTER_DATABASE_URL, else BULKGEN_DATABASE_URL].")

broker_option = click.option("--broker-url", default=None, help="Redis URL [env BULKGEN_SUBMITTER_BROKER_URL, else BULKGEN_BROKER_URL].")
