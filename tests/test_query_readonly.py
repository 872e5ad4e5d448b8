"""`producer query` is read-only for real: on SQLite an authorizer allows reading and nothing else, and nothing
is left at a path a statement names; on PostgreSQL a SELECT-only role reads, cannot reach the server's files or
write, and a role that could write (or a superuser) is refused unless the user names the risk with a flag (then
a warning on stderr), never showing a password."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from models.base import Base
from producer.cli import main
from tests.helpers import env_for, producer
from tests.test_export import _job_with_results
from contract.settings import get_settings

READER = "bulkgen_test_reader"
WRITER = "bulkgen_test_writer"
READER_PASSWORD = "reader-pw-x9"


def _query(*args: str, url: str | None = None) -> Result:
    extra = ["--database-url", url] if url else []
    return CliRunner().invoke(main, ["query", *args, *extra], catch_exceptions=False)


def _store_counts(url: str) -> tuple[int, int, int, str]:
    engine = create_engine(url)
    with engine.connect() as c:
        counts = (c.execute(text("SELECT count(*) FROM results")).scalar_one(),
                  c.execute(text("SELECT count(*) FROM rejects")).scalar_one(),
                  c.execute(text("SELECT count(*) FROM jobs")).scalar_one(),
                  c.execute(text("SELECT status FROM jobs")).scalar_one())
    engine.dispose()
    return counts


# --- SQLite ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("statement", "named"), [
    ("ATTACH DATABASE '{path}' AS x", "ATTACH"),
    ("attach '{path}' as x", "ATTACH"),
    ("VACUUM INTO '{path}'", "VACUUM"),
    ("VACUUM", "VACUUM"),
    ("DETACH DATABASE main", "DETACH"),
    ("INSERT INTO rejects (job_id, line_no, reason) VALUES (1, 1, 'x')", "INSERT"),
    ("WITH t AS (SELECT 1) INSERT INTO rejects (job_id, line_no, reason) SELECT 1, 1, '{path}' FROM t", "INSERT"),
    ("UPDATE jobs SET status = 'cancelled'", "UPDATE"),
    ("DELETE FROM results", "DELETE"),
    ("CREATE TABLE t (x TEXT)", "CREATE TABLE"),
    ("CREATE TEMP TABLE t AS SELECT '{path}'", "CREATE TEMP TABLE"),
    ("CREATE VIEW v AS SELECT 1", "CREATE VIEW"),
    ("DROP TABLE results", "DROP TABLE"),
    ("ALTER TABLE jobs ADD COLUMN x TEXT", "ALTER TABLE"),
    ("CREATE INDEX ix_x ON jobs (name)", "CREATE INDEX"),
    ("REINDEX", "REINDEX"),
    ("ANALYZE", "ANALYZE"),
    ("PRAGMA journal_mode=DELETE", "PRAGMA journal_mode"),
    ("PRAGMA query_only = OFF", "PRAGMA query_only"),
    ("PRAGMA user_version = 7", "PRAGMA user_version"),
    ("PRAGMA wal_checkpoint(TRUNCATE)", "PRAGMA wal_checkpoint"),
    ("PRAGMA optimize", "PRAGMA optimize"),
    ("PRAGMA writable_schema = ON", "PRAGMA writable_schema"),
    ("SELECT load_extension('x')", "load_extension"),
    ("SELECT load_extension('{path}')", "load_extension"),
    ("BEGIN IMMEDIATE", "BEGIN"),
    ("SAVEPOINT s", "SAVEPOINT"),
])
def test_sqlite_refuses_everything_but_reading_and_leaves_no_file(sqlite_url: str, tmp_path: Path, statement: str, named: str) -> None:
    _job_with_results(sqlite_url)
    before = _store_counts(sqlite_url)
    target = tmp_path / "elsewhere" / "probe.db"
    target.parent.mkdir()
    result = _query(statement.format(path=target), url=sqlite_url)
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert "query is read-only:" in result.output and named in result.output, result.output
    assert list(target.parent.iterdir()) == []  # no file at the named path, nor its -journal / -wal
    assert _store_counts(sqlite_url) == before
    engine = create_engine(sqlite_url)
    with engine.connect() as c:
        assert c.execute(text("PRAGMA journal_mode")).scalar_one() == "wal"
        assert c.execute(text("PRAGMA user_version")).scalar_one() == 0
        assert {r[0] for r in c.execute(text("SELECT name FROM sqlite_master WHERE type = 'table'"))} == {
            "alembic_version", *Base.metadata.tables}
    engine.dispose()


def test_sqlite_reads_still_work(sqlite_url: str) -> None:
    job_id = _job_with_results(sqlite_url)
    join = _query("SELECT q.custom_id, r.sample_index FROM results r JOIN requests q ON q.id = r.request_id "
                  f"WHERE r.job_id = {job_id} ORDER BY q.id, r.sample_index", "--json", url=sqlite_url)
    assert join.exit_code == 0, join.output
    assert [json.loads(x) for x in join.output.splitlines()] == [
        {"custom_id": "chat", "sample_index": 0}, {"custom_id": "chat", "sample_index": 1}, {"custom_id": "raw", "sample_index": 0}]
    recursive = _query("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5) "
                       "SELECT sum(i) AS s, (SELECT count(*) FROM jobs) AS jobs FROM n", "--json", url=sqlite_url)
    assert recursive.exit_code == 0, recursive.output
    assert json.loads(recursive.output) == {"s": 15, "jobs": 1}
    functions = _query("SELECT upper(custom_id) AS u, length(custom_id) AS n, json_extract(params, '$.n') AS k "
                       "FROM requests WHERE custom_id = 'chat'", "--json", url=sqlite_url)
    assert functions.exit_code == 0 and json.loads(functions.output) == {"u": "CHAT", "n": 4, "k": 2}, functions.output
    pragmas = _query("PRAGMA table_info(jobs)", "--csv", url=sqlite_url)
    assert pragmas.exit_code == 0 and "status" in pragmas.output, pragmas.output
    assert _query("PRAGMA journal_mode", url=sqlite_url).exit_code == 0
    listed = _query("SELECT name FROM pragma_table_info('requests') WHERE name = 'custom_id'", "--csv", url=sqlite_url)
    assert listed.exit_code == 0 and listed.output.splitlines() == ["name", "custom_id"], listed.output
    table_valued = _query("SELECT count(*) AS n FROM requests, json_each(requests.messages) WHERE custom_id = 'chat'", "--json", url=sqlite_url)
    assert table_valued.exit_code == 0 and json.loads(table_valued.output) == {"n": 1}, table_valued.output


def test_sqlite_the_schema_table_cannot_be_changed(sqlite_url: str) -> None:
    """The authorizer lets SQLite ask about the schema table for table-valued functions; SQLite itself refuses
    to change it (writable_schema, a writing PRAGMA, is refused)."""
    result = _query("UPDATE sqlite_master SET sql = 'x'", url=sqlite_url)
    assert result.exit_code != 0 and "Traceback" not in result.output and "may not be modified" in result.output
    assert _query("SELECT count(*) FROM jobs", url=sqlite_url).exit_code == 0


def test_sqlite_a_missing_store_is_an_error_and_is_not_created(tmp_path: Path) -> None:
    path = tmp_path / "absent.db"
    result = _query("SELECT 1", url=f"sqlite:///{path}")
    assert result.exit_code != 0 and "Traceback" not in result.output and "cannot reach the database" in result.output
    assert not path.exists()


# --- PostgreSQL -----------------------------------------------------------------------------------------------

def _ensure_role(admin_url: str, role: str, grants: str) -> str:
    """Create the role if the cluster lacks it (roles outlive the test databases), grant it `grants` on every
    table of this test database, and return its URL (with a password, which trust auth ignores)."""
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    database = make_url(admin_url).database
    with engine.connect() as c:
        c.execute(text(
            "DO $$ BEGIN "
            f"IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN CREATE ROLE {role} LOGIN; END IF; "
            "EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
        ))
        c.execute(text(f"ALTER ROLE {role} LOGIN NOSUPERUSER PASSWORD '{READER_PASSWORD}'"))
        c.execute(text(f'GRANT CONNECT ON DATABASE "{database}" TO {role}'))
        c.execute(text(f"GRANT USAGE ON SCHEMA public TO {role}"))
        c.execute(text(f"GRANT {grants} ON ALL TABLES IN SCHEMA public TO {role}"))
    engine.dispose()
    return make_url(admin_url).set(username=role, password=READER_PASSWORD).render_as_string(hide_password=False)


@pytest.fixture
def reader_env(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """BULKGEN_READER_DATABASE_URL names the SELECT-only role; BULKGEN_DATABASE_URL stays the superuser's."""
    reader_url = _ensure_role(pg_url, READER, "SELECT")
    monkeypatch.setenv("BULKGEN_DATABASE_URL", pg_url)
    monkeypatch.setenv("BULKGEN_READER_DATABASE_URL", reader_url)
    get_settings.cache_clear()
    yield reader_url
    get_settings.cache_clear()


