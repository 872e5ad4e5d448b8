"""`producer db roles` on the real PostgreSQL: each role can do what its part does and nothing more."""
from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

from migrations.schema import upgrade_schema
from tests.helpers import PG_ADMIN_URL, create_pg_database, drop_pg_database, env_for, producer


@pytest.fixture(scope="module")
def store() -> Iterator[tuple[str, dict[str, str]]]:
    """A fresh database with the three roles (unique names), dropped after the module."""
    url = create_pg_database()
    upgrade_schema(url)
    suffix = uuid.uuid4().hex[:8]
    roles = {part: f"bulkgen_t_{part}_{suffix}" for part in ("submitter", "worker", "reader")}
    env = env_for(url, "redis://127.0.0.1:1/0", BULKGEN_WORKER_PASSWORD="w0rker-Secret-pw",
                  BULKGEN_QUERY_TIMEOUT_S="120", BULKGEN_READER_TEMP_FILE_LIMIT="8MB")
    args = ["db", "roles", "--submitter", roles["submitter"], "--worker", roles["worker"], "--reader", roles["reader"]]
    first = producer(args, env, check=True)
    assert "w0rker-Secret-pw" not in first.stdout + first.stderr
    again = producer(args, env, check=True)  # idempotent: a second run resets the same grants
    assert again.stdout.count("exists, grants reset") == 3
    assert "statement_timeout 120000 ms" in again.stdout and "temp_file_limit 8MB" in again.stdout
    with create_engine(url).begin() as connection:
        connection.execute(text("INSERT INTO jobs (model, status, defaults, total_requests, total_samples, done_count,"
                                " failed_count, rejected_count, prompt_tokens, completion_tokens, created_at)"
                                " VALUES ('m', 'queued', '{}', 1, 1, 0, 0, 0, 0, 0, now())"))
    try:
        yield url, roles
    finally:
        drop_pg_database(url)
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            for role in roles.values():
                connection.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
        admin.dispose()


def as_role(url: str, role: str) -> str:
    return url.replace("postgres@", f"{role}@", 1)


def refused(url: str, sql: str) -> str:
    engine = create_engine(url)
    try:
        with engine.begin() as connection, pytest.raises(DBAPIError) as caught:
            connection.execute(text(sql))
        return str(caught.value.orig)
    finally:
        engine.dispose()


READER_PROBES = [
    "SELECT pg_read_file('/etc/hostname')",
    "SELECT lo_import('/etc/hostname')",
    "SELECT pg_ls_dir('.')",
    "INSERT INTO rejects (job_id, line_no, reason) VALUES (1, 1, 'x')",
    "UPDATE jobs SET status = 'failed'",
    "DELETE FROM jobs",
    "TRUNCATE results",
    "CREATE TABLE mine (x int)",
    "DROP TABLE results",
    "ALTER TABLE jobs ADD COLUMN x int",
]


@pytest.mark.parametrize("sql", READER_PROBES)
def test_the_reader_can_only_read(store: tuple[str, dict[str, str]], sql: str) -> None:
    url, roles = store
    reader = as_role(url, roles["reader"])
    message = refused(reader, sql)
    assert "permission denied" in message or "must be owner" in message
    engine = create_engine(reader)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM jobs")).scalar_one() == 1
    engine.dispose()


@pytest.mark.parametrize("sql", [
    "DELETE FROM jobs", "DELETE FROM results", "TRUNCATE jobs CASCADE", "DROP TABLE jobs CASCADE",
    "UPDATE jobs SET model = 'other'", "UPDATE requests SET prompt = 'other'",
    "INSERT INTO jobs (model, created_at) VALUES ('m', now())", "SELECT pg_read_file('/etc/hostname')",
])
def test_the_worker_cannot_delete_drop_or_rewrite_jobs(store: tuple[str, dict[str, str]], sql: str) -> None:
    url, roles = store
    message = refused(as_role(url, roles["worker"]), sql)
    assert "permission denied" in message or "must be owner" in message


@pytest.mark.parametrize("sql", ["DELETE FROM jobs", "DROP TABLE results", "INSERT INTO results (request_id) VALUES (1)",
                                 "UPDATE jobs SET done_count = 99"])
def test_the_submitter_cannot_delete_drop_or_write_results(store: tuple[str, dict[str, str]], sql: str) -> None:
    url, roles = store
    message = refused(as_role(url, roles["submitter"]), sql)
    assert "permission denied" in message or "must be owner" in message


def test_roles_are_plain_and_the_password_is_a_scram_secret(store: tuple[str, dict[str, str]]) -> None:
    url, roles = store
    engine = create_engine(url)
    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT rolname, rolsuper, rolcreaterole, rolcreatedb, rolpassword FROM pg_authid WHERE rolname = ANY(:r)"),
            {"r": list(roles.values())},
        ).all()
    engine.dispose()
    by_name = {row.rolname: row for row in rows}
    assert set(by_name) == set(roles.values())
    assert not any(row.rolsuper or row.rolcreaterole or row.rolcreatedb for row in rows)
    assert by_name[roles["worker"]].rolpassword.startswith("SCRAM-SHA-256$4096:")
    assert by_name[roles["reader"]].rolpassword is None


