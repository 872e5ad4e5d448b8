"""Structured output in the store: a job keeps each distinct constraint once, its requests name it by key, a claim
hands the worker the constraints of what it claimed, stats count constrained requests; migration 0009 goes in and
out. Real SQLite and PostgreSQL, real Redis."""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner
from openai.types.chat import ChatCompletion
from sqlalchemy import func, select

from contract.structured import JSON_SCHEMA, REGEX, compact
from models.db import make_engine, session_factory
from models.store import claim_requests
from models.tables import OutputConstraint, Request
from producer.cli import main
from producer.stats import collect
from tests.helpers import TINY, env_for, producer, submit_and_complete, table_columns, write_jsonl
from tests.test_openai_batch import chat

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


@pytest.mark.slow
def test_an_openai_batch_file_with_response_format_goes_through_unchanged(sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    """A real submit, a real worker on the tiny model, the OpenAI export: every answer that ends 'stop' validates,
    the body keeps OpenAI's shape, and the stored results say they were constrained."""
    small = {"type": "object", "properties": {"label": {"enum": ["red", "green"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
             "required": ["label", "n"], "additionalProperties": False}
    lines = [chat(f"c{i}", max_tokens=40, seed=i, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": small, "strict": True}})
             for i in range(6)]
    lines.append(chat("free", max_tokens=5))
    env = env_for(sqlite_url, broker_url)
    job_id = submit_and_complete(write_jsonl(tmp_path / "batch.jsonl", lines), env, sqlite_url)
    exported = [json.loads(x) for x in producer(["results", str(job_id), "--format", "openai"], env, check=True).stdout.splitlines()]
    for line in exported:
        body = ChatCompletion.model_validate(line["response"]["body"])
        choice = body.choices[0]
        if line["custom_id"] != "free":
            assert choice.finish_reason == "stop", choice
            jsonschema.validate(json.loads(choice.message.content or ""), small)
    flat = [json.loads(x) for x in producer(["results", str(job_id), "--format", "jsonl"], env, check=True).stdout.splitlines()]
    assert {r["custom_id"]: r["constrained"] for r in flat} == {**{f"c{i}": True for i in range(6)}, "free": False}
