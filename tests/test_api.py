"""The producer as a library (producer.api): rows from Python validated like a file's lines, a job handle with
status, wait, results and conveniences, and nothing left running behind a call."""
from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text

from contract.errors import EmptyInput, InputFileError, InvalidDefaults, InvalidInput, JobNotFound
from contract.messages import queue_name
from contract.settings import Settings
from producer import api
from tests.helpers import ROOT, TINY, WorkerProcess, env_for, write_jsonl


def settings(store: str, broker: str) -> Settings:
    return Settings(database_url=store, broker_url=broker, model=TINY)


def count(url: str, table: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return int(connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())
    finally:
        engine.dispose()


def queued(broker: str) -> int:
    client = redis.Redis.from_url(broker)
    try:
        return int(client.llen(queue_name(TINY)))
    finally:
        client.close()


def test_rows_from_python_are_submitted_with_the_job_defaults(sqlite_url: str, broker_url: str) -> None:
    rows = (
        {"prompt": f"row {i}", "metadata": {"i": i}} if i % 2 else {"messages": [{"role": "user", "content": f"row {i}"}], "n": 2}
        for i in range(1, 7)  # a generator: read once
    )
    job = api.submit(rows, settings=settings(sqlite_url, broker_url), name="from python", max_new_tokens=7)
    assert job.report is not None and (job.report.valid, job.report.samples, job.report.rejected) == (6, 9, 0)
    info = job.status()
    assert (info.id, info.name, info.model, info.requests, info.done, info.finished) == (job.id, "from python", TINY, 6, 0, False)
    assert info.status == "queued" and info.by_state.get("queued") == 6
    assert queued(broker_url) >= 1
    records = list(job.results())  # nothing generated yet: one record per request, text None
    assert [r["custom_id"] for r in records] == ["1", "2", "3", "4", "5", "6"]
    assert all(r["text"] is None and r["status"] == "queued" for r in records)
    assert records[0]["metadata"] == {"i": 1}
    assert info.defaults == {"max_new_tokens": 7}  # the job's default; a row's own value would win
    engine = create_engine(sqlite_url)
    with engine.connect() as connection:
        n = connection.execute(text("SELECT params FROM requests WHERE custom_id = '2'")).scalar_one()
    engine.dispose()
    assert '"n": 2' in n


def test_every_bad_row_is_in_one_exception_and_nothing_is_written(sqlite_url: str, broker_url: str) -> None:
    rows = [{"prompt": "fine"}, {"prompt": 3}, "not a dict", {"prompt": "x", "temprature": 0.5}, {"prompt": "nan", "top_p": float("nan")}]
    with pytest.raises(InvalidInput) as caught:
        api.submit(rows, settings=settings(sqlite_url, broker_url))
    error = caught.value
    assert [bad.position for bad in error.rows] == [2, 3, 4, 5]
    reasons = {bad.position: bad.reason for bad in error.rows}
    assert "expected a string" in reasons[2] and "expected an object" in reasons[3] and "temprature" in reasons[4]
    assert "4 invalid rows in rows" in str(error)
    assert error.details()[0].startswith("rows:2: ")
    assert count(sqlite_url, "jobs") == 0 and count(sqlite_url, "requests") == 0 and queued(broker_url) == 0


def test_skip_invalid_stores_the_good_rows_and_records_the_bad(sqlite_url: str, broker_url: str) -> None:
    job = api.submit([{"prompt": "a"}, {"prompt": ""}, {"prompt": "b"}], settings=settings(sqlite_url, broker_url), skip_invalid=True)
    assert job.report is not None and (job.report.valid, job.report.rejected) == (2, 1)
    assert job.report.errors[0].position == 2
    assert job.status().rejected == 1


def test_openai_batch_lines_from_python(sqlite_url: str, broker_url: str) -> None:
    lines = [
        {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "any", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}}
        for i in range(3)
    ]
    job = api.submit(lines, settings=settings(sqlite_url, broker_url))
    assert [r["custom_id"] for r in job.results()] == ["req-0", "req-1", "req-2"]


