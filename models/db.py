"""Connecting to the store, and refusing to run on a schema that is behind the code."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import overload

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from contract.errors import SchemaBehind, StoreUnreachable


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@overload
def as_utc(moment: datetime) -> datetime: ...
@overload
def as_utc(moment: None) -> None: ...
def as_utc(moment: datetime | None) -> datetime | None:
    """A datetime read from the store, timezone-aware: SQLite hands back naive datetimes for timezone-aware
    columns, and they were written in UTC."""
    return moment.replace(tzinfo=timezone.utc) if moment is not None and moment.tzinfo is None else moment


def make_engine(url: str) -> Engine:
    """An engine for SQLite (WAL, waits on locks instead of failing) or PostgreSQL."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def schema_revisions(engine: Engine) -> tuple[str | None, str]:
    """(the database's current revision, the revision the code needs)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from migrations import alembic_config

    head = ScriptDirectory.from_config(alembic_config(str(engine.url))).get_current_head()
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    assert head is not None
    return current, head


def check_schema(engine: Engine) -> None:
    current, head = schema_revisions(engine)
    if current != head:
        where = engine.url.render_as_string(hide_password=True)
        state = "has no schema yet" if current is None else f"is at schema revision {current}"
        raise SchemaBehind(
            f"the database {where} {state}; this code needs revision {head}. Run: producer db upgrade"
        )


def open_store(url: str) -> Engine:
    """The store's engine, checked: raises StoreUnreachable (its URL redacted) or SchemaBehind."""
    engine = make_engine(url)
    check_store(engine)
    return engine


def check_store(engine: Engine) -> None:
    """Raises StoreUnreachable (its URL redacted, the engine disposed) or SchemaBehind."""
    try:
        check_schema(engine)
    except SchemaBehind:
        raise
    except Exception as exc:
        where = engine.url.render_as_string(hide_password=True)
        engine.dispose()
        raise StoreUnreachable(f"cannot reach the database {where}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def upgrade_schema(url: str) -> None:
    from alembic import command

    from migrations import alembic_config

    command.upgrade(alembic_config(url), "head")
