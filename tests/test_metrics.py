"""A real worker serves Prometheus metrics that count what it did."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, func, select

from models.db import make_engine, session_factory, utcnow
from models.store import claim_requests, lease_lapsed
from models.tables import Request
from tests.helpers import ROOT, WorkerProcess, env_for, free_port, producer, wait_for_job, wait_until, write_jsonl
from workers import metrics
from workers.standin import STANDIN_COMPLETION_TOKENS

pytestmark = pytest.mark.slow


def _scrape(port: int, timeout: float = 60) -> dict[tuple[str, tuple], float]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_worker_metrics_count_requests_and_tokens(sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = env_for(sqlite_url, broker_url, BULKGEN_METRICS_PORT=str(port), BULKGEN_IDS_PER_MESSAGE="16")
    lines = [{"prompt": f"hello {i}", "n": 2 if i % 5 == 0 else 1} for i in range(40)] + [{"prompt": "x" * 3}]
    prompts = write_jsonl(tmp_path / "p.jsonl", lines)
    job_id = int(producer(["submit", str(prompts), "--model", "stand-in"], env, check=True).stdout.split()[-1])
    worker = WorkerProcess(env, model="stand-in")
    try:
        assert wait_for_job(sqlite_url, job_id, timeout=120) == "completed"
        samples = _scrape(port)
    finally:
        worker.stop()
    model = (("model", "stand-in"),)
    samples_expected = sum(line.get("n", 1) for line in lines)
    assert samples[("bulkgen_requests_total", (("model", "stand-in"), ("outcome", "done")))] == len(lines)
    assert samples[("bulkgen_tokens_generated_total", model)] == samples_expected * STANDIN_COMPLETION_TOKENS
    assert samples[("bulkgen_batch_requests_count", model)] >= 2  # 41 requests in messages of at most 16
    assert samples[("bulkgen_batch_requests_sum", model)] == len(lines)
    assert samples[("bulkgen_queue_wait_seconds_count", model)] == len(lines)
    assert samples[("bulkgen_generation_seconds_count", model)] == len(lines)  # one per request
    assert ("bulkgen_model_load_seconds", (("device", "cpu"), ("model", "stand-in"))) in samples
    assert samples[("bulkgen_store_write_seconds_count", model)] >= 1  # one write per job and recorder turn
    assert not any(name == "bulkgen_gpu_memory_bytes" for name, _ in samples)  # a CPU worker has no GPU memory
    assert not any(name.startswith(("bulkgen_queue_depth", "bulkgen_reconciler_")) for name, _ in samples)


class Reconciler:
    """`producer reconcile --loop` as a real process."""

    def __init__(self, env: dict[str, str], every_s: float = 0.5) -> None:
        self.log = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(
            [sys.executable, "-c", "import sys; from producer.cli import main; sys.exit(main())", "reconcile", "--loop", str(every_s)],
            env=env, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def stop(self) -> str:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self.log.seek(0)
        return self.log.read()


def lapsed(db: Engine, job_id: int) -> int:
    """How many of the job's requests the store now counts as under a lapsed lease."""
    with session_factory(db)() as session:
        return session.scalar(select(func.count()).select_from(Request).where(Request.job_id == job_id, lease_lapsed(utcnow()))) or 0


def test_reconciler_metrics_follow_lapsed_leases_lost_messages_and_the_queue(sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    """Queue depth, lapsed leases and re-sends on the reconciler's endpoint; the restarted requests on the worker's."""
    reconciler_port, worker_port = free_port(), free_port()
    env = env_for(
        sqlite_url, broker_url, BULKGEN_IDS_PER_MESSAGE="8", BULKGEN_RECONCILE_GRACE_S="0",
        BULKGEN_RECONCILER_METRICS_PORT=str(reconciler_port), BULKGEN_METRICS_PORT=str(worker_port),
        BULKGEN_RECONCILE_INTERVAL_S="0",  # the worker's own reconciler stays off: the producer's is the one measured
    )
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"hello {i}"} for i in range(40)])
    job_id = int(producer(["submit", str(prompts), "--model", "stand-in"], env, check=True).stdout.split()[-1])

    # A worker that claimed three requests and vanished: their lease lapses.
    db = make_engine(sqlite_url)
    with session_factory(db)() as session:
        ids = list(session.scalars(select(Request.id).where(Request.job_id == job_id).order_by(Request.id).limit(3)))
        claimed = claim_requests(session, job_id, ids, "gone:1", lease_s=0.2)
    assert claimed is not None and len(claimed.requests) == 3
    wait_until(lambda: lapsed(db, job_id) == 3, 30, "the three leases to lapse (the store's lease_lapsed)")
    db.dispose()

    depth = ("bulkgen_queue_depth", (("model", "stand-in"),))
    reconciler = Reconciler(env)
    worker = None
    try:
        samples = wait_until(lambda: _swept(reconciler_port, 1), 60, "a first sweep")
        assert samples[("bulkgen_reconciler_lapsed_leases_total", ())] == 3
        assert samples[("bulkgen_reconciler_resent_requests_total", ())] == 0  # the messages are all in Redis
        assert samples[depth] == 5  # 40 requests, 8 per message

        # Redis loses the queue: the next sweep sends every request again.
        client = redis.Redis.from_url(broker_url)
        assert client.delete(*client.scan_iter("gen.stand-in*")) >= 1
        samples = wait_until(lambda: _resent(reconciler_port, 40), 60, "the lost requests sent again")
        assert samples[depth] == 5

        worker = WorkerProcess(env, model="stand-in")
        assert wait_for_job(sqlite_url, job_id, timeout=120) == "completed"
        worker_samples = _scrape(worker_port)
        wait_until(lambda: _scrape(reconciler_port)[depth] == 0, 30, "the queue drained")
    finally:
        if worker is not None:
            worker.stop()
        log = reconciler.stop()
    assert "reconciler metrics on" in log, log
    model = (("model", "stand-in"),)
    assert worker_samples[("bulkgen_retries_total", model + (("reason", "restarted"),))] == 3
    assert worker_samples[("bulkgen_requests_total", model + (("outcome", "done"),))] == 40


def _swept(port: int, at_least: int) -> dict[tuple[str, tuple], float] | None:
    samples = _scrape(port)
    return samples if samples.get(("bulkgen_reconciler_sweeps_total", (("outcome", "done"),)), 0) >= at_least else None


def _resent(port: int, count: int) -> dict[tuple[str, tuple], float] | None:
    samples = _scrape(port)
    return samples if samples.get(("bulkgen_reconciler_resent_requests_total", ()), 0) >= count else None


def test_gpu_memory_gauge_follows_an_allocation() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    before = torch.empty(0, device="cuda:0")  # torch's CUDA context first
    metrics.observe_gpu_memory("m", "cuda:0")
    allocated = ("m", "cuda:0", "allocated")
    base = metrics.GPU_MEMORY.labels(*allocated)._value.get()
    block = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda:0")
    metrics.observe_gpu_memory("m", "cuda:0")
    assert metrics.GPU_MEMORY.labels(*allocated)._value.get() >= base + block.numel()
    assert metrics.GPU_MEMORY.labels("m", "cuda:0", "total")._value.get() >= metrics.GPU_MEMORY.labels("m", "cuda:0", "reserved")._value.get() > 0
    del block, before
