"""`producer query` reads, and refuses anything that writes, on SQLite and PostgreSQL."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, text

from producer.cli import main
from tests.test_export import _job_with_results


def _query(url: str, *args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, ["query", *args, "--database-url", url], catch_exceptions=False)


def test_a_read_query_prints_rows(store_url: str) -> None:
    job_id = _job_with_results(store_url)
    result = _query(store_url, f"SELECT custom_id, status FROM requests WHERE job_id = {job_id} ORDER BY id", "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert rows == [{"custom_id": "chat", "status": "done"}, {"custom_id": "raw", "status": "done"}, {"custom_id": "bad", "status": "failed"}]
    table = _query(store_url, "SELECT sum(completion_tokens) AS tokens FROM results")
    assert table.exit_code == 0 and "10" in table.output
    as_csv = _query(store_url, "SELECT custom_id FROM requests ORDER BY id", "--csv")
    assert as_csv.output.splitlines() == ["custom_id", "chat", "raw", "bad"]


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
