"""`producer db`: the store's schema (Alembic migrations) and the roles each part connects as."""
from __future__ import annotations

import click

from contract.errors import StoreUnreachable
from contract.redaction import hide_secrets, redact
from contract.settings import get_settings
from migrations.schema import check_store, schema_revisions, upgrade_schema
from models.db import make_engine

owner_database_option = click.option(
    "--database-url", default=None, help="URL of the store's owner (it runs the migrations) [env BULKGEN_DATABASE_URL]."
)


def _owner_url(database_url: str | None) -> str:
    """Migrations and grants run as the store's owner: BULKGEN_DATABASE_URL, never a part's own URL."""
    return database_url or get_settings().database_url


def _unreachable(url: str, exc: BaseException, doing: str = "cannot reach the database") -> StoreUnreachable:
    """The error to raise for a store that cannot be reached or migrated: its URL and the driver's reason,
    without a password (the reason may quote the host, which holds part of a password with an unencoded @)."""
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__]
    return StoreUnreachable(f"{doing} {redact(url)}: {hide_secrets(reason[0], url)}")


@click.group()
def db() -> None:
    """Manage the store's schema (Alembic migrations) and its PostgreSQL roles."""


@db.command()
@owner_database_option
def upgrade(database_url: str | None) -> None:
    """Create the store or migrate it to the schema this code needs."""
    url = _owner_url(database_url)
    try:
        upgrade_schema(url)
    except Exception as exc:
        raise _unreachable(url, exc, "cannot migrate") from None
    click.echo(f"{redact(url)} is at the current schema")


@db.command()
@owner_database_option
def current(database_url: str | None) -> None:
    """Show the store's schema revision and the one this code needs."""
    url = _owner_url(database_url)
    try:
        engine = make_engine(url)
        try:
            revision, head = schema_revisions(engine)
        finally:
            engine.dispose()
    except Exception as exc:
        raise _unreachable(url, exc) from None
    click.echo(f"database: {revision or 'empty'}; code needs: {head}")


@db.command()
@owner_database_option
@click.option("--submitter", default="bulkgen_submitter", show_default=True, envvar="BULKGEN_SUBMITTER_ROLE",
              help="Role of the producer's commands [env BULKGEN_SUBMITTER_ROLE].")
@click.option("--worker", default="bulkgen_worker", show_default=True, envvar="BULKGEN_WORKER_ROLE",
              help="Role of the workers [env BULKGEN_WORKER_ROLE].")
@click.option("--reader", default="bulkgen_reader", show_default=True, envvar="BULKGEN_READER_ROLE",
              help="Role of `producer query` [env BULKGEN_READER_ROLE].")
@click.option("--submitter-password", default=None, envvar="BULKGEN_SUBMITTER_PASSWORD", show_default=False,
              help="Set the submitter's password [env BULKGEN_SUBMITTER_PASSWORD; unset: left as it is].")
@click.option("--worker-password", default=None, envvar="BULKGEN_WORKER_PASSWORD", show_default=False,
              help="Set the worker's password [env BULKGEN_WORKER_PASSWORD; unset: left as it is].")
@click.option("--reader-password", default=None, envvar="BULKGEN_READER_PASSWORD", show_default=False,
              help="Set the reader's password [env BULKGEN_READER_PASSWORD; unset: left as it is].")
def roles(database_url, submitter, worker, reader, submitter_password, worker_password, reader_password) -> None:  # type: ignore[no-untyped-def]
    """Create (or reset) the submitter, worker and reader roles on PostgreSQL, each with only its grants.

    Run as the store's owner after `producer db upgrade` (and again after every upgrade). The reader role also
    gets BULKGEN_QUERY_TIMEOUT_S as its statement_timeout and, when this runs as a superuser,
    BULKGEN_READER_TEMP_FILE_LIMIT as its temp_file_limit. Idempotent: a role
    that exists keeps its password unless one is given, and its grants on the store are reset to exactly its
    part's. Prefer the environment to the password flags (a flag shows in the process list). What each role
    may do: docs/security.md.

    \b
    BULKGEN_WORKER_PASSWORD=... BULKGEN_SUBMITTER_PASSWORD=... BULKGEN_READER_PASSWORD=... producer db roles
    """
    from producer.roles import ReaderLimits, apply_role, check_role_name

    settings = get_settings()
    limits = ReaderLimits(round(settings.query_timeout_s * 1000), settings.reader_temp_file_limit)

    url = _owner_url(database_url)
    names = {"submitter": submitter, "worker": worker, "reader": reader}
    try:
        for name in names.values():
            check_role_name(name)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if len(set(names.values())) != 3:
        raise click.BadParameter("the submitter, worker and reader need three different roles")
    try:
        engine = make_engine(url)
    except Exception as exc:  # a URL SQLAlchemy cannot read
        raise _unreachable(url, exc) from None
    if engine.dialect.name != "postgresql":
        raise click.ClickException(
            f"{redact(url)} is not PostgreSQL: SQLite has no roles (guard the file with its permissions; "
            "`producer query` opens it read-only)"
        )
    check_store(engine)
    passwords = {"submitter": submitter_password, "worker": worker_password, "reader": reader_password}
    try:
        with engine.begin() as connection:
            reports = [apply_role(connection, part, role, passwords[part], limits) for part, role in names.items()]
    except Exception as exc:
        message = hide_secrets(str(exc).splitlines()[0], url)
        for password in passwords.values():
            if password:
                message = message.replace(password, "***")
        raise click.ClickException(f"cannot set up the roles on {redact(url)}: {message}") from None
    finally:
        engine.dispose()
    for report in reports:
        click.echo(report.line())
