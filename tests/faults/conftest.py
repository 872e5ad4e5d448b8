"""Fixtures for the fault-injection tests: servers of their own, to crash and restart."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from models.db import upgrade_schema
from tests.faults.harness import PostgresServer, RedisServer, postgres_bin


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
