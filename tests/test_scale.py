"""Correctness at size: a 100k-line submit, its messages, its memory, status and export; an interrupted submit.

No timing assertions: bench/scale/ measures speed. These check that size changes nothing:
every request stored once, every id enqueued exactly once, memory bounded, counts right.
"""
from __future__ import annotations

import base64
import json
import math
import signal
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from bench.scale.generate import chat_line, write_chat_file
from bench.scale.services import run_measured
from models.db import make_engine
from models.store import Outcome, claim_requests, record_outcomes
from tests.helpers import ROOT, env_for, producer
from contract.messages import queue_name
from contract.settings import Settings

pytestmark = pytest.mark.slow

LINES = 100_000
MODEL = "stand-in"
QUEUE = queue_name(MODEL)
PRODUCER = [sys.executable, "-c", "import sys; from producer.cli import main; sys.exit(main())"]


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_chat_file(tmp_path_factory.mktemp("scale") / "prompts.jsonl", LINES)


def run_with_rss(args: list[str], env: dict[str, str], timeout: float = 300) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run `producer ARGS` as a process; returns it and its own peak RSS in KiB (see run_measured)."""
    _, rss_kib, done = run_measured([*PRODUCER, *args], env, timeout=timeout)
    return done, rss_kib


def queued_ids(broker_url: str) -> Counter[int]:
    """Every request id in the model's queue, decoded from the Celery messages (protocol 2, JSON, base64 body)."""
    ids: Counter[int] = Counter()
    for raw in redis.Redis.from_url(broker_url).lrange(QUEUE, 0, -1):
        message = json.loads(raw)
        assert message["headers"]["task"] == "bulkgen.generate"
        assert message["content-type"] == "application/json"
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        ids.update(args[1])
    return ids


def test_a_100k_submit_stores_and_enqueues_every_request_once(store_url: str, broker_url: str, big_file: Path, tmp_path: Path) -> None:
    env = env_for(store_url, broker_url)
    done, peak_kib = run_with_rss(["submit", str(big_file), "--model", MODEL, "--name", "big"], env)
    assert done.returncode == 0, done.stderr
    job_id = int(done.stdout.strip().splitlines()[-1])
    assert peak_kib < 300 * 1024, f"submit peaked at {peak_kib / 1024:.0f} MiB"

    engine = create_engine(store_url)
    with engine.connect() as c:
        job = c.execute(text("SELECT * FROM jobs WHERE id = :j"), {"j": job_id}).mappings().one()
        stored = c.execute(
            text("SELECT count(*), count(DISTINCT custom_id), count(DISTINCT line_no), min(line_no), max(line_no) FROM requests WHERE job_id = :j"),
            {"j": job_id},
        ).one()
        ids = set(c.execute(text("SELECT id FROM requests WHERE job_id = :j"), {"j": job_id}).scalars())
        sample = c.execute(
            text("SELECT custom_id, messages, params, metadata, status, attempts FROM requests WHERE job_id = :j AND line_no = 3"), {"j": job_id}
        ).one()
    engine.dispose()
    assert tuple(stored) == (LINES, LINES, LINES, 1, LINES)
    assert job["total_requests"] == LINES and job["total_samples"] == LINES and job["rejected_count"] == 0
    assert job["status"] == "queued" and job["enqueued_at"] is not None
    # the row is what the line said (line 3: temperature and top_p, metadata, no seed)
    decode = lambda v: v if not isinstance(v, str) else json.loads(v)
    assert sample.custom_id == "req-00000003" and sample.status == "queued" and sample.attempts == 0
    assert decode(sample.messages)[1] == {"role": "user", "content": "Question 3: explain bread to a child in two sentences."}
    assert decode(sample.params) == {"max_new_tokens": 67, "temperature": 0.7, "top_p": 0.95}
    assert decode(sample.metadata) == {"shard": 3, "source": "bench"}
    if store_url.startswith("sqlite"):  # the very text SQLAlchemy's JSON type would have written
        assert sample.messages == json.dumps(chat_line(3)["messages"]) and sample.params == json.dumps(decode(sample.params))

    enqueued = queued_ids(broker_url)
    assert redis.Redis.from_url(broker_url).llen(QUEUE) == math.ceil(LINES / Settings().ids_per_message)
    assert set(enqueued) == ids
    assert max(enqueued.values()) == 1, "an id was enqueued twice"


