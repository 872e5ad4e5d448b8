"""Structured output at submit: each malformed schema, regex or choice list is refused with its line and reason,
and nothing is stored or enqueued; good ones are read into a Constraint. Fast: no torch, no model."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis

from contract.messages import queue_name
from contract.structured import CHOICE, JSON_OBJECT, JSON_SCHEMA, REGEX, Constraint, constraint_of
from tests.helpers import TINY, write_jsonl
from tests.test_openai_batch import chat
from tests.test_submit_cli import GOOD, counts, submit
from tests.test_validation import errors_of, line, read

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name"]}


def schema_format(schema: Any, **extra: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True, **extra}}


def test_each_way_of_asking_becomes_its_constraint(tmp_path: Path) -> None:
    outcomes = read(
        tmp_path,
        line(response_format=schema_format(PERSON)),
        line(response_format={"type": "json_object"}),
        line(guided_json=PERSON),
        line(guided_regex=r"\d{3}-\d{4}"),
        line(guided_choice=["yes", "no"]),
        line(response_format={"type": "text"}),
    )
    constraints = [o.request.constraint if o.request else o.errors for o in outcomes]
    assert [c.kind if c else None for c in constraints] == [JSON_SCHEMA, JSON_OBJECT, JSON_SCHEMA, REGEX, CHOICE, None]
    assert constraints[0] == constraints[2]  # the same schema, however it was asked for: one key
    assert json.loads(constraints[0].spec) == PERSON and list(json.loads(constraints[0].spec)) == list(PERSON)
    assert all("response_format" not in o.request.params for o in outcomes if o.request)


def test_the_openai_chat_line_with_a_schema_goes_through(tmp_path: Path) -> None:
    from tests.test_openai_batch import read as read_openai

    [outcome] = read_openai(tmp_path, chat(response_format=schema_format(PERSON)))
    assert outcome.errors == [] and outcome.request is not None
    assert outcome.request.constraint == Constraint(JSON_SCHEMA, json.dumps(PERSON, separators=(",", ":")))


def test_an_openai_line_with_a_bad_schema_names_the_body_field(tmp_path: Path) -> None:
    from tests.test_openai_batch import errors_of as openai_errors

    assert openai_errors(tmp_path, chat(response_format=schema_format({"type": "strin"}))) == [
        "body.response_format.json_schema.schema: cannot be enforced: Invalid type: strin"
    ]


REFUSED = {
    "unknown type": (line(guided_json={"type": "strin"}), "guided_json: cannot be enforced: Invalid type: strin"),
    "unsupported keyword": (line(guided_json={"not": {"type": "string"}}), 'guided_json: cannot be enforced: Unimplemented keys: ["not"]'),
    "unsatisfiable": (
        line(guided_json={"type": "integer", "minimum": 5, "maximum": 1}),
        "guided_json: cannot be enforced: Unsatisfiable schema: minimum (5) is greater than maximum (1)",
    ),
    "dangling ref": (line(guided_json={"$ref": "#/defs/x"}), "guided_json: cannot be enforced: Pointer '/defs/x' does not exist"),
    "schema not an object": (line(guided_json=["a"]), "guided_json: expected an object, got array"),
    "bad regex": (line(guided_regex="a(b"), "guided_regex: cannot be enforced: unclosed group"),
    "lookahead": (line(guided_regex="(?=a)b"), "guided_regex: cannot be enforced: look-around, including look-ahead and look-behind, is not supported"),
    "empty regex": (line(guided_regex=""), "guided_regex: expected a non-empty string, got ''"),
    "empty choices": (line(guided_choice=[]), "guided_choice: must not be empty"),
    "empty choice": (line(guided_choice=["a", ""]), "guided_choice[1]: must not be empty"),
    "choice not a string": (line(guided_choice=["a", 3]), "guided_choice[1]: expected a string, got number"),
    "two at once": (
        line(guided_regex="a", guided_choice=["a"]),
        "guided_choice: give at most one of response_format, guided_json, guided_regex, guided_choice, got guided_regex and guided_choice",
    ),
    "unknown format type": (line(response_format={"type": "json"}), "response_format.type: must be one of text, json_object, json_schema, got 'json'"),
    "no schema": (line(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "response_format.json_schema.schema: expected an object (a JSON schema), got nothing"),
    "strict not a boolean": (line(response_format=schema_format(PERSON, strict="yes")), "response_format.json_schema.strict: expected a boolean, got string"),
    "json_object with a schema": (
        line(response_format={"type": "json_object", "json_schema": {"schema": PERSON}}),
        "response_format: unknown field 'json_schema' for type 'json_object'",
    ),
    "with min_tokens": (
        line(guided_choice=["a"], min_tokens=3),
        "min_tokens: cannot be combined with structured output (a constrained answer ends when its grammar is "
        "complete), got min_tokens=3",
    ),
    "with ignore_eos": (
        line(guided_regex="[0-9]+", ignore_eos=True),
        "ignore_eos: cannot be combined with structured output (a constrained answer ends when its grammar is "
        "complete), got ignore_eos=true",
    ),
    "with beam search": (
        line(guided_choice=["a"], num_beams=2, temperature=0),
        "num_beams: beam search cannot be combined with structured output, got num_beams=2",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_malformed_constraint_is_refused_with_its_reason(tmp_path: Path, case: str) -> None:
    bad, reason = REFUSED[case]
    assert errors_of(tmp_path, bad) == [reason]


@pytest.mark.parametrize("case", ["bad regex", "empty choices", "unsupported keyword", "no schema"])
def test_submit_refuses_the_line_and_stores_and_enqueues_nothing(case: str, sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [GOOD, REFUSED[case][0], GOOD])
    code, output = submit(sqlite_url, broker_url, str(path))
    assert code != 0
    assert f"in.jsonl:2: {REFUSED[case][1]}" in output and "in.jsonl:1:" not in output
    assert "Traceback" not in output
    assert counts(sqlite_url) == (0, 0, 0)
    assert redis.Redis.from_url(broker_url).llen(queue_name(TINY)) == 0


def test_a_repeated_schema_is_checked_once() -> None:
    from contract import structured

    structured._problem.cache_clear()
    fields = {"guided_json": {"type": "object", "properties": {"x": {"type": "integer"}}}}
    for _ in range(100):
        assert constraint_of(fields)[1] == []
    assert structured._problem.cache_info().misses == 1
