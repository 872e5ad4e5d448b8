"""What keeps `producer query` from writing: on SQLite an authorizer that allows reading and nothing else, on a
connection opened read-only; on PostgreSQL read-only transactions, and a check of what the connected role could do.

Light on purpose (SQLAlchemy and the standard library only): the producer must start fast.
"""
from __future__ import annotations

import os
import re
import sqlite3
from typing import Any
from urllib.parse import quote, unquote

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url

# SQLite's authorizer action codes (sqlite3.h), with the words a refusal names them by.
_ACTIONS = {
    0: "COPY", 1: "CREATE INDEX", 2: "CREATE TABLE", 3: "CREATE TEMP INDEX", 4: "CREATE TEMP TABLE",
    5: "CREATE TEMP TRIGGER", 6: "CREATE TEMP VIEW", 7: "CREATE TRIGGER", 8: "CREATE VIEW", 9: "DELETE",
    10: "DROP INDEX", 11: "DROP TABLE", 12: "DROP TEMP INDEX", 13: "DROP TEMP TABLE", 14: "DROP TEMP TRIGGER",
    15: "DROP TEMP VIEW", 16: "DROP TRIGGER", 17: "DROP VIEW", 18: "INSERT", 19: "PRAGMA", 20: "READ",
    21: "SELECT", 22: "TRANSACTION", 23: "UPDATE", 24: "ATTACH", 25: "DETACH", 26: "ALTER TABLE", 27: "REINDEX",
    28: "ANALYZE", 29: "CREATE VIRTUAL TABLE", 30: "DROP VIRTUAL TABLE", 31: "FUNCTION", 32: "SAVEPOINT",
    33: "RECURSIVE",
}
_DELETE, _INSERT, _PRAGMA, _READ, _SELECT, _TRANSACTION, _UPDATE, _ATTACH = 9, 18, 19, 20, 21, 22, 23, 24
_FUNCTION, _RECURSIVE = 31, 33
_SQLITE_OK, _SQLITE_DENY = 0, 1
_SCHEMA_CHANGE = "\0schema"
SCHEMA_TABLES = frozenset({"sqlite_master", "sqlite_temp_master", "sqlite_schema", "sqlite_temp_schema"})

_COMMENTS = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?(?:\*/|$))*", re.S)
_DDL = re.compile(r"(CREATE\s+(?:(?:TEMP|TEMPORARY)\s+)?(?:UNIQUE\s+)?(?:VIRTUAL\s+)?(?:TABLE|VIEW|INDEX|TRIGGER)"
                  r"|DROP\s+(?:TABLE|VIEW|INDEX|TRIGGER)|[A-Z]+)\b", re.I)


def statement_head(statement: str) -> str:
    """The words a statement starts with, as a refusal names it: 'CREATE TEMP TABLE', 'DROP VIEW', 'ANALYZE'."""
    found = _DDL.match(statement, _COMMENTS.match(statement).end())
    return " ".join(found.group(1).upper().replace("TEMPORARY", "TEMP").split()) if found else ""


READING_PRAGMAS = frozenset({
    "application_id", "auto_vacuum", "busy_timeout", "cache_size", "collation_list", "compile_options",
    "data_version", "database_list", "encoding", "foreign_keys", "freelist_count", "function_list", "journal_mode",
    "max_page_count", "module_list", "page_count", "page_size", "pragma_list", "query_only", "read_uncommitted",
    "schema_version", "synchronous", "table_list", "temp_store", "user_version",
})
"""PRAGMAs allowed without an argument: each only reports a value (SQLAlchemy itself reads read_uncommitted).
Left out: those that act when named alone (optimize, wal_checkpoint, incremental_vacuum, shrink_memory, ...)."""
LOOKUP_PRAGMAS = frozenset({"foreign_key_list", "index_info", "index_list", "index_xinfo", "table_info", "table_list", "table_xinfo"})
"""PRAGMAs allowed with an argument: the argument names what to describe (SQLAlchemy's inspector and Alembic's
schema check use table_info), where any other PRAGMA's argument is a value to set."""
REFUSED_FUNCTIONS = frozenset({"load_extension", "fts3_tokenizer", "readfile", "writefile", "edit"})
"""SQL functions refused even in a SELECT: loading code, swapping tokenizers, the shell's file functions."""

AUTHORIZER_KEY = "bulkgen_readonly_authorizer"


