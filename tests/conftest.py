from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from migrations.schema import upgrade_schema
from tests.helpers import RedisServer, create_pg_database, drop_pg_database

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    upgrade_schema(url)
    return url


@pytest.fixture
def pg_url() -> Iterator[str]:
    url = create_pg_database()
    upgrade_schema(url)
    yield url
    drop_pg_database(url)


@pytest.fixture
def broker_url(tmp_path: Path) -> Iterator[str]:
    """A redis-server of the test's own, on a free port: no other test, no leftover worker of an earlier test,
    and no other run of the suite on this machine can take its messages (a shared server's 15 databases can)."""
    server = RedisServer(tmp_path / "broker", aof=False)
    server.start()
    try:
        yield server.url
    finally:
        server.kill()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest) -> str:
    """The same test against SQLite and against PostgreSQL."""
    name = "sqlite_url" if request.param == "sqlite" else "pg_url"
    return request.getfixturevalue(name)
