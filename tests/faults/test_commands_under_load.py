"""Lifecycle commands against a job that real workers are running: cancel, and submit --resume."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from tests.faults.harness import Fleet, Store, fault_env, submit, wait_until
from tests.helpers import producer, write_jsonl
from contract.messages import queue_name

pytestmark = pytest.mark.slow

STANDIN = "stand-in"
REQUESTS = 240


def test_cancel_a_running_job(pg_url: str, broker_url: str, tmp_path: Path) -> None:
    """6. Cancel mid-job: once the batches being generated finish, no new result appears for the job;
    it stays 'cancelled'; the results written stay; its other requests are 'cancelled'."""
    env = fault_env(pg_url, broker_url, BULKGEN_TEST_DELAY_PER_REQUEST_S="0.05")
    lines = [{"prompt": f"prompt {i}"} for i in range(REQUESTS)]
    job_id = submit(env, write_jsonl(tmp_path / "p.jsonl", lines), "--model", STANDIN)
    store = Store(pg_url)
    queue = queue_name(STANDIN)
    client = redis.Redis.from_url(broker_url)
    fleet = Fleet(env, STANDIN, count=2, log_dir=tmp_path)
    try:
        wait_until(lambda: store.results(job_id) >= REQUESTS // 5, 120, "a fifth of the job done")
        cancelled = producer(["cancel", str(job_id)], env, check=True)
        assert f"job {job_id} cancelled" in cancelled.stdout
        # settled: nothing running any more, and every message of the job taken off the queue
        wait_until(lambda: "running" not in store.states(job_id), 60, "the batches in flight to finish")
        wait_until(lambda: client.llen(queue) == 0, 60, "the workers to drain (and skip) the job's messages")
        settled = store.results(job_id)
        time.sleep(3)  # several reconcile intervals and message turnarounds
        assert store.results(job_id) == settled, "results appeared after the cancel settled"
        assert fleet.alive()
    finally:
        fleet.stop()
    job = store.job(job_id)
    assert job["status"] == "cancelled" and job["finished_at"] is not None
    states = store.states(job_id)
    assert set(states) <= {"done", "cancelled"} and states.get("cancelled", 0) > 0
    assert states["done"] == settled == job["done_count"] < REQUESTS
    assert store.scalar(
        "SELECT count(*) FROM results r JOIN requests q ON q.id = r.request_id WHERE q.job_id = :j AND q.status <> 'done'", j=job_id
    ) == 0
    again = producer(["cancel", str(job_id)], env, check=True)
    assert "already cancelled" in again.stdout


def test_resume_twice_generates_nothing_twice(sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    """7. The same file submitted with --resume twice — once while everything is still on the queue,
    once after the queue lost every message — then again mid-run: each request is generated once."""
    env = fault_env(sqlite_url, broker_url, BULKGEN_TEST_DELAY_PER_REQUEST_S="0.03", BULKGEN_RECONCILE_INTERVAL_S="0")
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"prompt {i}"} for i in range(REQUESTS)])
    job_id = submit(env, path, "--model", STANDIN)
    store = Store(sqlite_url)
    queue = queue_name(STANDIN)
    client = redis.Redis.from_url(broker_url)
    messages = client.llen(queue)

    first = producer(["submit", str(path), "--resume", str(job_id)], env, check=True)
    assert f"job {job_id}: 0 requests" in first.stderr and first.stdout.split()[-1] == str(job_id)
    assert client.llen(queue) == messages  # all were still carried: nothing sent again

    client.delete(queue)  # the queue loses every message
    second = producer(["submit", str(path), "--resume", str(job_id)], env, check=True)
    assert f"{REQUESTS} requests" in second.stderr

    fleet = Fleet(env, STANDIN, count=2, log_dir=tmp_path)
    try:
        wait_until(lambda: store.results(job_id) >= REQUESTS // 4, 120, "a quarter of the job done")
        third = producer(["submit", str(path), "--resume", str(job_id)], env, check=True)
        assert third.returncode == 0
        assert store.wait_status(job_id, 120) == "completed", fleet.logs()
    finally:
        fleet.stop()
    store.assert_exactly_once(job_id, REQUESTS)
    assert store.scalar("SELECT max(attempts) FROM requests WHERE job_id = :j", j=job_id) == 1

    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": "something else"}])
    refused = producer(["submit", str(other), "--resume", str(job_id)], env)
    assert refused.returncode != 0 and "is not the input job" in refused.stderr and "Traceback" not in refused.stderr
