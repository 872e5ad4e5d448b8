"""`producer query` is bounded: a time limit on both backends (a query that never ends is stopped), a size limit
on one value and on a whole result, a table that says when it left rows out; on PostgreSQL a query whose client
is stopped (SIGTERM) or killed (SIGKILL) stops running on the server. On SQLite nothing is created beside the
store, whatever the URL asks."""
from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import create_engine, text

from producer.cli import main
from tests.helpers import ROOT, env_for, producer, wait_until
from tests.test_export import _job_with_results
from tests.test_query_readonly import READER, _ensure_role, reader_env  # noqa: F401 (a fixture)

FOREVER = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT count(*) AS c FROM n"


def _query(*args: str, url: str | None = None) -> Result:
    extra = ["--database-url", url] if url else []
    return CliRunner().invoke(main, ["query", *args, *extra], catch_exceptions=False)


def _stopped(result: Result, *words: str) -> None:
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    for word in words:
        assert word in result.output, result.output


# --- time -----------------------------------------------------------------------------------------------------

def test_sqlite_a_query_that_never_ends_is_stopped_at_the_time_limit(sqlite_url: str) -> None:
    env = env_for(sqlite_url, "redis://127.0.0.1:1/0", BULKGEN_QUERY_TIMEOUT_S="1")
    by_setting = producer(["query", FOREVER, "--database-url", sqlite_url], env, timeout=120)
    assert by_setting.returncode == 1 and "Traceback" not in by_setting.stderr, by_setting.stderr
    assert "query stopped after 1 s, its time limit" in by_setting.stderr and "--timeout" in by_setting.stderr
    by_flag = producer(["query", FOREVER, "--timeout", "0.5", "--database-url", sqlite_url],
                       env_for(sqlite_url, "redis://127.0.0.1:1/0"), timeout=120)
    assert by_flag.returncode == 1 and "query stopped after 0.5 s" in by_flag.stderr, by_flag.stderr


def test_postgres_pg_sleep_beyond_the_time_limit_is_stopped(pg_url: str, reader_env: str) -> None:
    _stopped(_query("SELECT pg_sleep(60) AS s", "--timeout", "1"), "query stopped after 1 s, its time limit")
    assert _query("SELECT pg_sleep(0.1) AS s", "--json", "--timeout", "30").exit_code == 0


def test_postgres_a_query_that_resets_its_own_statement_timeout_is_still_stopped(pg_url: str) -> None:
    """Row 1 turns statement_timeout off for the session; the FETCH that runs row 2 then has no server-side
    limit, and only the cancel `query` sends at its deadline stops it (without it: an hour)."""
    reader_url = _ensure_role(pg_url, READER, "SELECT")
    evading = ("SELECT i, CASE WHEN i = 1 THEN set_config('statement_timeout', '0', false) ELSE pg_sleep(3600)::text END AS x"
               " FROM generate_series(1, 2) i")
    done = producer(["query", evading, "--json", "--timeout", "2"],
                    env_for(pg_url, "redis://127.0.0.1:1/0", BULKGEN_READER_DATABASE_URL=reader_url), timeout=120)
    assert done.returncode == 1 and "query stopped after 2 s, its time limit" in done.stderr, done.stderr
    assert [json.loads(line)["i"] for line in done.stdout.splitlines()] == [1]


def _active(url: str) -> list[str]:
    """What the reader role's sessions in this test's database are running (with a server-side cursor, the
    statement shown is the FETCH that runs the query)."""
    engine = create_engine(url)
    try:
        with engine.connect() as c:
            return list(c.execute(text(
                "SELECT query FROM pg_stat_activity WHERE datname = current_database() AND usename = :r AND state = 'active'"
            ), {"r": READER}).scalars())
    finally:
        engine.dispose()


@pytest.mark.parametrize("sent", [signal.SIGTERM, signal.SIGKILL])
def test_postgres_a_stopped_query_does_not_go_on_running_on_the_server(pg_url: str, sent: signal.Signals) -> None:
    """SIGTERM: `query` cancels its statement on the server, then exits 143. SIGKILL cannot be caught: the
    session's client_connection_check_interval makes the server end the query once the connection is gone."""
    reader_url = _ensure_role(pg_url, READER, "SELECT")
    env = env_for(pg_url, "redis://127.0.0.1:1/0", BULKGEN_READER_DATABASE_URL=reader_url)
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys; from producer.cli import main; sys.exit(main())",
         "query", "SELECT pg_sleep(3600) AS s", "--timeout", "3600"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_until(lambda: process.poll() is not None or _active(pg_url), 60, "the query running on the server")
        assert process.poll() is None, process.communicate()
        process.send_signal(sent)
        _, stderr = process.communicate(timeout=60)
        wait_until(lambda: _active(pg_url) == [], 30, lambda: f"the query gone: {_active(pg_url)}")
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    if sent == signal.SIGTERM:
        assert process.returncode == 143, stderr
        assert "stopped by SIGTERM; the statement was cancelled on the server" in stderr and "Traceback" not in stderr


