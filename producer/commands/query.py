"""`producer query`: run a read-only SQL query against the store and print the rows."""
from __future__ import annotations

import csv
import json
import sys

import click
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from producer.context import database_option, open_store, settings_with


def read_only_engine(url: str) -> Engine:
    """An engine that cannot write: a read-only SQLite connection, or read-only transactions on PostgreSQL."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        engine = create_engine(f"sqlite:///file:{database}?mode=ro&uri=true")

        @event.listens_for(engine, "connect")
        def _query_only(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
            dbapi_connection.execute("PRAGMA query_only = ON")

        return engine
    return create_engine(url, execution_options={"postgresql_readonly": True})


def _json_default(value: object) -> str:
    return str(value)


@click.command()
@click.argument("sql")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per row.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV with a header row.")
@click.option("--max-rows", type=int, default=1000, show_default=True, help="Most rows a table shows (JSON and CSV print all).")
@database_option
def query(sql: str, as_json: bool, as_csv: bool, max_rows: int, database_url: str | None) -> None:
    """Run a read-only SQL query against the store; anything that writes is refused.

    \b
    producer query "SELECT id, status, completion_tokens FROM jobs"
    producer query "SELECT error, count(*) FROM requests WHERE status = 'failed' GROUP BY error" --json
    """
    settings = settings_with(database_url)
    open_store(settings).dispose()  # same schema check and clear errors as every command
    engine = read_only_engine(settings.database_url)
    try:
        with engine.connect() as connection:
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
    except SQLAlchemyError as exc:
        message = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise click.ClickException(f"query refused or failed: {message}") from None
    finally:
        engine.dispose()