def test_postgres_reader_role_reads_without_warning(pg_url: str, reader_env: str) -> None:
    job_id = _job_with_results(pg_url)
    result = _query(f"SELECT custom_id, status FROM requests WHERE job_id = {job_id} ORDER BY id", "--json")
    assert result.exit_code == 0, result.output
    assert [json.loads(x) for x in result.stdout.splitlines()] == [
        {"custom_id": "chat", "status": "done"}, {"custom_id": "raw", "status": "done"}, {"custom_id": "bad", "status": "failed"}]
    assert result.stderr == ""
    who = _query("SELECT current_user AS u", "--json")
    assert json.loads(who.stdout) == {"u": READER}
    assert READER_PASSWORD not in who.output


@pytest.mark.parametrize(("statement", "error"), [
    ("SELECT pg_read_file('/etc/hostname')", "permission denied"),
    ("SELECT lo_import('/etc/hostname')", "permission denied"),
    ("SELECT pg_ls_dir('.')", "permission denied"),
    ("INSERT INTO rejects (job_id, line_no, reason) VALUES (1, 1, 'x')", "query is read-only: INSERT is not allowed"),
    ("UPDATE jobs SET status = 'cancelled'", "query is read-only: UPDATE is not allowed"),
    ("DELETE FROM results", "query is read-only: DELETE is not allowed"),
    ("TRUNCATE results CASCADE", "query is read-only: TRUNCATE is not allowed"),
    ("CREATE TABLE t (x text)", "query is read-only: CREATE TABLE is not allowed"),
    ("CREATE TEMP TABLE t AS SELECT 1", "query is read-only: CREATE TEMP TABLE is not allowed"),
    ("DROP TABLE results", "query is read-only: DROP TABLE is not allowed"),
    ("COMMIT; SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE; DELETE FROM results", "COMMIT is not allowed"),
    ("WITH d AS (DELETE FROM results RETURNING id) SELECT count(*) FROM d", "data-modifying"),
    ("SELECT count(*) FROM results; DELETE FROM results", ""),
])
def test_postgres_reader_role_cannot_read_files_or_write(pg_url: str, reader_env: str, statement: str, error: str) -> None:
    _job_with_results(pg_url)
    before = _store_counts(pg_url)
    result = _query(statement)
    assert result.exit_code != 0
    assert "Traceback" not in result.output and result.output.startswith("Error: query "), result.output
    assert error in result.output, result.output
    assert READER_PASSWORD not in result.output
    assert _store_counts(pg_url) == before
    engine = create_engine(pg_url)
    with engine.connect() as c:
        assert c.execute(text("SELECT to_regclass('public.t')")).scalar_one() is None
        assert c.execute(text("SELECT count(*) FROM pg_largeobject_metadata")).scalar_one() == 0
    engine.dispose()


