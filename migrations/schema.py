"""Refusing to run on a schema that is behind the code, and bringing it up to date (`producer db upgrade`).

Here rather than in models/: it reads the migrations' head, and migrations/env.py imports models/ (models/ imports
no module of migrations/). Alembic is imported only when a check or an upgrade runs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from contract.errors import SchemaBehind, StoreUnreachable
from contract.redaction import hide_secrets, redact
from migrations import alembic_config
from models.db import make_engine

if TYPE_CHECKING:
    from sqlalchemy import Engine


def schema_revisions(engine: Engine) -> tuple[str | None, str]:
    """(the database's current revision, the revision the code needs)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config(str(engine.url))).get_current_head()
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    assert head is not None
    return current, head


def check_schema(engine: Engine) -> None:
    current, head = schema_revisions(engine)
    if current != head:
        where = redact(engine.url.render_as_string(hide_password=False))
        state = "has no schema yet" if current is None else f"is at schema revision {current}"
        raise SchemaBehind(
            f"the database {where} {state}; this code needs revision {head}. Run: producer db upgrade"
        )


def open_store(url: str) -> Engine:
    """The store's engine, checked: raises StoreUnreachable (its URL redacted) or SchemaBehind."""
    try:
        engine = make_engine(url)
    except Exception as exc:  # a URL SQLAlchemy cannot read, or a driver that is not installed
        raise StoreUnreachable(f"cannot reach the database {redact(url)}: {hide_secrets(_first_line(exc), url)}") from None
    check_store(engine)
    return engine


def check_store(engine: Engine) -> None:
    """Raises StoreUnreachable (its URL redacted, the engine disposed) or SchemaBehind."""
    try:
        check_schema(engine)
    except SchemaBehind:
        raise
    except Exception as exc:
        url = engine.url.render_as_string(hide_password=False)
        engine.dispose()
        raise StoreUnreachable(f"cannot reach the database {redact(url)}: {hide_secrets(_first_line(exc), url)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def upgrade_schema(url: str) -> None:
    from alembic import command

    command.upgrade(alembic_config(url), "head")
