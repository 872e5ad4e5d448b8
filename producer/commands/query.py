"""`producer query`: run a read-only SQL query against the store and print the rows."""
from __future__ import annotations

import csv
import json
import sys

import click
from sqlalchemy import Connection, text
from sqlalchemy.exc import SQLAlchemyError

from contract.errors import SchemaBehind
from migrations.schema import check_schema
from producer.context import say
from producer.readonly import authorizer_of, read_only_engine, statement_head, write_rights
from contract.redaction import hide_secrets, redact
from contract.settings import get_settings

__all__ = ["query", "read_only_engine"]

QUERY_WORDS = frozenset({"SELECT", "WITH", "VALUES", "TABLE"})


def _json_default(value: object) -> str:
    return str(value)


def _first_line(exc: BaseException) -> str:
    lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _warn_if_role_can_write(connection: Connection, url: str) -> None:
    """On PostgreSQL, say on stderr when the role `query` runs as could do more than read the store."""
    try:
        role, rights = write_rights(connection)
    except SQLAlchemyError as exc:  # a catalog the role may not read: say so, and go on with the query
        say(f"warning: could not check what the role of {redact(url)} may do: {_first_line(exc)}", level="warning")
        connection.rollback()
        return
    if rights:
        say(
            f"warning: producer query runs as PostgreSQL role {role!r} ({redact(url)}), which {'; '.join(rights)}. "
            "Its transactions are read-only, but only a role that cannot write keeps the store safe from a query: "
            "set BULKGEN_READER_DATABASE_URL to the URL of a role with SELECT on the store's tables and nothing else.",
            level="warning",
        )
    connection.rollback()  # the query gets a fresh read-only transaction


def _refused_on_postgres(sql: str, message: str) -> str | None:
    """A statement that is not a query, said as such: on PostgreSQL the rows are read through a cursor
    (DECLARE ... CURSOR FOR <the statement>), which takes only queries and answers anything else with a syntax
    error at its first word. (The cursor is also why a statement cannot end the read-only transaction.)"""
    head = statement_head(sql)
    first = head.split()[0] if head else ""
    if first and first not in QUERY_WORDS and message.startswith("syntax error at or near") and f'"{first}"' in message.upper():
        return f"query is read-only: {head} is not allowed (only queries run: {', '.join(sorted(QUERY_WORDS))})"
    return None


@click.command()
@click.argument("sql")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per row.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV with a header row.")
@click.option("--max-rows", type=int, default=1000, show_default=True, help="Most rows a table shows (JSON and CSV print all).")
@click.option("--database-url", default=None,
              help="Store URL to read [env BULKGEN_READER_DATABASE_URL, else BULKGEN_DATABASE_URL].")
def query(sql: str, as_json: bool, as_csv: bool, max_rows: int, database_url: str | None) -> None:
    """Run a read-only SQL query against the store; anything that writes is refused.

    On SQLite only reading statements run (no ATTACH, VACUUM, writes, DDL, writing PRAGMAs or extensions). On
    PostgreSQL transactions are read-only, and a warning says when the role could write or is a superuser: give
    `query` a role with SELECT only through BULKGEN_READER_DATABASE_URL.

    \b
    producer query "SELECT id, status, completion_tokens FROM jobs"
    producer query "SELECT error, count(*) FROM requests WHERE status = 'failed' GROUP BY error" --json
    """
    settings = get_settings()  # not the submitter's URL: the reader falls back to the shared one only
    url = database_url or settings.reader_database_url or settings.database_url
    engine = read_only_engine(url)
    try:
        try:
            check_schema(engine)  # same schema check and clear errors as every command, as the reader
        except SchemaBehind as exc:
            raise click.ClickException(str(exc)) from None
        except Exception as exc:
            raise click.ClickException(f"cannot reach the database {redact(url)}: {hide_secrets(_first_line(exc), url)}") from None
        with engine.connect() as connection:
            authorizer = authorizer_of(connection)
            if authorizer is None:
                _warn_if_role_can_write(connection, url)
            else:
                authorizer.start(sql)
            try:
                _run(connection, sql, as_json, as_csv, max_rows)
            except SQLAlchemyError as exc:
                if authorizer is not None and authorizer.refused:
                    raise click.ClickException(f"query is read-only: {authorizer.refused}") from None
                if authorizer is not None and "readonly database" in _first_line(exc):
                    # a write the authorizer is not asked about, stopped by the read-only connection
                    raise click.ClickException("query is read-only: the statement would write to the store") from None
                said = _refused_on_postgres(sql, _first_line(exc)) if authorizer is None else None
                raise click.ClickException(said or f"query refused or failed: {_first_line(exc)}") from None
    finally:
        engine.dispose()


def _run(connection: Connection, sql: str, as_json: bool, as_csv: bool, max_rows: int) -> None:
    result = connection.execution_options(stream_results=True).execute(text(sql))
    if not result.returns_rows:
        raise click.ClickException("the statement returned no rows; only queries are allowed")
    columns = list(result.keys())
    if as_json:
        for row in result:
            click.echo(json.dumps(dict(zip(columns, row)), default=_json_default, ensure_ascii=False))
    elif as_csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows(result)
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table()
        for column in columns:
            table.add_column(column)
        shown = 0
        for row in result:
            if shown == max_rows:
                break
            table.add_row(*("" if v is None else str(v) for v in row))
            shown += 1
        Console().print(table)