def test_postgres_superuser_is_refused_unless_the_risk_is_named(pg_url: str) -> None:
    _job_with_results(pg_url)
    with_password = make_url(pg_url).set(password="admin-pw-q7").render_as_string(hide_password=False)
    refused = _query("SELECT count(*) AS n FROM results", "--json", url=with_password)
    assert refused.exit_code == 1 and refused.stdout == "", refused.output
    assert "refused:" in refused.stderr and "superuser" in refused.stderr and "BULKGEN_READER_DATABASE_URL" in refused.stderr
    assert "--allow-role-that-can-write" in refused.stderr and "SELECT" in refused.stderr
    assert "admin-pw-q7" not in refused.output
    allowed = _query("SELECT count(*) AS n FROM results", "--json", "--allow-role-that-can-write", url=with_password)
    assert allowed.exit_code == 0, allowed.output
    assert json.loads(allowed.stdout) == {"n": 3}
    assert "warning:" in allowed.stderr and "superuser" in allowed.stderr and "admin-pw-q7" not in allowed.output


def test_postgres_superuser_cannot_write_through_dblink_without_the_flag(pg_url: str) -> None:
    """dblink_exec writes through a connection of its own, outside the read-only transaction: only refusing
    the role keeps it out (before, `query` warned, ran it, and the change stayed)."""
    _job_with_results(pg_url)
    engine = create_engine(pg_url)
    with engine.begin() as c:
        c.execute(text("CREATE EXTENSION IF NOT EXISTS dblink"))
    engine.dispose()
    before = _store_counts(pg_url)
    target = make_url(pg_url)
    conninfo = f"dbname={target.database} host={target.host} port={target.port or 5432} user={target.username}"
    update = "UPDATE jobs SET status = ''cancelled''"
    result = _query(f"SELECT dblink_exec('{conninfo}', '{update}')", url=pg_url)
    assert result.exit_code == 1 and "refused:" in result.output and "superuser" in result.output, result.output
    assert _store_counts(pg_url) == before


