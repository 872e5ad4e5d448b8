"""Fixtures for the fault-injection tests: servers of their own, to crash and restart."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from migrations.schema import upgrade_schema
from tests.faults.harness import PostgresServer, postgres_bin
from tests.helpers import RedisServer


@pytest.fixture
def own_redis_factory(tmp_path: Path) -> Iterator:
    servers: list[RedisServer] = []

    def make(aof: bool, **kw) -> RedisServer:  # type: ignore[no-untyped-def]
        server = RedisServer(tmp_path / f"redis-{len(servers)}", aof=aof, **kw)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.kill()


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    if postgres_bin() is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on this machine")
    server = PostgresServer()
    try:
        server.start()
        upgrade_schema(server.url)
        yield server
    finally:
        server.remove()


LOG_TAIL_LINES = 30


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """A failed fault test shows the end of each worker's log (CI prints only the end of the output)."""
    outcome = yield
    report = outcome.get_result()
    tmp_path = getattr(item, "funcargs", {}).get("tmp_path")
    if report.when != "call" or not report.failed or tmp_path is None:
        return
    for log in sorted(Path(tmp_path).glob("worker-*.log")):
        lines = log.read_text(errors="replace").splitlines()
        worrying = [line for line in lines[:-LOG_TAIL_LINES] if any(level in line for level in ("WARNING/", "ERROR/", "CRITICAL/", "Traceback"))]
        shown = worrying[-LOG_TAIL_LINES:] + ["..."] + lines[-LOG_TAIL_LINES:]
        text = "\n".join(line[:240] for line in shown)
        report.sections.append((f"worker log {log.name}: its warnings, then its last {LOG_TAIL_LINES} lines", text))