@pytest.mark.parametrize(
    "source, error",
    [([], EmptyInput), ({"prompt": "one dict"}, InputFileError), (42, InputFileError), ("/no/such/file.jsonl", InputFileError)],
    ids=["no rows", "a lone dict", "a number", "a missing path"],
)
def test_what_is_not_an_input_is_refused_before_anything_is_written(sqlite_url: str, broker_url: str, source, error) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error):
        api.submit(source, settings=settings(sqlite_url, broker_url))
    assert count(sqlite_url, "jobs") == 0


def test_a_bad_default_is_refused(sqlite_url: str, broker_url: str) -> None:
    with pytest.raises(InvalidDefaults, match="temperature"):
        api.submit([{"prompt": "a"}], settings=settings(sqlite_url, broker_url), temperature=-1)
    assert count(sqlite_url, "jobs") == 0


def test_a_handle_on_a_missing_job_and_a_wait_that_times_out(sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    with pytest.raises(JobNotFound):
        api.job(999, settings=settings(sqlite_url, broker_url))
    job = api.submit(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}]), settings=settings(sqlite_url, broker_url))
    again = api.job(job.id, settings=settings(sqlite_url, broker_url))
    with pytest.raises(TimeoutError, match=f"job {job.id} is still queued"):
        again.wait(timeout=0.3, poll_s=0.1)  # no worker: the job stays queued
    with pytest.raises(TimeoutError):
        again.wait(progress=True, timeout=0.3, poll_s=0.1)


def test_a_call_leaves_no_thread_and_no_connection_behind(sqlite_url: str, broker_url: str) -> None:
    before = {t.ident for t in threading.enumerate()}
    job = api.submit([{"prompt": "a"}, {"prompt": "b"}], settings=settings(sqlite_url, broker_url))
    job.status()
    list(job.results())
    with pytest.raises(TimeoutError):
        job.wait(progress=True, timeout=0.3, poll_s=0.1)
    job.cancel()
    assert job.status().status == "cancelled"
    left = [t.name for t in threading.enumerate() if t.ident not in before]
    assert left == []


# --- end to end, through a real worker -------------------------------------------------------------------------


@pytest.mark.slow
def test_the_api_end_to_end_through_a_real_worker(store_url: str, broker_url: str, tmp_path: Path) -> None:
    worker = WorkerProcess(env_for(store_url, broker_url), log_path=tmp_path / "worker.log")
    try:
        rows = [{"custom_id": f"r{i}", "prompt": f"Count to {i}:", "metadata": {"i": i}} for i in range(12)]
        rows[3]["n"] = 2
        job = api.submit(iter(rows), settings=settings(store_url, broker_url), max_new_tokens=6, temperature=0)
        info = job.wait(timeout=300, poll_s=0.2)
        assert info.status == "completed", worker.output()[-3000:]
        assert (info.done, info.results, info.failed) == (12, 13, 0)
        assert info.completion_tokens == sum(r["completion_tokens"] for r in job.results())
        records = list(job.results())
        assert [(r["custom_id"], r["sample_index"]) for r in records][:5] == [("r0", 0), ("r1", 0), ("r2", 0), ("r3", 0), ("r3", 1)]
        assert all(r["text"] is not None and r["status"] == "done" for r in records)
        frame = job.to_pandas()
        assert len(frame) == 13 and list(frame["custom_id"])[:2] == ["r0", "r1"]
        dataset = job.to_dataset()
        assert dataset.num_rows == 13 and dataset[0]["metadata"] == '{"i": 0}'
        assert job.to_arrow().column_names[:3] == ["custom_id", "sample_index", "status"]
    finally:
        worker.stop()


@pytest.mark.slow
def test_the_readme_example_runs_and_its_process_exits(sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    """examples/api_quickstart.py as a user runs it: submit, a progress bar, results, a DataFrame; then the
    interpreter exits on its own (no thread or connection keeps it alive)."""
    env = env_for(sqlite_url, broker_url, BULKGEN_MODEL=TINY)
    worker = WorkerProcess(env, log_path=tmp_path / "worker.log")
    try:
        done = subprocess.run([sys.executable, "examples/api_quickstart.py"], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=600)
    finally:
        worker.stop()
    assert done.returncode == 0, done.stdout + done.stderr + worker.output()[-3000:]
    assert "4 requests submitted" in done.stdout and "completed: 4 done" in done.stdout
    assert "geography" in done.stdout and "completion_tokens" in done.stdout
