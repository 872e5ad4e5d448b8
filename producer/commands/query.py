"""`producer query`: run a read-only SQL query against the store and print the rows."""
from __future__ import annotations

import csv
import json
import signal
import sys
from collections.abc import Iterable
from typing import Any, NoReturn

import click
from sqlalchemy import Connection, text
from sqlalchemy.exc import SQLAlchemyError

from contract.errors import SchemaBehind
from migrations.schema import check_schema
from producer.context import say
from producer.query_limits import QueryGuard, QueryLimits, QueryStopped
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


ALLOW_WRITER_FLAG = "--allow-role-that-can-write"


def _check_role(connection: Connection, url: str, allow_writer: bool) -> None:
    """On PostgreSQL, refuse a role that could do more than read the store (a superuser, a member of the roles
    that reach the server's files, a role with INSERT/UPDATE/DELETE/TRUNCATE), unless the user names the risk
    with ALLOW_WRITER_FLAG: then say it on stderr, and run. A read-only transaction alone does not keep such a
    role from writing (dblink_exec writes through a connection of its own)."""
    try:
        role, rights = write_rights(connection)
    except SQLAlchemyError as exc:  # a catalog the role may not read
        role, rights = "?", [f"could not be checked ({_first_line(exc)})"]
    connection.rollback()  # the query gets a fresh read-only transaction
    if not rights:
        return
    what = f"PostgreSQL role {role!r} ({redact(url)}) {'; '.join(rights)}"
    if not allow_writer:
        raise click.ClickException(
            f"refused: {what}. A query run as this role could change or delete the store (dblink_exec, functions "
            "with side effects) or read the server's files. Set BULKGEN_READER_DATABASE_URL to the URL of a role "
            "with SELECT on the store's tables and nothing else (`producer db roles` makes one), or pass "
            f"{ALLOW_WRITER_FLAG} to take that risk."
        )
    say(f"warning: producer query runs as {what}; {ALLOW_WRITER_FLAG} was given, so it runs anyway. Its "
        "transactions are read-only, but only a role that cannot write keeps the store safe from a query.",
        level="warning")


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
@click.option("--max-rows", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Most rows a table shows (JSON and CSV print all); a note on stderr says when more were left out.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop the query after this many seconds [env BULKGEN_QUERY_TIMEOUT_S; default 300].")
@click.option("--max-cell-bytes", type=click.IntRange(min=1), default=None,
              help="Largest value a row may hold [env BULKGEN_QUERY_MAX_CELL_BYTES; default 16 MiB].")
@click.option("--max-result-bytes", type=click.IntRange(min=1), default=None,
              help="Most bytes all values together may hold [env BULKGEN_QUERY_MAX_RESULT_BYTES; default 256 MiB].")
@click.option(ALLOW_WRITER_FLAG, "allow_writer", is_flag=True,
              help="Run even as a PostgreSQL role that can write or is a superuser. RISK: a query may then change "
                   "or delete the store, or read the server's files.")
@click.option("--database-url", default=None,
              help="Store URL to read [env BULKGEN_READER_DATABASE_URL, else BULKGEN_DATABASE_URL].")
def query(sql: str, as_json: bool, as_csv: bool, max_rows: int, timeout_s: float | None, max_cell_bytes: int | None,
          max_result_bytes: int | None, allow_writer: bool, database_url: str | None) -> None:
    """Run a read-only SQL query against the store; anything that writes is refused.

    On SQLite only reading statements run (no ATTACH, VACUUM, writes, DDL, writing PRAGMAs or extensions), on a
    file opened read-only. On PostgreSQL transactions are read-only, and a role that could write (or a
    superuser) is refused unless --allow-role-that-can-write is given: give `query` a role with SELECT only
    through BULKGEN_READER_DATABASE_URL. A query stops at its time limit, at a value over --max-cell-bytes and at
    a result over --max-result-bytes (docs/security.md).

    \b
    producer query "SELECT id, status, completion_tokens FROM jobs"
    producer query "SELECT error, count(*) FROM requests WHERE status = 'failed' GROUP BY error" --json
    """
    settings = get_settings()  # not the submitter's URL: the reader falls back to the shared one only
    url = database_url or settings.reader_database_url or settings.database_url
    limits = QueryLimits(
        timeout_s=timeout_s or settings.query_timeout_s,
        max_cell_bytes=max_cell_bytes or settings.query_max_cell_bytes,
        max_result_bytes=max_result_bytes or settings.query_max_result_bytes,
    )
    try:
        engine = read_only_engine(url, limits.timeout_s)
    except Exception as exc:  # a URL SQLAlchemy cannot read, or a driver that is not installed
        raise click.ClickException(f"cannot reach the database {redact(url)}: {hide_secrets(_first_line(exc), url)}") from None
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
                _check_role(connection, url, allow_writer)
            else:
                authorizer.start(sql)
            guard = QueryGuard(limits, connection.connection.dbapi_connection)
            try:
                with guard:
                    _run(connection, sql, as_json, as_csv, max_rows, guard)
            except QueryStopped as exc:
                _stop(guard, str(exc))
            except SQLAlchemyError as exc:
                said = guard.explain(_first_line(exc))
                if said is not None:
                    _stop(guard, said)
                if authorizer is not None and authorizer.refused:
                    raise click.ClickException(f"query is read-only: {authorizer.refused}") from None
                if authorizer is not None and "readonly database" in _first_line(exc):
                    # a write the authorizer is not asked about, stopped by the read-only connection
                    raise click.ClickException("query is read-only: the statement would write to the store") from None
                said = _refused_on_postgres(sql, _first_line(exc)) if authorizer is None else None
                raise click.ClickException(said or f"query refused or failed: {_first_line(exc)}") from None
    finally:
        engine.dispose()


def _stop(guard: QueryGuard, message: str) -> NoReturn:
    if guard.terminated:
        say(f"Error: {message}", level="error")
        raise click.exceptions.Exit(128 + signal.SIGTERM)
    raise click.ClickException(message)


def _run(connection: Connection, sql: str, as_json: bool, as_csv: bool, max_rows: int, guard: QueryGuard) -> None:
    # a server-side cursor on PostgreSQL, read 100 rows at a time: rows are held a few at a time, never all
    result = connection.execution_options(stream_results=True, max_row_buffer=100).execute(text(sql))
    if not result.returns_rows:
        raise click.ClickException("the statement returned no rows; only queries are allowed")
    columns = list(result.keys())
    if as_json:
        for row in result:
            guard.check(row)
            click.echo(json.dumps(dict(zip(columns, row)), default=_json_default, ensure_ascii=False))
    elif as_csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        for row in result:
            guard.check(row)
            writer.writerow(row)
    else:
        _print_table(result, columns, max_rows, guard)


def _print_table(rows: Iterable[Any], columns: list[str], max_rows: int, guard: QueryGuard) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for column in columns:
        table.add_column(column)
    shown = 0
    more = False
    for row in rows:
        if shown == max_rows:
            more = True
            break
        guard.check(row)
        table.add_row(*("" if v is None else str(v) for v in row))
        shown += 1
    Console().print(table)
    if more:
        say(f"note: the table shows the first {max_rows} rows and the query returned more: --max-rows N for more, "
            "or --json / --csv for every row")
