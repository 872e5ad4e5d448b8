"""`producer query` reads, and refuses anything that writes, on SQLite and PostgreSQL."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, text

from producer.cli import main
from tests.test_export import _job_with_results


def _query(url: str, *args: str):  # type: ignore[no-untyped-def]
    # pg_url is the superuser's: refused without the flag (tests/test_query_readonly.py), which SQLite ignores
    return CliRunner().invoke(main, ["query", *args, "--database-url", url, "--allow-role-that-can-write"], catch_exceptions=False)


def test_a_read_query_prints_rows(store_url: str) -> None:
    job_id = _job_with_results(store_url)
    result = _query(store_url, f"SELECT custom_id, status FROM requests WHERE job_id = {job_id} ORDER BY id", "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]  # a superuser URL also warns, on stderr
    assert rows == [{"custom_id": "chat", "status": "done"}, {"custom_id": "raw", "status": "done"}, {"custom_id": "bad", "status": "failed"}]
    table = _query(store_url, "SELECT sum(completion_tokens) AS tokens FROM results")
    assert table.exit_code == 0 and "10" in table.output
    as_csv = _query(store_url, "SELECT custom_id FROM requests ORDER BY id", "--csv")
    assert as_csv.stdout.splitlines() == ["custom_id", "chat", "raw", "bad"]


@pytest.mark.parametrize("statement", [
    "DELETE FROM results",
    "UPDATE jobs SET status = 'cancelled'",
    "DROP TABLE results",
    "INSERT INTO rejects (job_id, line_no, reason) VALUES (1, 1, 'x')",
])
def test_writes_are_refused(store_url: str, statement: str) -> None:
    _job_with_results(store_url)
    result = _query(store_url, statement)
    assert result.exit_code != 0 and "Traceback" not in result.output
    engine = create_engine(store_url)
    with engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM results")).scalar_one() == 3
        assert c.execute(text("SELECT count(*) FROM rejects")).scalar_one() == 0
        assert c.execute(text("SELECT status FROM jobs")).scalar_one() == "completed"
    engine.dispose()


def test_stats_by_job_and_overall(store_url: str) -> None:
    job_id = _job_with_results(store_url)
    result = CliRunner().invoke(main, ["stats", str(job_id), "--json", "--database-url", store_url], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["requests"] == 3 and info["by_state"] == {"done": 2, "failed": 1}
    assert info["completion_tokens"] == 10 and info["prompt_tokens"] == 14
    assert info["per_worker"] == [{"worker": "h", "results": 3, "completion_tokens": 10, "tokens_per_s": None, "mean_occupancy": None, "prefix_hit_rate": 0.381,
                                   "draft_tokens": 8, "accepted_draft_tokens": 2, "speculation_acceptance": 0.25}]
    # the chat request's samples proposed 5 and 3 draft tokens and kept 2 and 0; the raw one's engine did not say
    assert (info["draft_tokens"], info["accepted_draft_tokens"], info["speculation_acceptance"]) == (8, 2, 0.25)
    assert info["per_model"][0]["speculation_acceptance"] == 0.25
    assert info["prefix_hit_rate"] == round(8 / 21, 3)  # 4 of the chat request's 7 prompt tokens, in each of its 2 samples
    assert info["per_model"][0]["model"] == "tiny-random-llama"
    assert info["failures"] == [{"reason": "prompt has 9000 tokens", "count": 1}]
    assert info["eta_s"] == 0.0
    overall = CliRunner().invoke(main, ["stats", "--database-url", store_url], catch_exceptions=False)
    assert overall.exit_code == 0 and "per worker" in overall.output and "speculation_acceptance" in overall.output
    missing = CliRunner().invoke(main, ["stats", "999", "--database-url", store_url])
    assert missing.exit_code != 0 and "no job 999" in missing.output
