"""The three PostgreSQL roles of a deployment, each with only the grants its part needs (docs/security.md).

What each part runs against the store (models/intake.py, models/store.py, models/reads.py, workers/, producer/),
and so what it is granted:

- reader (`producer query`): SELECT on the store's tables, nothing else; a statement_timeout, a
  client_connection_check_interval and (set by a superuser) a temp_file_limit of its own.
- worker (`workers start`, and the reconciler inside it): reads everything; INSERT on results (its
  sequence); UPDATE of the state columns of requests and of the progress columns of jobs. It cannot
  delete or truncate anything, change a prompt, a job's model or totals, or touch rejects.
- submitter (submit, cancel, retry, reconcile, status, results, stats): reads everything; INSERT on jobs,
  requests and rejects (their sequences); UPDATE of the columns submit, cancel, retry and the reconciler
  set. It cannot delete, truncate, or write results.

None of them owns a table (so none can DROP or ALTER one), and none is a superuser or a member of the
roles that read the server's files. Granting is idempotent: every run first revokes all the role holds on
the store's tables and sequences, then grants exactly the list below; run it again after `producer db
upgrade` so that a new table or column is covered.

Passwords are sent as SCRAM-SHA-256 secrets computed here, so the plain password never reaches the
server's statement log, and they are never printed.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from dataclasses import dataclass, field

from sqlalchemy import Connection, text

from producer.query_limits import CONNECTION_CHECK_MS

READ_TABLES = ("jobs", "requests", "results", "rejects", "alembic_version")

JOB_PROGRESS = ("status", "started_at", "finished_at", "enqueued_at", "done_count", "result_count",
                "failed_count", "prompt_tokens", "completion_tokens")
"""What a worker moves on a job: claim_requests, record_outcomes, settle_failures, complete_job_if_finished,
and its reconciler's mark_enqueued."""
REQUEST_STATE = ("status", "attempts", "worker", "lease_until", "started_at", "finished_at", "error", "enqueued_at")
"""What a worker moves on a request: claim, renew, release, settle, expire_leases, mark_requests_enqueued."""
JOB_SUBMIT = ("status", "enqueued_at", "finished_at", "total_requests", "total_samples", "rejected_count",
              "failed_count")
"""What the producer sets on a job: set_job_totals, mark_enqueued, cancel_job, reopen_job, the reconciler."""
REQUEST_SUBMIT = ("status", "attempts", "error", "finished_at", "lease_until", "enqueued_at")
"""What the producer sets on a request: cancel_job, reopen_job, expire_leases, mark_requests_enqueued."""


@dataclass(frozen=True)
class Grants:
    select: tuple[str, ...] = READ_TABLES
    insert: tuple[str, ...] = ()
    """Tables it inserts into; it gets USAGE on their id sequences too."""
    update: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """table -> the columns it may UPDATE."""


PARTS: dict[str, Grants] = {
    "reader": Grants(),
    "worker": Grants(insert=("results",), update={"jobs": JOB_PROGRESS, "requests": REQUEST_STATE}),
    "submitter": Grants(insert=("jobs", "requests", "rejects"), update={"jobs": JOB_SUBMIT, "requests": REQUEST_SUBMIT}),
}

_ROLE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
ATTRIBUTES = "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS NOINHERIT"


def check_role_name(name: str) -> str:
    if not _ROLE_NAME.match(name):
        raise ValueError(f"role name must be lower-case letters, digits and _ (at most 63, not starting with a digit), got {name!r}")
    return name


def scram_secret(password: str, iterations: int = 4096, salt: bytes | None = None) -> str:
    """The SCRAM-SHA-256 secret PostgreSQL stores for a password (RFC 5802/7677), as CREATE ROLE accepts it."""
    salt = salt if salt is not None else os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    b64 = base64.b64encode
    return f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}${b64(stored_key).decode()}:{b64(server_key).decode()}"


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"  # standard_conforming_strings is on (the default since 9.1)


@dataclass
class RoleReport:
    part: str
    role: str
    created: bool
    password_set: bool
    grants: list[str]

    def line(self) -> str:
        state = "created" if self.created else "exists, grants reset"
        password = "password set" if self.password_set else "password unchanged"
        return f"{self.part} role {self.role}: {state}, {password}; " + "; ".join(self.grants)


