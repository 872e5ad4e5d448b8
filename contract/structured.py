"""Structured output: what a request may constrain its text to, read from its fields, and the one check of it.

A request asks for at most one of
- `response_format`: OpenAI's `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}` or
  `{"type": "json_object"}` (`{"type": "text"}` asks for nothing);
- `guided_json` (a JSON schema), `guided_regex` (a regular expression the whole text matches) or `guided_choice`
  (a list of strings, the text is one of them): vLLM's names.

Each becomes a Constraint: its kind and its spec as text, named by a hash (`key`) under which a job stores it once
and a worker caches its compiled grammar. The grammar engine is llguidance (docs/benchmarks.md: why): the producer
checks a constraint with it, without a tokenizer and without torch, and the worker enforces the same grammar while
decoding (workers.grammar). llguidance is imported only when a constraint is checked or compiled.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from contract.sampling import json_type, show

JSON_SCHEMA, JSON_OBJECT, REGEX, CHOICE = "json_schema", "json_object", "regex", "choice"
KINDS = (JSON_SCHEMA, JSON_OBJECT, REGEX, CHOICE)
FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice")
"""The request fields that ask for structured output (at most one per request)."""
MAX_SPEC_CHARS = 200_000
"""The longest schema (as compact JSON), regex or choice list a request may give."""
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""JSON is written on one line with one space after ',' and ':': a small model given free whitespace can loop on
newlines until max_tokens."""
_RESPONSE_TYPES = ("text", JSON_OBJECT, JSON_SCHEMA)
_JSON_SCHEMA_KEYS = ("name", "schema", "strict", "description")
_ANY_OBJECT = '{"type":"object"}'


@dataclass(frozen=True)
class Constraint:
    """What a request's text must match: kind (one of KINDS) and spec (the schema as compact JSON, in the order the
    user wrote it; the regex; the choices as a JSON array)."""

    kind: str
    spec: str

    @property
    def key(self) -> str:
        """The constraint's name in the store and in a worker's grammar cache."""
        return hashlib.sha256(f"{self.kind}\n{self.spec}".encode()).hexdigest()

    def grammar(self) -> str:
        """The llguidance grammar that enforces it."""
        from llguidance import LLMatcher

        if self.kind in (JSON_SCHEMA, JSON_OBJECT):
            return LLMatcher.grammar_from_json_schema(self.spec, defaults=JSON_OPTIONS)  # type: ignore[arg-type]
        if self.kind == REGEX:
            return LLMatcher.grammar_from_regex(self.spec)
        choices = json.loads(self.spec)
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(choice) for choice in choices))

    def problem(self) -> str | None:
        """Why the grammar engine cannot enforce it (one line), or None."""
        if self.kind not in KINDS:
            return f"unknown kind {self.kind!r}"
        return _problem(self.kind, self.spec)


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@lru_cache(maxsize=256)
def _problem(kind: str, spec: str) -> str | None:
    """Checked once per distinct constraint: a job of a million lines with one schema compiles it once."""
    from llguidance import LLMatcher

    failed, messages = LLMatcher.validate_grammar_with_warnings(Constraint(kind, spec).grammar())
    return _one_line(messages[0]) if failed else None