def test_the_reader_role_has_a_time_limit_and_a_temp_file_limit(store: tuple[str, dict[str, str]]) -> None:
    """Set on the role, so they hold for any session of it, a killed `producer query`'s included (the role
    may raise statement_timeout for its own session, as `query --timeout` does; temp_file_limit it cannot)."""
    url, roles = store
    engine = create_engine(as_role(url, roles["reader"]))
    with engine.connect() as connection:
        shown = {name: connection.execute(text(f"SHOW {name}")).scalar_one()
                 for name in ("statement_timeout", "temp_file_limit", "client_connection_check_interval")}
        with pytest.raises(DBAPIError, match="permission denied"):
            connection.execute(text("SET temp_file_limit = -1"))
    engine.dispose()
    assert shown == {"statement_timeout": "2min", "temp_file_limit": "8MB", "client_connection_check_interval": "1s"}


def test_the_reader_cannot_fill_the_disk_with_temporary_files(store: tuple[str, dict[str, str]]) -> None:
    url, roles = store
    env = env_for(url, "redis://127.0.0.1:1/0", BULKGEN_READER_DATABASE_URL=as_role(url, roles["reader"]))
    done = producer(["query", "SELECT count(*) AS n FROM generate_series(1, 1e9)"], env, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "temporary file size exceeds temp_file_limit (8192kB)" in done.stderr


def test_roles_refuse_sqlite(tmp_path) -> None:  # type: ignore[no-untyped-def]
    done = producer(["db", "roles", "--database-url", f"sqlite:///{tmp_path / 's.db'}"], env_for("sqlite://", "redis://x"))
    assert done.returncode != 0 and "SQLite has no roles" in done.stderr


@pytest.mark.slow
def test_a_job_runs_end_to_end_with_the_three_roles(store: tuple[str, dict[str, str]], broker_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.helpers import TINY, WorkerProcess, wait_for_job, write_jsonl

    url, roles = store
    # the shared URL is the owner's; each part gets its own role, which it must use (or the grants are untested)
    env = env_for(url, broker_url, BULKGEN_SUBMITTER_DATABASE_URL=as_role(url, roles["submitter"]),
                  BULKGEN_WORKER_DATABASE_URL=as_role(url, roles["worker"]),
                  BULKGEN_READER_DATABASE_URL=as_role(url, roles["reader"]))
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"x {i}", "max_new_tokens": 4, "n": 2} for i in range(5)] + ["{bad"])
    submitted = producer(["submit", str(prompts), "--model", TINY, "--skip-invalid"], env, check=True)
    job_id = int(submitted.stdout.split()[-1])
    worker = WorkerProcess(env)
    try:
        assert wait_for_job(url, job_id, timeout=180) == "completed", worker.output()[-3000:]
    finally:
        worker.stop()
    assert f"store postgresql+psycopg://{roles['worker']}@" in worker.output()
    queried = producer(["query", f"SELECT count(*) AS n FROM results WHERE job_id = {job_id}", "--json"], env, check=True)
    assert '"n": 10' in queried.stdout and "warning" not in queried.stderr.lower()
    assert producer(["results", str(job_id), "-o", str(tmp_path / "o.jsonl")], env, check=True).returncode == 0
    assert producer(["retry", str(job_id)], env, check=True).returncode == 0
    assert producer(["cancel", str(job_id)], env).returncode == 0
    engine = create_engine(url)
    with engine.connect() as connection:
        who = connection.execute(text("SELECT DISTINCT worker_host FROM results WHERE job_id = :j"), {"j": job_id}).scalars().all()
    engine.dispose()
    assert who


def test_an_owner_that_is_not_a_superuser_sets_the_time_limit_and_says_it_could_not_set_temp_file_limit() -> None:
    """temp_file_limit is a superuser's setting: an owner with CREATEROLE sets everything else and says what it
    could not, with the statement that would."""
    suffix = uuid.uuid4().hex[:8]
    owner = f"bulkgen_t_owner_{suffix}"
    roles = {part: f"bulkgen_t_{part}_{suffix}" for part in ("submitter", "worker", "reader")}
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    url = create_pg_database()
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE ROLE "{owner}" LOGIN CREATEROLE'))
            connection.execute(text(f'ALTER DATABASE "{url.rsplit("/", 1)[1]}" OWNER TO "{owner}"'))
        with create_engine(url, isolation_level="AUTOCOMMIT").connect() as connection:
            connection.execute(text(f'ALTER SCHEMA public OWNER TO "{owner}"'))
        owner_url = as_role(url, owner)
        env = env_for(owner_url, "redis://127.0.0.1:1/0")
        producer(["db", "upgrade"], env, check=True)
        done = producer(["db", "roles", "--submitter", roles["submitter"], "--worker", roles["worker"],
                         "--reader", roles["reader"]], env, check=True)
        assert "statement_timeout 300000 ms" in done.stdout
        assert "temp_file_limit NOT set (only a superuser may set it" in done.stdout, done.stdout
        engine = create_engine(as_role(url, roles["reader"]))
        with engine.connect() as connection:
            assert connection.execute(text("SHOW statement_timeout")).scalar_one() == "5min"
        engine.dispose()
    finally:
        drop_pg_database(url)
        with admin.connect() as connection:
            for role in [*roles.values(), owner]:
                connection.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
        admin.dispose()
