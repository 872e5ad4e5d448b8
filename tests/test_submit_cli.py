"""`producer submit` against a real store and a real Redis: bad input writes and enqueues nothing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner
from sqlalchemy import create_engine, text

from producer.cli import main
from tests.helpers import TINY, write_jsonl
from contract.messages import queue_name

GOOD = {"prompt": "hello", "max_new_tokens": 4}


def submit(store: str, broker: str, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        main, ["submit", *args, "--model", TINY, "--database-url", store, "--broker-url", broker], catch_exceptions=False
    )
    return result.exit_code, result.output


def counts(store: str) -> tuple[int, int, int]:
    engine = create_engine(store)
    with engine.connect() as c:
        jobs = c.execute(text("SELECT count(*) FROM jobs")).scalar_one()
        requests = c.execute(text("SELECT count(*) FROM requests")).scalar_one()
        rejects = c.execute(text("SELECT count(*) FROM rejects")).scalar_one()
    engine.dispose()
    return jobs, requests, rejects


BAD_LINES = {
    "invalid json": '{"prompt": "x"',
    "not an object": '["prompt"]',
    "no prompt": '{"max_new_tokens": 3}',
    "both": '{"prompt": "x", "messages": [{"role": "user", "content": "y"}]}',
    "bool as number": '{"prompt": "x", "temperature": true}',
    "nan": '{"prompt": "x", "temperature": NaN}',
    "negative temperature": '{"prompt": "x", "temperature": -1}',
    "top_p zero": '{"prompt": "x", "top_p": 0}',
    "max tokens beyond context": '{"prompt": "x", "max_new_tokens": 100000}',
    "n zero": '{"prompt": "x", "n": 0}',
    "beams with sampling": '{"prompt": "x", "num_beams": 4, "temperature": 0.7}',
    "bad role": '{"messages": [{"role": "robot", "content": "y"}]}',
    "typo": '{"prompt": "x", "temprature": 0.5}',
    "negative seed": '{"prompt": "x", "seed": -3}',
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_a_bad_line_writes_and_enqueues_nothing(case: str, sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [GOOD, BAD_LINES[case], GOOD])
    code, output = submit(sqlite_url, broker_url, str(path))
    assert code != 0
    assert "in.jsonl:2: " in output and "in.jsonl:1:" not in output and "in.jsonl:3:" not in output
    assert "Traceback" not in output
    assert counts(sqlite_url) == (0, 0, 0)
    assert redis.Redis.from_url(broker_url).llen(queue_name(TINY)) == 0


def test_invalid_utf8_and_duplicates_reported_by_line(sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"prompt": "ok", "custom_id": "a"}\n{"prompt": "\xff"}\n{"prompt": "again", "custom_id": "a"}\n')
    code, output = submit(sqlite_url, broker_url, str(path))
    assert code != 0
    assert "in.jsonl:2: invalid UTF-8" in output
    assert "in.jsonl:3: " in output and "duplicate custom_id 'a'" in output
    assert counts(sqlite_url) == (0, 0, 0)


def test_empty_file_and_missing_file(sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, output = submit(sqlite_url, broker_url, str(empty))
    assert code != 0 and "empty" in output and "Traceback" not in output
    code, output = submit(sqlite_url, broker_url, str(tmp_path / "nope.jsonl"))
    assert code != 0 and "no such file" in output
    assert counts(sqlite_url) == (0, 0, 0)


def test_bad_flag_is_refused(sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [GOOD])
    code, output = submit(sqlite_url, broker_url, str(path), "--top-p", "2")
    assert code != 0 and "--top-p" in output
    assert counts(sqlite_url) == (0, 0, 0)


def test_skip_invalid_enqueues_the_good_lines_and_records_rejects(store_url: str, broker_url: str, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [GOOD, BAD_LINES["typo"], {"prompt": "b", "n": 2}, BAD_LINES["nan"]])
    code, output = submit(store_url, broker_url, str(path), "--skip-invalid", "--temperature", "0.5")
    assert code == 0, output
    job_id = int(output.strip().splitlines()[-1])
    assert counts(store_url) == (1, 2, 2)
    engine = create_engine(store_url)
    with engine.connect() as c:
        job = c.execute(text("SELECT * FROM jobs WHERE id = :j"), {"j": job_id}).mappings().one()
        rejects = c.execute(text("SELECT line_no, reason FROM rejects ORDER BY line_no")).all()
        requests = c.execute(text("SELECT custom_id, params FROM requests ORDER BY id")).all()
    engine.dispose()
    assert job["total_requests"] == 2 and job["total_samples"] == 3 and job["rejected_count"] == 2
    assert job["status"] == "queued" and job["enqueued_at"] is not None
    defaults = job["defaults"] if isinstance(job["defaults"], dict) else json.loads(job["defaults"])
    assert defaults == {"temperature": 0.5}
    assert [line for line, _ in rejects] == [2, 4] and "temprature" in rejects[0][1]
    assert [custom_id for custom_id, _ in requests] == ["1", "3"]
    # one message with both ids, in the model's queue, JSON-encoded
    queue = redis.Redis.from_url(broker_url).lrange(queue_name(TINY), 0, -1)
    assert len(queue) == 1
    message = json.loads(queue[0])
    assert message["content-type"] == "application/json"
    assert message["headers"]["task"] == "bulkgen.generate"


def test_ids_are_grouped_into_small_messages(sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"p{i}"} for i in range(300)])
    code, output = submit(sqlite_url, broker_url, str(path))
    assert code == 0, output
    queue = redis.Redis.from_url(broker_url).lrange(queue_name(TINY), 0, -1)
    assert len(queue) == 3  # 128 + 128 + 44 (the default BULKGEN_IDS_PER_MESSAGE)
    import base64

    bodies = [json.loads(base64.b64decode(json.loads(m)["body"])) for m in queue]
    ids = sorted(i for args, _kwargs, _embed in bodies for i in args[1])
    assert len(ids) == len(set(ids)) == 300
    assert sorted(len(args[1]) for args, _kwargs, _embed in bodies) == [44, 128, 128]