def test_memory_of_validate_and_store_stays_bounded(sqlite_url: str, big_file: Path) -> None:
    """Holding the file's rows would take far more than this; what grows is the duplicate-id table (~100 B a line)."""
    from producer.inputs import open_input
    from producer.submit import store_job, validate_file

    db = make_engine(sqlite_url)
    data = open_input(big_file)
    tracemalloc.start()
    try:
        validation = validate_file(data, {}, 2048)
        _, validate_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        store_job(db, data, model=MODEL, name=None, defaults={}, context_length=2048, validation=validation)
        _, store_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        db.dispose()
    file_mib = big_file.stat().st_size / 2**20
    assert validation.valid == LINES
    assert validate_peak < 40 * 2**20, f"validation peaked at {validate_peak / 2**20:.1f} MiB for a {file_mib:.0f} MiB file"
    assert store_peak < 24 * 2**20, f"storing peaked at {store_peak / 2**20:.1f} MiB for a {file_mib:.0f} MiB file"


def finish_job(database_url: str, job_id: int, fail: set[int], chunk: int = 2_000) -> None:
    """Settle every request of the job through the store's own functions: results for most, errors for `fail`."""
    engine = make_engine(database_url)
    with engine.connect() as c:
        ids = list(c.execute(text("SELECT id FROM requests WHERE job_id = :j ORDER BY id"), {"j": job_id}).scalars())
    for start in range(0, len(ids), chunk):
        with Session(engine, expire_on_commit=False) as session:
            claim = claim_requests(session, job_id, ids[start : start + chunk], "test-worker")
            assert claim is not None
            outcomes = []
            for request in claim.requests:
                if request.id in fail:
                    outcomes.append(Outcome(request_id=request.id, prompt_tokens=5, error="stand-in failure"))
                    continue
                row = {
                    "request_id": request.id, "job_id": job_id, "sample_index": 0, "text": f"answer {request.custom_id}",
                    "finish_reason": "length", "prompt_tokens": 5, "completion_tokens": 7, "params": {"seed": 1}, "seed": 1,
                    "model": MODEL, "dtype": "none", "quantization": "none", "worker_host": "test-worker", "device": "cpu",
                    "started_at": claim_time(), "finished_at": claim_time(), "generation_seconds": 0.0,
                }
                outcomes.append(Outcome(request_id=request.id, prompt_tokens=5, results=[row]))
            record_outcomes(session, job_id, outcomes)
    engine.dispose()


def claim_time():  # type: ignore[no-untyped-def]
    from models.db import utcnow

    return utcnow()


def test_status_and_export_of_a_100k_job(pg_url: str, broker_url: str, big_file: Path, tmp_path: Path) -> None:
    env = env_for(pg_url, broker_url)
    done = producer(["submit", str(big_file), "--model", MODEL], env)
    assert done.returncode == 0, done.stderr
    job_id = int(done.stdout.strip().splitlines()[-1])
    engine = create_engine(pg_url)
    with engine.connect() as c:
        failing = set(c.execute(text("SELECT id FROM requests WHERE job_id = :j AND line_no % 10000 = 7"), {"j": job_id}).scalars())
    engine.dispose()
    assert len(failing) == 10
    finish_job(pg_url, job_id, failing)

    status = producer(["status", str(job_id), "--json"], env)
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert info["status"] == "completed"
    assert (info["requests"], info["done"], info["failed"]) == (LINES, LINES - 10, 10)
    assert info["by_state"] == {"done": LINES - 10, "failed": 10}
    assert info["completion_tokens"] == 7 * (LINES - 10)
    assert info["failures"] == [{"reason": "stand-in failure", "count": 10}]

    jobs = producer(["jobs", "--json"], env)
    assert jobs.returncode == 0, jobs.stderr
    row = json.loads(jobs.stdout.splitlines()[0])
    assert (row["id"], row["done"], row["failed"], row["status"]) == (job_id, LINES - 10, 10, "completed")

    out = tmp_path / "results.jsonl"
    exported, peak_kib = run_with_rss(["results", str(job_id), "-o", str(out)], env)
    assert exported.returncode == 0, exported.stderr
    assert peak_kib < 300 * 1024, f"export peaked at {peak_kib / 1024:.0f} MiB"
    custom_ids: Counter[str] = Counter()
    errors = 0
    with out.open() as lines:
        for line in lines:
            record = json.loads(line)
            custom_ids[record["custom_id"]] += 1
            if record.get("text") is None:
                errors += 1
                assert record.get("error") == "stand-in failure"
            else:
                assert record["text"] == f"answer {record['custom_id']}"
    assert len(custom_ids) == LINES and max(custom_ids.values()) == 1
    assert errors == 10