# --- size -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [["--json"], ["--csv"], []])
def test_sqlite_a_value_over_the_cell_limit_is_refused_before_it_is_made(sqlite_url: str, mode: list[str]) -> None:
    _stopped(_query("SELECT randomblob(2e8) AS b", *mode, url=sqlite_url), "a value is over 16 MiB", "--max-cell-bytes")
    _stopped(_query("SELECT randomblob(1e9) AS b", *mode, url=sqlite_url), "a value is over 16 MiB")
    small = _query("SELECT length(randomblob(1000)) AS n", "--json", "--max-cell-bytes", "2000", url=sqlite_url)
    assert small.exit_code == 0 and json.loads(small.stdout) == {"n": 1000}, small.output
    _stopped(_query("SELECT randomblob(3000) AS b", "--max-cell-bytes", "2000", url=sqlite_url), "over 2,000 bytes")


def test_postgres_a_value_over_the_cell_limit_is_refused(pg_url: str, reader_env: str) -> None:
    _stopped(_query("SELECT repeat('x', 20000000) AS t", "--json"), "a value of 19.1 MiB is over 16 MiB", "--max-cell-bytes")


def test_a_result_over_its_limit_stops_after_the_rows_that_fit(store_url: str) -> None:
    rows = "SELECT i, {blob} AS b FROM (WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 50) SELECT i FROM n) q"
    blob = "randomblob(100000)" if store_url.startswith("sqlite") else "repeat('x', 100000)"
    result = _query(rows.format(blob=blob), "--json", "--max-result-bytes", "350000", "--allow-role-that-can-write", url=store_url)
    _stopped(result, "query stopped at row 4", "--max-result-bytes")
    assert [json.loads(line)["i"] for line in result.stdout.splitlines()] == [1, 2, 3]


# --- the table ------------------------------------------------------------------------------------------------

def test_the_table_says_when_it_leaves_rows_out(sqlite_url: str) -> None:
    five = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5) SELECT i FROM n"
    cut = _query(five, "--max-rows", "3", url=sqlite_url)
    assert cut.exit_code == 0, cut.output
    assert "│ 3 │" in cut.stdout and "│ 4 │" not in cut.stdout
    assert "the first 3 rows" in cut.stderr and "--json" in cut.stderr and "--max-rows" in cut.stderr
    whole = _query(five, "--max-rows", "5", url=sqlite_url)
    assert whole.exit_code == 0 and "│ 5 │" in whole.stdout and whole.stderr == "", whole.output


# --- SQLite: nothing created ----------------------------------------------------------------------------------

def _beside(sqlite_url: str) -> list[str]:
    return sorted(p.name for p in Path(sqlite_url.removeprefix("sqlite:///")).parent.iterdir())


def test_sqlite_a_query_leaves_no_wal_or_shm_behind(sqlite_url: str) -> None:
    _job_with_results(sqlite_url)
    assert _beside(sqlite_url) == ["store.db"]
    result = _query("SELECT count(*) AS n FROM jobs", "--json", url=sqlite_url)
    assert result.exit_code == 0 and json.loads(result.stdout) == {"n": 1}, result.output
    assert _beside(sqlite_url) == ["store.db"]


def test_sqlite_a_query_sees_what_an_open_writer_committed(sqlite_url: str) -> None:
    """With a writer connected (its -wal beside the store) the store is not opened immutable: the query reads
    the writer's commits, which are still only in the -wal."""
    _job_with_results(sqlite_url)
    writer = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"))
    try:
        writer.execute("UPDATE jobs SET status = 'cancelled'")
        writer.commit()
        assert "store.db-wal" in _beside(sqlite_url)
        result = _query("SELECT status FROM jobs", "--json", url=sqlite_url)
        assert result.exit_code == 0 and json.loads(result.stdout) == {"status": "cancelled"}, result.output
    finally:
        writer.close()


@pytest.mark.parametrize("mode", ["rwc", "rw", "memory"])
def test_sqlite_a_file_uri_cannot_create_or_open_for_writing(sqlite_url: str, tmp_path: Path, mode: str) -> None:
    absent = tmp_path / "absent.db"
    result = _query("SELECT 1 AS one", url=f"sqlite:///file:{absent}?mode={mode}&uri=true")
    assert result.exit_code == 1 and "cannot reach the database" in result.output, result.output
    assert not absent.exists() and not list(tmp_path.glob("absent.db*"))
    store = sqlite_url.removeprefix("sqlite:///")
    _job_with_results(sqlite_url)
    read = _query("SELECT count(*) AS n FROM jobs", "--json", url=f"sqlite:///file:{store}?mode={mode}&uri=true")
    assert read.exit_code == 0 and json.loads(read.stdout) == {"n": 1}, read.output
    write = _query("UPDATE jobs SET status = 'x'", url=f"sqlite:///file:{store}?mode={mode}&uri=true")
    assert write.exit_code == 1 and "query is read-only" in write.output, write.output
    assert _beside(sqlite_url) == ["store.db"]


def test_the_sigterm_handler_is_put_back(sqlite_url: str) -> None:
    before = signal.getsignal(signal.SIGTERM)
    assert _query("SELECT 1 AS one", url=sqlite_url).exit_code == 0
    assert signal.getsignal(signal.SIGTERM) is before
