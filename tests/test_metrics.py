"""A real worker serves Prometheus metrics that count what it did."""
from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import WorkerProcess, env_for, free_port, producer, wait_for_job, write_jsonl
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