# --- an interrupted submit leaves nothing behind ---------------------------------------------------

def _store_counts(url: str) -> tuple[int, int, int]:
    engine = create_engine(url)
    with engine.connect() as c:
        counts = tuple(c.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in ("jobs", "requests", "rejects"))
    engine.dispose()
    return counts  # type: ignore[return-value]


class InsertWatch:
    """Tells when a submit's insert transaction is running: on PostgreSQL its COPY, on SQLite its WAL growing."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_engine(url) if url.startswith("postgresql") else None

    def inserting(self) -> bool:
        if self.engine is None:
            wal = Path(self.url.removeprefix("sqlite:///") + "-wal")
            return wal.exists() and wal.stat().st_size > 8 * 2**20
        with self.engine.connect() as c:
            return c.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND query LIKE 'COPY requests%' AND state = 'active'"
                )
            ).scalar_one() > 0

    def close(self) -> None:
        if self.engine is not None:
            self.engine.dispose()


def _as_from_a_shell() -> None:
    """The child gets Ctrl-C as from a terminal, whatever the test process inherited: an ignored or blocked SIGINT
    passes to children through fork and exec. (A submit that still went on to finish, exit 0, in the full suite
    most likely had its KeyboardInterrupt dropped, as one raised inside a finalizer is: producer.interrupt now raises
it again.)"""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_a_submit_interrupted_while_inserting_leaves_nothing(how: signal.Signals, store_url: str, broker_url: str, tmp_path: Path) -> None:
    path = write_chat_file(tmp_path / "big.jsonl", 150_000)
    env = env_for(store_url, broker_url)
    watch = InsertWatch(store_url)
    process = subprocess.Popen([*PRODUCER, "submit", str(path), "--model", MODEL], env=env, cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_as_from_a_shell)
    try:
        deadline = time.monotonic() + 240
        while not watch.inserting():
            assert process.poll() is None, f"submit ended before it was interrupted: {process.communicate()}"
            assert time.monotonic() < deadline, "the insert phase never started"
            time.sleep(0.01)
        process.send_signal(how)
        _, stderr = process.communicate(timeout=60)
        if how == signal.SIGKILL and watch.engine is not None:
            # PostgreSQL rolls the dead client's transaction back once it notices the closed socket
            deadline = time.monotonic() + 30
            while watch.inserting() and time.monotonic() < deadline:
                time.sleep(0.1)
    finally:
        watch.close()
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0, f"the interrupted submit finished: {stderr}"
    if how == signal.SIGINT:
        assert "Aborted" in stderr and "Traceback" not in stderr, stderr
    assert _store_counts(store_url) == (0, 0, 0)
    assert redis.Redis.from_url(broker_url).llen(QUEUE) == 0
    if how == signal.SIGKILL:  # nothing is wedged either: the same file goes in whole afterwards
        done = producer(["submit", str(path), "--model", MODEL], env)
        assert done.returncode == 0, done.stderr
        assert _store_counts(store_url)[:2] == (1, 150_000)
        assert redis.Redis.from_url(broker_url).llen(QUEUE) == math.ceil(150_000 / Settings().ids_per_message)
