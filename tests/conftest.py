from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from models.db import upgrade_schema
from tests.helpers import REDIS_HOST_URL, create_pg_database, drop_pg_database

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
def broker_url() -> Iterator[str]:
    """A Redis database of the test's own on the local server, emptied before and after."""
    db = random.randint(1, 15)
    url = f"{REDIS_HOST_URL}/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest) -> str:
    """The same test against SQLite and against PostgreSQL."""
    name = "sqlite_url" if request.param == "sqlite" else "pg_url"
    return request.getfixturevalue(name)
