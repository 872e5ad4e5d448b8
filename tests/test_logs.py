"""One log format for workers and the producer (contract.logs): JSON lines when BULKGEN_LOG_FORMAT=json, with the
job id and request ids on the lines that concern them."""
from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import pytest

from contract.logs import JsonFormatter, about
from tests.helpers import TINY, WorkerProcess, env_for, producer, wait_for_job, write_jsonl


def test_a_record_becomes_one_json_line_with_its_job_and_requests() -> None:
    logger = logging.getLogger("bulkgen.test")
    record = logger.makeRecord("bulkgen.test", logging.WARNING, __file__, 1, "job %d: %s", (7, "lost"), None,
                               extra=about(7, [3, 4]))
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "job 7: lost" and line["level"] == "warning" and line["logger"] == "bulkgen.test"
    assert (line["job_id"], line["request_ids"]) == (7, [3, 4])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"]) and isinstance(line["pid"], int)
    try:
        raise ValueError("boom")
    except ValueError:
        failing = logger.makeRecord("bulkgen.test", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = json.loads(JsonFormatter().format(failing))
    assert "ValueError: boom" in line["exception"] and "job_id" not in line


def test_the_producers_notices_and_errors_are_json_lines(sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    env = env_for(sqlite_url, broker_url, BULKGEN_LOG_FORMAT="json")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, {"prompt": 3}, {"prompt": "x", "temprature": 1}])
    done = producer(["submit", str(bad)], env)
    assert done.returncode == 1
    lines = [json.loads(line) for line in done.stderr.splitlines()]  # every line is one JSON object
    assert [line["level"] for line in lines] == ["error", "error", "error"]
    assert lines[0]["message"].startswith("bad.jsonl:2: ") and lines[-1]["error"] == "InvalidInput"
    skipped = producer(["submit", str(bad), "--skip-invalid"], env)
    assert skipped.returncode == 0
    notices = [json.loads(line) for line in skipped.stderr.splitlines()]
    job_id = int(skipped.stdout.split()[-1])
    assert notices and all(n["job_id"] == job_id for n in notices)
    assert notices[-1]["rejected"] == 2


@pytest.mark.slow
def test_a_workers_log_lines_are_json_and_carry_the_job_and_its_requests(sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    env = env_for(sqlite_url, broker_url, BULKGEN_LOG_FORMAT="json", BULKGEN_MODEL=TINY)
    worker = WorkerProcess(env, log_path=tmp_path / "worker.log")
    try:
        done = producer(["submit", str(write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"p{i}", "max_new_tokens": 3} for i in range(5)]))], env, check=True)
        job_id = int(done.stdout.split()[-1])
        assert wait_for_job(sqlite_url, job_id, 300) == "completed"
    finally:
        worker.stop()
    text = worker.output()
    assert not re.search(r"^\[\d{4}-\d\d-\d\d .*(INFO|WARNING|ERROR)", text, re.M), "a log line in text format"
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    claimed = [line for line in lines if "claimed" in line["message"]]
    recorded = [line for line in lines if "recorded" in line["message"]]
    assert claimed and recorded
    assert all(line["job_id"] == job_id and line["request_ids"] for line in claimed + recorded)
    assert sorted(i for line in recorded for i in line["request_ids"]) == sorted(i for line in claimed for i in line["request_ids"])
    assert any(line.get("task_name") == "bulkgen.generate" or "Task" in line["message"] for line in lines)