def test_postgres_role_that_can_write_is_refused_unless_the_risk_is_named(pg_url: str) -> None:
    _job_with_results(pg_url)
    writer_url = _ensure_role(pg_url, WRITER, "SELECT, INSERT")
    refused = _query("SELECT count(*) AS n FROM jobs", "--json", url=writer_url)
    assert refused.exit_code == 1 and refused.stdout == "", refused.output
    assert "refused:" in refused.stderr and WRITER in refused.stderr and "jobs" in refused.stderr
    assert "superuser" not in refused.stderr and "BULKGEN_READER_DATABASE_URL" in refused.stderr
    assert READER_PASSWORD not in refused.output
    allowed = _query("SELECT count(*) AS n FROM jobs", "--json", "--allow-role-that-can-write", url=writer_url)
    assert allowed.exit_code == 0 and json.loads(allowed.stdout) == {"n": 1}, allowed.output
    assert "warning:" in allowed.stderr and WRITER in allowed.stderr


def test_postgres_reader_url_from_the_environment_in_a_real_process(pg_url: str, tmp_path: Path) -> None:
    """The producer as a real process: BULKGEN_READER_DATABASE_URL is the URL query reads with."""
    _job_with_results(pg_url)
    reader_url = _ensure_role(pg_url, READER, "SELECT")
    env = env_for(pg_url, "redis://127.0.0.1:1/0", BULKGEN_READER_DATABASE_URL=reader_url)
    done = producer(["query", "SELECT current_user AS u, count(*) AS n FROM jobs GROUP BY 1", "--json"], env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"u": READER, "n": 1} and done.stderr == ""
    refused = producer(["query", "SELECT pg_read_file('/etc/hostname')"], env)
    assert refused.returncode != 0 and "permission denied" in refused.stderr and "Traceback" not in refused.stderr
    as_admin = producer(["query", "SELECT 1 AS one", "--database-url", pg_url], env)
    assert as_admin.returncode == 1 and "superuser" in as_admin.stderr and "Traceback" not in as_admin.stderr


@pytest.mark.parametrize(("statement", "refused"), [
    ("DELETE FROM results", True),
    ("COMMIT; SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE; DELETE FROM results", True),
    ("SELECT 1; DELETE FROM results", True),
    # these run for a superuser, and what they write goes with the read-only transaction: the warning's reason
    ("SELECT lo_import('/etc/hostname')", False),
    ("SELECT set_config('default_transaction_read_only', 'off', false), (SELECT count(*) FROM results)", False),
])
def test_postgres_even_a_superuser_cannot_write_through_query(pg_url: str, statement: str, refused: bool) -> None:
    """The read-only transaction holds for a superuser too; a statement cannot end it (the rows are read
    through a cursor, which takes one query and nothing else)."""
    _job_with_results(pg_url)
    before = _store_counts(pg_url)
    result = _query(statement, "--allow-role-that-can-write", url=pg_url)
    assert "Traceback" not in result.output and "superuser" in result.stderr
    assert (result.exit_code != 0) == refused, result.output
    assert _store_counts(pg_url) == before
    engine = create_engine(pg_url)
    with engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM pg_largeobject_metadata")).scalar_one() == 0
    engine.dispose()