def apply_role(connection: Connection, part: str, role: str, password: str | None,
               limits: ReaderLimits | None = None) -> RoleReport:
    """Create or alter one role and give it exactly its part's grants (and the reader its limits); in the
    caller's transaction."""
    grants = PARTS[part]
    check_role_name(role)
    quoted = f'"{role}"'
    exists = connection.execute(text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role}).first() is not None
    if exists:
        owns = connection.execute(
            text("SELECT count(*) FROM pg_class WHERE relowner = (SELECT oid FROM pg_roles WHERE rolname = :r)"), {"r": role}
        ).scalar_one()
        if owns:
            raise ValueError(f"role {role} owns {owns} relations (it may be the store's owner): give each part a role of its own")
    secret = f" PASSWORD {_literal(scram_secret(password))}" if password else ""
    connection.exec_driver_sql(f"{'ALTER' if exists else 'CREATE'} ROLE {quoted} {ATTRIBUTES}{secret}")
    for server_role in ("pg_read_server_files", "pg_write_server_files", "pg_execute_server_program"):
        connection.exec_driver_sql(f"REVOKE {server_role} FROM {quoted}")
    database = connection.execute(text("SELECT current_database()")).scalar_one()
    connection.exec_driver_sql(f'GRANT CONNECT ON DATABASE "{database}" TO {quoted}')
    connection.exec_driver_sql(f"GRANT USAGE ON SCHEMA public TO {quoted}")
    connection.exec_driver_sql(f"REVOKE CREATE ON SCHEMA public FROM {quoted}")
    tables = ", ".join(READ_TABLES)
    connection.exec_driver_sql(f"REVOKE ALL ON TABLE {tables} FROM {quoted}")
    sequences = [_sequence(connection, table) for table in ("jobs", "requests", "results", "rejects")]
    connection.exec_driver_sql(f"REVOKE ALL ON SEQUENCE {', '.join(sequences)} FROM {quoted}")

    said = [f"SELECT on {', '.join(grants.select)}"]
    connection.exec_driver_sql(f"GRANT SELECT ON TABLE {', '.join(grants.select)} TO {quoted}")
    if grants.insert:
        connection.exec_driver_sql(f"GRANT INSERT ON TABLE {', '.join(grants.insert)} TO {quoted}")
        own_sequences = ", ".join(_sequence(connection, table) for table in grants.insert)
        connection.exec_driver_sql(f"GRANT USAGE ON SEQUENCE {own_sequences} TO {quoted}")
        said.append(f"INSERT on {', '.join(grants.insert)}")
    for table, columns in grants.update.items():
        connection.exec_driver_sql(f"GRANT UPDATE ({', '.join(columns)}) ON TABLE {table} TO {quoted}")
        said.append(f"UPDATE of {table}({', '.join(columns)})")
    if part == "reader" and limits is not None:
        said += bound_reader(connection, quoted, limits)
    return RoleReport(part, role, not exists, bool(password), said)


@dataclass(frozen=True)
class ReaderLimits:
    statement_timeout_ms: int
    temp_file_limit: str
    """A size PostgreSQL reads (`1GB`, `500MB`, `-1` for none)."""


def bound_reader(connection: Connection, quoted: str, limits: ReaderLimits) -> list[str]:
    """Set the reader role's defaults: statement_timeout (a query's time, also when its client was killed and
    cannot cancel it), client_connection_check_interval (the server ends the query of a client that is gone),
    and temp_file_limit (what a query may spill to disk), which only a superuser may set."""
    said = [f"statement_timeout {limits.statement_timeout_ms} ms"]
    connection.exec_driver_sql(f"ALTER ROLE {quoted} SET statement_timeout = {int(limits.statement_timeout_ms)}")
    if int(connection.execute(text("SHOW server_version_num")).scalar_one()) >= 140000:
        connection.exec_driver_sql(f"ALTER ROLE {quoted} SET client_connection_check_interval = {CONNECTION_CHECK_MS}")
    superuser = connection.execute(text("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")).scalar_one()
    if superuser:
        connection.exec_driver_sql(f"ALTER ROLE {quoted} SET temp_file_limit = {_literal(limits.temp_file_limit)}")
        said.append(f"temp_file_limit {limits.temp_file_limit}")
    else:
        said.append("temp_file_limit NOT set (only a superuser may set it: run `producer db roles` as one, or "
                    f"ALTER ROLE {quoted} SET temp_file_limit = '{limits.temp_file_limit}')")
    return said


def _sequence(connection: Connection, table: str) -> str:
    name = connection.execute(text("SELECT pg_get_serial_sequence(:t, 'id')"), {"t": table}).scalar_one()
    if name is None:
        raise ValueError(f"table {table} has no id sequence: is the store at the current schema?")
    return str(name)
