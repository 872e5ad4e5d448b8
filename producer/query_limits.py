"""What bounds one `producer query`: its time, the size of one value and of the whole result, and a query
left running on the server when the client is stopped.

- Time: a deadline of `timeout_s` from the start. On SQLite a progress handler interrupts the statement once
  it is past; on PostgreSQL the session's `statement_timeout` stops a statement on the server, and a timer
  cancels a fetch still running at the deadline (a query can reset its own statement_timeout with
  set_config). Between rows the deadline is checked on both.
- Size: SQLite refuses to make a value longer than `max_cell_bytes` (SQLITE_LIMIT_LENGTH, before the value
  exists); on PostgreSQL a value arrives whole (the server caps one at 1 GB) and is refused when it is over.
  The values of all rows together may hold `max_result_bytes`.
- Stopping: SIGTERM cancels the running statement on the server (psycopg's cancel; SQLite's interrupt)
  before the command ends. SIGKILL cannot be caught: there the server's `client_connection_check_interval`
  (set per session, PostgreSQL 14 or newer) ends the query within a second of the connection closing, and
  `statement_timeout` bounds it on an older server.
"""
from __future__ import annotations

import signal
import sqlite3
import threading
import time
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Any

CONNECTION_CHECK_MS = 1000
"""How often the PostgreSQL server checks that a query's client is still there."""

_PROGRESS_STEPS = 10_000
"""SQLite virtual machine steps between two looks at the deadline (well under a millisecond each)."""

_SCALARS = (int, float, bool)


@dataclass(frozen=True)
class QueryLimits:
    timeout_s: float
    max_cell_bytes: int
    max_result_bytes: int


class QueryStopped(Exception):
    """A limit stopped the query; str() says which and how to raise it."""


def mib(size: int) -> str:
    return f"{size / 2**20:.3g} MiB" if size >= 2**20 else f"{size:,} bytes"


def value_size(value: object) -> int:
    """The size of one value as `query` counts it: bytes of a blob, characters of a text, the printed form
    of anything else."""
    if value is None or isinstance(value, _SCALARS):
        return 8
    if isinstance(value, (str, bytes, bytearray, memoryview)):
        return len(value)
    return len(str(value))


def postgres_session_settings(dbapi_connection: Any, timeout_s: float) -> None:
    """Set the time limit on a new PostgreSQL connection (a psycopg one), and the check that ends a query whose
    client is gone. Per session: they override what the role has (`producer db roles` sets the same)."""
    autocommit = dbapi_connection.autocommit
    dbapi_connection.autocommit = True
    try:
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SELECT set_config('statement_timeout', %s, false)", (str(max(1, round(timeout_s * 1000))),))
            if dbapi_connection.info.server_version >= 140000:
                cursor.execute("SELECT set_config('client_connection_check_interval', %s, false)", (str(CONNECTION_CHECK_MS),))
    finally:
        dbapi_connection.autocommit = autocommit


class QueryGuard:
    """Enforces QueryLimits on one DB-API connection (sqlite3 or psycopg) while one query runs; a context
    manager. `check(row)` after each row; `explain(error)` names the limit a driver error came from."""

    def __init__(self, limits: QueryLimits, dbapi_connection: Any) -> None:
        self.limits = limits
        self.connection = dbapi_connection
        self.sqlite = isinstance(dbapi_connection, sqlite3.Connection)
        self.started = time.monotonic()
        self.deadline = self.started + limits.timeout_s
        self.result_bytes = 0
        self.rows = 0
        self.timed_out = False
        self.terminated = False
        self._timer: threading.Timer | None = None
        self._previous_sigterm: Any = None

    # --- the context --------------------------------------------------------------------------------------

    def __enter__(self) -> QueryGuard:
        self.started = time.monotonic()
        self.deadline = self.started + self.limits.timeout_s
        if self.sqlite:
            self.connection.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, self.limits.max_cell_bytes)
            self.connection.set_progress_handler(self._sqlite_progress, _PROGRESS_STEPS)
        else:
            self._timer = threading.Timer(self.limits.timeout_s, self._on_deadline)
            self._timer.daemon = True
            self._timer.start()
        if threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.sqlite:
            self.connection.set_progress_handler(None, 0)
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)

    # --- stopping -----------------------------------------------------------------------------------------

    def _sqlite_progress(self) -> int:
        if self.terminated:
            return 1
        if time.monotonic() > self.deadline:
            self.timed_out = True
            return 1
        return 0

    def _cancel(self) -> None:
        """Stop the statement running on this connection, on the server; safe from another thread."""
        if self.sqlite:
            self.connection.interrupt()
            return
        cancel = getattr(self.connection, "cancel_safe", None) or self.connection.cancel
        try:
            cancel()
        except Exception:  # nothing running, or the server is gone: nothing left to stop either way
            pass

    def _on_deadline(self) -> None:
        self.timed_out = True
        self._cancel()

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        # The statement is cancelled here, and the fetch waiting on it returns with that error: the command
        # then ends (exit 143) with the server no longer running it.
        self.terminated = True
        self._cancel()

    # --- the checks ---------------------------------------------------------------------------------------

    def check(self, row: Any) -> None:
        """After each row: the deadline, SIGTERM, the size of each value and of the result so far."""
        self._check_time()
        for value in row:
            size = value_size(value)
            if size > self.limits.max_cell_bytes:
                raise QueryStopped(self._cell_message(f"a value of {mib(size)}"))
            self.result_bytes += size
        self.rows += 1
        if self.result_bytes > self.limits.max_result_bytes:
            raise QueryStopped(
                f"query stopped at row {self.rows}: the result passed {mib(self.limits.max_result_bytes)}, the limit of "
                "what one query may return (--max-result-bytes, BULKGEN_QUERY_MAX_RESULT_BYTES); for a job's results "
                "use `producer results`"
            )

    def _check_time(self) -> None:
        if self.terminated:
            raise QueryStopped(self._terminated_message())
        if self.timed_out or time.monotonic() > self.deadline:
            self.timed_out = True
            raise QueryStopped(self._time_message())

    def explain(self, message: str) -> str | None:
        """What to tell the user about a driver error when one of the limits (or SIGTERM) caused it."""
        if self.terminated:
            return self._terminated_message()
        if self.timed_out or "statement timeout" in message:
            return self._time_message()
        if "string or blob too big" in message:
            return self._cell_message("a value")
        return None

    def _time_message(self) -> str:
        return (
            f"query stopped after {self.limits.timeout_s:g} s, its time limit (--timeout SECONDS to allow more, or "
            "BULKGEN_QUERY_TIMEOUT_S)"
        )

    def _terminated_message(self) -> str:
        return "query stopped by SIGTERM; the statement was cancelled on the server"

    def _cell_message(self, what: str) -> str:
        return (
            f"query stopped: {what} is over {mib(self.limits.max_cell_bytes)}, the limit of one value "
            "(--max-cell-bytes, BULKGEN_QUERY_MAX_CELL_BYTES)"
        )
