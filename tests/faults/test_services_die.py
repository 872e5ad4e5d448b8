"""The services die under a running job: Redis crashes and comes back (with its AOF, or with nothing),
PostgreSQL is down for 10 s. Workers ride it out; the job completes with exactly its results."""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.faults.harness import Fleet, Store, fault_env, running_job, wait_until

pytestmark = pytest.mark.slow

STANDIN = "stand-in"
REQUESTS = 240


@contextmanager
def _quarter_done(env: dict[str, str], tmp_path: Path) -> Iterator[tuple[int, Store, Fleet]]:
    """A job of REQUESTS stand-in prompts with two workers on it, a quarter of it done; the workers stop on leaving."""
    lines = [{"prompt": f"prompt {i}"} for i in range(REQUESTS)]
    with running_job(env, lines, tmp_path, STANDIN) as (job_id, store, fleet):
        wait_until(lambda: store.results(job_id) >= REQUESTS // 4, 120, "a quarter of the job done")
        yield job_id, store, fleet


@pytest.mark.parametrize("aof", [True, False], ids=["aof", "no-persistence"])
def test_redis_restarted_mid_job(aof: bool, own_redis_factory, sqlite_url: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """2. Redis is killed mid-job and started again on the same port: with AOF it comes back with
    (nearly) all it held; without persistence every message is gone and the reconciler re-enqueues
    them from the store. Either way the job completes, nothing twice, and no worker exits."""
    server = own_redis_factory(aof=aof)
    env = fault_env(sqlite_url, server.url, BULKGEN_TEST_DELAY_PER_REQUEST_S="0.05")
    with _quarter_done(env, tmp_path) as (job_id, store, fleet):
        server.kill()
        at_crash = store.results(job_id)
        time.sleep(2)
        server.start()
        if not aof:
            # It came back empty: nothing was loaded from disk. (dbsize() would race the workers and the
            # reconciler, which write to the new server within milliseconds.)
            persistence = server.client().info("persistence")
            assert persistence["aof_enabled"] == 0 and persistence["rdb_last_load_keys_loaded"] == 0
        assert store.wait_status(job_id, 180) == "completed", fleet.logs()
        assert fleet.alive(), "a worker exited when Redis went away"
    assert at_crash < REQUESTS, "the job finished before Redis was killed: the test proved nothing"
    store.assert_exactly_once(job_id, REQUESTS)
    resent = store.scalar("SELECT count(*) FROM requests WHERE job_id = :j AND enqueued_at IS NOT NULL", j=job_id)
    if not aof:
        assert resent > 0, "nothing was re-enqueued, yet Redis lost every message"


def test_postgres_down_for_ten_seconds(own_postgres, broker_url: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """3. The store is stopped for 10 s mid-job and started again: workers wait it out with backoff
    (they keep their model and never exit), the job completes, nothing lost, nothing twice."""
    url = own_postgres.url
    env = fault_env(url, broker_url, BULKGEN_TEST_DELAY_PER_REQUEST_S="0.05")
    with _quarter_done(env, tmp_path) as (job_id, store, fleet):
        own_postgres.stop()
        down_at = time.monotonic()
        time.sleep(10)
        assert fleet.alive(), "a worker exited while the store was down"
        own_postgres.start()
        assert time.monotonic() - down_at >= 10
        assert store.wait_status(job_id, 180) == "completed", fleet.logs()
        assert fleet.alive(), "a worker exited after the store came back"
        logs = fleet.logs(tail=None)
    assert "store error" in logs  # the workers did meet the outage
    assert store.results(job_id) == REQUESTS
    store.assert_exactly_once(job_id, REQUESTS)