class ReadOnlyAuthorizer:
    """A sqlite3 authorizer that allows reading and nothing else, and remembers what it refused and why."""

    def __init__(self) -> None:
        self.refused: str | None = None
        self.statement = ""
        """The statement being run, to name a refused schema change by its own words (CREATE TABLE, ...)."""

    def start(self, statement: str) -> None:
        self.refused, self.statement = None, statement

    def __call__(self, action: int, arg1: str | None, arg2: str | None, _db: str | None, _trigger: str | None) -> int:
        refusal = self.refusal(action, arg1, arg2)
        if refusal == _SCHEMA_CHANGE:
            refusal = f"{statement_head(self.statement) or 'changing the schema'} is not allowed"
        elif action == _ATTACH and statement_head(self.statement) == "VACUUM":
            refusal = "VACUUM is not allowed"  # it runs an ATTACH of its own (of its output) before it writes
        if refusal is None:
            return _SQLITE_OK
        self.refused = self.refused or refusal  # the first refusal of a statement is the one to report
        return _SQLITE_DENY

    @staticmethod
    def refusal(action: int, arg1: str | None, arg2: str | None) -> str | None:
        """None when the action only reads, else what to tell the user."""
        if action in (_SELECT, _READ, _RECURSIVE):
            return None
        if action == _FUNCTION:
            name = (arg2 or "").lower()
            return f"the function {name}() is not allowed" if name in REFUSED_FUNCTIONS else None
        if action == _PRAGMA:
            name = (arg1 or "").lower()
            if (arg2 is None and name in READING_PRAGMAS) or (arg2 is not None and name in LOOKUP_PRAGMAS):
                return None
            return f"PRAGMA {name} = {arg2} is not allowed" if arg2 is not None else f"PRAGMA {name} is not allowed"
        if action in (_INSERT, _DELETE) and (arg1 or "").lower() in SCHEMA_TABLES:
            return _SCHEMA_CHANGE  # CREATE, DROP and ANALYZE ask for this before they name what they make
        if action == _UPDATE and (arg1 or "").lower() in SCHEMA_TABLES:
            # SQLite asks this when a statement first uses a table-valued function (json_each, pragma_table_info,
            # ...). No statement can change the schema table itself: SQLite refuses that without writable_schema
            # (a writing PRAGMA, refused here), and the connection is read-only besides.
            return None
        if action == _TRANSACTION and (arg1 or "").upper() in ("COMMIT", "ROLLBACK"):
            return None  # ending a transaction that cannot have written anything: the driver's own cleanup
        what = _ACTIONS.get(action, f"action {action}")
        if action == _TRANSACTION:
            what = arg1 or what
        return f"{what} is not allowed"


def sqlite_read_uri(url: URL) -> str:
    """The URI `query` opens a SQLite store with: always mode=ro (a file that is not there is an error, never
    created), whatever mode a `file:` URL asks for (its own parameters are dropped); and immutable=1 when no
    `-wal` file lies beside the store, i.e. no connection has it open: a read-only connection to a WAL store
    would otherwise leave `-wal` and `-shm` files behind. With a `-wal` there, someone may be writing: the
    store is opened read-only but not immutable, so the query sees their commits (and the files were there)."""
    database = url.database or ""
    if database.startswith("file:"):
        database = unquote(database[len("file:"):].split("?", 1)[0])
        if database.startswith("//"):  # file://host/path: only an empty host or localhost is valid
            database = "/" + database[2:].split("/", 1)[-1]
    target = f"file:{quote(database)}?mode=ro"
    if database not in ("", ":memory:") and not os.path.exists(database + "-wal"):
        target += "&immutable=1"
    return target


def read_only_engine(url: str, timeout_s: float | None = None) -> Engine:
    """An engine that cannot write: a SQLite file opened read-only (sqlite_read_uri) that allows only reading
    statements, or read-only transactions on PostgreSQL (where the role's grants are the real guard; see
    write_rights), each session with `timeout_s` as its statement_timeout when given."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        target = sqlite_read_uri(parsed)

        def _connect() -> sqlite3.Connection:
            return sqlite3.connect(target, uri=True, timeout=60, check_same_thread=False)

        engine = create_engine(parsed.set(query={}), creator=_connect)

        @event.listens_for(engine, "connect")
        def _read_only(dbapi_connection: Any, record: Any) -> None:
            dbapi_connection.execute("PRAGMA query_only = ON")
            if hasattr(dbapi_connection, "enable_load_extension"):  # off by default; said here, not assumed
                dbapi_connection.enable_load_extension(False)
            authorizer = ReadOnlyAuthorizer()
            dbapi_connection.set_authorizer(authorizer)
            record.info[AUTHORIZER_KEY] = authorizer

        return engine
    engine = create_engine(url, execution_options={"postgresql_readonly": True})
    if timeout_s is not None:
        from producer.query_limits import postgres_session_settings

        @event.listens_for(engine, "connect")
        def _time_limit(dbapi_connection: Any, _record: Any) -> None:
            postgres_session_settings(dbapi_connection, timeout_s)

    return engine


def authorizer_of(connection: Connection) -> ReadOnlyAuthorizer | None:
    """The authorizer of a connection of read_only_engine on SQLite, None on PostgreSQL."""
    found = connection.info.get(AUTHORIZER_KEY)
    return found if isinstance(found, ReadOnlyAuthorizer) else None


SERVER_FILE_ROLES = ("pg_read_server_files", "pg_write_server_files", "pg_execute_server_program")


def write_rights(connection: Connection) -> tuple[str, list[str]]:
    """(the PostgreSQL role connected, what it can do beyond reading the store): being a superuser, membership
    of the roles that read or write the server's files, INSERT/UPDATE/DELETE/TRUNCATE on any of the store's tables."""
    from models.tables import Base

    role, superuser = connection.execute(
        text("SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user")
    ).one()
    if superuser:
        return role, ["is a superuser (it can read the server's files, e.g. pg_read_file, and ignores every grant)"]
    rights: list[str] = []
    for server_role in SERVER_FILE_ROLES:
        member = connection.execute(
            text("SELECT to_regrole(:r) IS NOT NULL AND pg_has_role(current_user, :r, 'USAGE')"), {"r": server_role}
        ).scalar_one()
        if member:
            rights.append(f"is a member of {server_role}")
    tables = sorted(Base.metadata.tables) + ["alembic_version"]
    writable = connection.execute(
        text(
            "SELECT t FROM unnest(CAST(:tables AS text[])) AS t WHERE to_regclass(t) IS NOT NULL"
            " AND has_table_privilege(to_regclass(t), 'INSERT, UPDATE, DELETE, TRUNCATE')"
        ),
        {"tables": tables},
    ).scalars().all()
    if writable:
        rights.append("can INSERT, UPDATE, DELETE or TRUNCATE on " + ", ".join(writable))
    return role, rights
