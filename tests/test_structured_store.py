"""Structured output in the store: a job keeps each distinct constraint once, its requests name it by key, a claim
hands the worker the constraints of what it claimed, stats count constrained requests; migration 0009 goes in and
out. Real SQLite and PostgreSQL, real Redis."""
from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner
from sqlalchemy import func, select

from contract.structured import JSON_SCHEMA, REGEX, compact
from models.db import make_engine, session_factory
from models.store import claim_requests
from models.tables import OutputConstraint, Request
from producer.cli import main
from producer.stats import collect
from tests.helpers import TINY, table_columns, write_jsonl

SCHEMA = {"type": "object", "properties": {"label": {"enum": ["a", "b"]}}, "required": ["label"]}


def test_a_schema_repeated_on_every_line_is_stored_once(store_url: str, broker_url: str, tmp_path: Path) -> None:
    lines = [{"prompt": f"p{i}", "guided_json": SCHEMA} for i in range(40)]
    lines += [{"prompt": "x", "guided_regex": "[0-9]+"}, {"prompt": "free"}]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    result = CliRunner().invoke(main, ["submit", str(path), "--model", TINY, "--database-url", store_url, "--broker-url", broker_url])
    assert result.exit_code == 0, result.output
    db = make_engine(store_url)
    with db.connect() as c:
        stored = {row.kind: row.spec for row in c.execute(select(OutputConstraint.kind, OutputConstraint.spec))}
        keys = c.execute(select(Request.constraint_key, func.count()).group_by(Request.constraint_key)).all()
        job_id, ids = c.execute(select(Request.job_id)).scalar(), list(c.scalars(select(Request.id).order_by(Request.id)))
    assert stored == {JSON_SCHEMA: compact(SCHEMA), REGEX: "[0-9]+"}
    assert sorted(count for _, count in keys) == [1, 1, 40]
    with session_factory(db)() as session:
        claim = claim_requests(session, job_id, ids[38:], "w1")
    assert claim is not None
    assert sorted(kind for kind, _ in claim.constraints.values()) == [JSON_SCHEMA, REGEX]
    assert {r.constraint_key for r in claim.requests} - {None} == set(claim.constraints)
    assert collect(db, job_id)["constrained_requests"] == 41
    db.dispose()


def test_migration_0009_adds_and_drops_the_constraint_columns(sqlite_url: str) -> None:
    from alembic import command

    from migrations import alembic_config

    command.downgrade(alembic_config(sqlite_url), "0008")
    assert "constraint_key" not in table_columns(sqlite_url, "requests") and "constrained" not in table_columns(sqlite_url, "results")
    command.upgrade(alembic_config(sqlite_url), "head")
    assert "constraint_key" in table_columns(sqlite_url, "requests") and "constrained" in table_columns(sqlite_url, "results")
    assert table_columns(sqlite_url, "output_constraints") == {"job_id", "key", "kind", "spec"}
