"""Workers die in every way a worker can: SIGKILL mid-batch, SIGKILL between commit and ack, a
request that kills its worker each time, SIGTERM. Every job still ends with exactly its results, once.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from tests.faults.harness import (
    fault_env,
    freeze_holding,
    holder_pid,
    in_list,
    pid_alive,
    ppid,
    running_job,
    wait_until,
)
from tests.helpers import TINY

pytestmark = pytest.mark.slow

STANDIN = "stand-in"


def test_sigkill_a_worker_holding_a_batch(pg_url: str, broker_url: str, tmp_path: Path) -> None:
    """1. SIGKILL the pool process that holds a batch: the job completes, requests x n rows, none twice."""
    env = fault_env(pg_url, broker_url)
    lines = [{"prompt": f"Item {i}: the weather today is", "seed": i, "n": 2} for i in range(240)]
    with running_job(env, lines, tmp_path, TINY, "--max-new-tokens", "24") as (job_id, store, fleet):
        # mid-job: some results written, and a pool process frozen while it holds a batch
        wait_until(lambda: store.results(job_id) >= 20, 240, "results mid-job")
        victim, victim_ids = freeze_holding(store, job_id, 120)
        signal_parent = ppid(victim)
        os.kill(victim, signal.SIGKILL)
        assert store.wait_status(job_id, 300) == "completed", fleet.logs()
        assert not pid_alive(victim)
        assert fleet.alive(), "a worker's main process exited"
        assert any(w.process.pid == signal_parent for w in fleet.workers)
    store.assert_exactly_once(job_id, len(lines), samples_per_request=2)
    redone = store.query(f"SELECT id, attempts, status FROM requests WHERE id IN ({in_list(victim_ids)})")
    assert redone and all(r["status"] == "done" and r["attempts"] >= 2 for r in redone), redone


def test_sigkill_a_worker_holding_requests_of_several_messages(pg_url: str, broker_url: str, tmp_path: Path) -> None:
    """1b. A worker keeps its batch full across messages (8 ids each here), so when it dies it holds requests of
    several messages, most of them already acknowledged: their leases bring them back; nothing lost, nothing twice."""
    env = fault_env(pg_url, broker_url)
    lines = [{"prompt": f"Item {i}: a short story about", "seed": i} for i in range(240)]
    with running_job(env, lines, tmp_path, TINY, "--max-new-tokens", "32") as (job_id, store, fleet):
        wait_until(lambda: store.results(job_id) >= 10, 240, "results mid-job")

        def holding_several() -> tuple[int, list[int]] | None:
            victim, ids = freeze_holding(store, job_id, 60)
            if len(ids) > int(env["BULKGEN_IDS_PER_MESSAGE"]):
                return victim, ids
            os.kill(victim, signal.SIGCONT)
            return None

        victim, victim_ids = wait_until(holding_several, 120, "a worker holding more than one message's requests")
        os.kill(victim, signal.SIGKILL)
        assert store.wait_status(job_id, 300) == "completed", fleet.logs()
        assert fleet.alive(), "a worker's main process exited"
    store.assert_exactly_once(job_id, len(lines))
    redone = store.query(f"SELECT attempts, status FROM requests WHERE id IN ({in_list(victim_ids)})")
    assert len(redone) == len(victim_ids) and all(r["status"] == "done" and r["attempts"] >= 2 for r in redone)


def test_killed_after_commit_before_ack(pg_url: str, broker_url: str, tmp_path: Path) -> None:
    """8. A worker dies after committing a batch's results but before acknowledging its message: the
    message comes back, yet every (request, sample) has exactly one row and it is the first one written."""
    marker = tmp_path / "crashed.json"
    env = fault_env(pg_url, broker_url, BULKGEN_TEST_CRASH_AFTER_COMMIT=str(marker))
    lines = [{"prompt": f"Tell me about number {i}"} for i in range(200)]  # unseeded: a rerun would differ
    with running_job(env, lines, tmp_path, TINY, "--max-new-tokens", "8") as (job_id, store, fleet):
        assert store.wait_status(job_id, 300) == "completed", fleet.logs()
        assert fleet.alive()
    crash = json.loads(marker.read_text())
    assert crash["rows"] and not pid_alive(crash["pid"])
    store.assert_exactly_once(job_id, len(lines))
    for row in crash["rows"]:
        stored = store.query(
            "SELECT text, seed FROM results WHERE request_id = :r AND sample_index = :s", r=row["request_id"], s=row["sample_index"]
        )
        assert len(stored) == 1
        assert (stored[0]["text"], stored[0]["seed"]) == (row["text"], row["seed"])
    crashed_ids = sorted({row["request_id"] for row in crash["rows"]})
    attempts = {r["attempts"] for r in store.query(f"SELECT attempts FROM requests WHERE id IN ({in_list(crashed_ids)})")}
    assert attempts == {1}, "a request whose results were committed was generated again"


def test_poison_request_fails_after_bounded_attempts(sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    """4. A request that kills its worker every time ends failed after max_attempts, with its reason;
    the 199 others, including those of its batch, complete."""
    env = fault_env(sqlite_url, broker_url, BULKGEN_TEST_POISON="POISON-PILL", BULKGEN_TEST_DELAY_PER_REQUEST_S="0.02")
    lines = [{"custom_id": f"r{i}", "prompt": "POISON-PILL" if i == 37 else f"prompt {i}"} for i in range(200)]
    with running_job(env, lines, tmp_path, STANDIN) as (job_id, store, fleet):
        assert store.wait_status(job_id, 240) == "completed", fleet.logs()
        assert fleet.alive()
    job = store.job(job_id)
    assert (job["done_count"], job["failed_count"]) == (199, 1)
    poison = store.query("SELECT status, attempts, error FROM requests WHERE job_id = :j AND custom_id = 'r37'", j=job_id)[0]
    assert poison["status"] == "failed" and poison["attempts"] == 3
    assert "gave up after 3 attempts" in poison["error"] and "was lost" in poison["error"]
    assert store.states(job_id) == {"done": 199, "failed": 1}
    assert store.results(job_id) == 199
    assert store.scalar("SELECT count(*) FROM results r JOIN requests q ON q.id = r.request_id WHERE q.custom_id = 'r37' AND q.job_id = :j", j=job_id) == 0


def test_sigterm_finishes_what_it_holds(sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    """5. SIGTERM to a worker mid-job (what a supervisor sends): it finishes the batch it holds, exits 0,
    and the job completes with the other worker; the held batch was not generated twice."""
    env = fault_env(sqlite_url, broker_url, BULKGEN_TEST_DELAY_PER_REQUEST_S="0.1")
    lines = [{"prompt": f"prompt {i}"} for i in range(240)]
    with running_job(env, lines, tmp_path, STANDIN) as (job_id, store, fleet):
        wait_until(lambda: store.results(job_id) >= 16, 120, "results mid-job")
        child, held_ids = freeze_holding(store, job_id, 60)
        target = fleet.owner_of(child)
        target.process.send_signal(signal.SIGTERM)  # to the main process, as a supervisor does
        # The main process has begun its warm shutdown (Celery says so) and waits for the frozen child's batch.
        wait_until(lambda: "Warm shutdown" in target.output(), 30, lambda: "the warm shutdown: " + target.output()[-2000:])
        os.kill(child, signal.SIGCONT)
        assert target.process.wait(60) == 0, target.output()[-3000:]
        assert "Warm shutdown" in target.output()
        assert store.wait_status(job_id, 120) == "completed", fleet.logs()
        others = [w for w in fleet.workers if w is not target]
        assert all(w.process.poll() is None for w in others)
    store.assert_exactly_once(job_id, len(lines))
    finished = store.query(f"SELECT attempts, worker FROM requests WHERE id IN ({in_list(held_ids)})")
    assert {r["attempts"] for r in finished} == {1}
    assert {holder_pid(r["worker"]) for r in finished} == {child}
