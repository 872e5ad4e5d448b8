"""What every producer command shares: settings with flag overrides, and opening the store.

Errors are raised as contract.errors (the CLI's group turns them into clean messages: producer.cli)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import click

from producer import api

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from contract.settings import Settings


def settings_with(database_url: str | None = None, broker_url: str | None = None) -> Settings:
    """The settings a producer command runs with: a flag wins, then the submitter's own URLs
    (BULKGEN_SUBMITTER_DATABASE_URL, BULKGEN_SUBMITTER_BROKER_URL), then the shared ones."""
    return api.settings_for(database_url, broker_url)


def open_store(settings: Settings) -> Engine:
    """The store's engine, refusing a schema that is behind the code (SchemaBehind, StoreUnreachable)."""
    return api.open_store(settings)


database_option = click.option("--database-url", default=None, help="Results store URL [env BULKGEN_SUBMITTER_DATABASE_URL, else BULKGEN_DATABASE_URL].")

broker_option = click.option("--broker-url", default=None, help="Redis URL [env BULKGEN_SUBMITTER_BROKER_URL, else BULKGEN_BROKER_URL].")