def _one_line(message: str) -> str:
    """llguidance's message without its multi-line source excerpt: a regex error keeps its `error:` line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    detail = next((line[len("error:") :].strip() for line in lines if line.startswith("error:")), None)
    text = detail if detail is not None else " ".join(lines)
    text = re.sub(r"\s+", " ", text)
    return text if len(text) <= 200 else text[:200] + "..."


def constraint_of(fields: dict[str, Any]) -> tuple[Constraint | None, list[str]]:
    """The constraint a request's fields (FIELDS; None: not given) ask for, or the `field: reason` errors: a wrong
    shape, more than one asked for, or one the grammar engine cannot compile."""
    given = [name for name in FIELDS if fields.get(name) is not None and not _is_text(name, fields[name])]
    if len(given) > 1:
        return None, [f"{given[1]}: give at most one of {', '.join(FIELDS)}, got {' and '.join(given)}"]
    if not given:
        return None, []
    name = given[0]
    constraint, where, error = _read(name, fields[name])
    if constraint is not None and error is None:
        if len(constraint.spec) > MAX_SPEC_CHARS:
            error = f"must be at most {MAX_SPEC_CHARS} characters as JSON, got {len(constraint.spec)}"
        else:
            problem = constraint.problem()
            error = None if problem is None else f"cannot be enforced: {problem}"
    if error is not None:
        return None, [f"{where}: {error}"]
    return constraint, []


def _is_text(name: str, value: Any) -> bool:
    """response_format {"type": "text"}: the default, nothing asked for."""
    return name == "response_format" and isinstance(value, dict) and value == {"type": "text"}


def _read(name: str, value: Any) -> tuple[Constraint | None, str, str | None]:
    """(the constraint, where an error points, the error)."""
    if name == "guided_regex":
        if not isinstance(value, str) or not value:
            return None, name, f"expected a non-empty string, got {show(value) if isinstance(value, str) else json_type(value)}"
        return Constraint(REGEX, value), name, None
    if name == "guided_choice":
        return _choices(value)
    if name == "guided_json":
        if not isinstance(value, dict):
            return None, name, f"expected an object (a JSON schema), got {json_type(value)}"
        return Constraint(JSON_SCHEMA, compact(value)), name, None
    return _response_format(value)


def _choices(value: Any) -> tuple[Constraint | None, str, str | None]:
    where = "guided_choice"
    if not isinstance(value, list):
        return None, where, f"expected an array of strings, got {json_type(value)}"
    if not value:
        return None, where, "must not be empty"
    for i, choice in enumerate(value):
        if not isinstance(choice, str):
            return None, f"{where}[{i}]", f"expected a string, got {json_type(choice)}"
        if not choice:
            return None, f"{where}[{i}]", "must not be empty"
    return Constraint(CHOICE, compact(value)), where, None


def _response_format(value: Any) -> tuple[Constraint | None, str, str | None]:
    where = "response_format"
    if not isinstance(value, dict):
        return None, where, f"expected an object, got {json_type(value)}"
    kind = value.get("type")
    if kind not in _RESPONSE_TYPES:
        return None, f"{where}.type", f"must be one of {', '.join(_RESPONSE_TYPES)}, got {show(kind) if kind is not None else 'nothing'}"
    allowed = ("type", JSON_SCHEMA) if kind == JSON_SCHEMA else ("type",)
    extra = [key for key in value if key not in allowed]
    if extra:
        return None, where, f"unknown field {show(extra[0])} for type {show(kind)}"
    if kind == JSON_OBJECT:
        return Constraint(JSON_OBJECT, _ANY_OBJECT), where, None
    if kind == "text":
        return None, where, None
    spec = value.get(JSON_SCHEMA)
    where = f"{where}.{JSON_SCHEMA}"
    if not isinstance(spec, dict):
        return None, where, f"expected an object with 'schema', got {json_type(spec)}"
    extra = [key for key in spec if key not in _JSON_SCHEMA_KEYS]
    if extra:
        return None, where, f"unknown field {show(extra[0])} (known: {', '.join(_JSON_SCHEMA_KEYS)})"
    checks = (("name", str, "a string"), ("strict", bool, "a boolean"), ("description", str, "a string"))
    for key, kind_of, expected in checks:
        if spec.get(key) is not None and not isinstance(spec[key], kind_of):
            return None, f"{where}.{key}", f"expected {expected}, got {json_type(spec[key])}"
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        got = "nothing" if schema is None else json_type(schema)
        return None, f"{where}.schema", f"expected an object (a JSON schema), got {got}"
    return Constraint(JSON_SCHEMA, compact(schema)), f"{where}.schema", None
