"""Input validation: producer.schema and producer.reader. Fast: no services, no torch."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producer.reader import EmptyInput, InputFileError, LineOutcome, format_error, read_requests
from producer.schema import JobDefaults, validate_defaults
from tests.helpers import accepted_and_peak, write_jsonl

CONTEXT = 8192


def read(tmp_path: Path, *lines: str | bytes | dict[str, Any], defaults: dict[str, Any] | None = None, **kw: Any) -> list[LineOutcome]:
    """Write the lines (dicts as JSON) to a file and read it back."""
    raw = [json.dumps(x).encode() if isinstance(x, dict) else x if isinstance(x, bytes) else x.encode() for x in lines]
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b"\n".join(raw) + b"\n")
    return list(read_requests(path, defaults or {}, kw.pop("context_length", CONTEXT), **kw))


def errors_of(tmp_path: Path, line: str | bytes | dict[str, Any], **kw: Any) -> list[str]:
    [outcome] = read(tmp_path, line, **kw)
    assert outcome.request is None
    return outcome.errors


def line(**fields: Any) -> dict[str, Any]:
    return {"prompt": "Hello", **fields}


# --- valid lines ---------------------------------------------------------------------------------


def test_valid_raw_line(tmp_path: Path) -> None:
    [outcome] = read(tmp_path, line(custom_id="a", temperature=1, top_p=0.9, stop="###", metadata={"k": [1]}))
    assert outcome.errors == []
    request = outcome.request
    assert request is not None
    assert (request.line_no, request.custom_id, request.prompt, request.messages) == (1, "a", "Hello", None)
    assert request.params == {"temperature": 1.0, "top_p": 0.9, "stop": ["###"]}
    assert request.metadata == {"k": [1]}


def test_valid_chat_line(tmp_path: Path) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]
    [outcome] = read(tmp_path, {"messages": messages, "num_beams": 4, "n": 4, "max_new_tokens": CONTEXT})
    assert outcome.request is not None
    assert outcome.request.prompt is None
    assert outcome.request.messages == messages
    assert outcome.request.params == {"num_beams": 4, "n": 4, "max_new_tokens": CONTEXT}
    assert outcome.request.custom_id == "1"


def test_null_means_not_given(tmp_path: Path) -> None:
    [outcome] = read(tmp_path, {"prompt": "x", "messages": None, "temperature": None, "custom_id": None})
    assert outcome.request is not None
    assert outcome.request.params == {}
    assert outcome.request.custom_id == "1"


def test_line_values_override_defaults_and_params_hold_only_line_values(tmp_path: Path) -> None:
    defaults = {"temperature": 0.7, "max_new_tokens": 64, "top_p": 0.9}
    first, second = read(tmp_path, line(temperature=0.2, seed=5), line(), defaults=defaults)
    assert first.request is not None and second.request is not None
    assert first.request.params == {"temperature": 0.2, "seed": 5}
    assert second.request.params == {}


def test_line_can_switch_off_default_sampling_for_beam_search(tmp_path: Path) -> None:
    [outcome] = read(tmp_path, line(num_beams=4, temperature=0, top_p=1), defaults={"temperature": 0.7, "top_p": 0.9})
    assert outcome.errors == []


def test_beam_search_without_any_temperature_is_greedy(tmp_path: Path) -> None:
    [outcome] = read(tmp_path, line(num_beams=4))
    assert outcome.errors == []


def test_blank_lines_are_skipped_and_line_numbers_are_physical(tmp_path: Path) -> None:
    outcomes = read(tmp_path, "", line(), "   ", "\t", line(top_p=0), b"\r", line())
    assert [(o.line_no, o.ok) for o in outcomes] == [(2, True), (5, False), (7, True)]
    assert [o.request.custom_id for o in outcomes if o.request] == ["2", "7"]


def test_crlf_and_bom_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\r\n{"prompt": "b"}')  # no final newline either
    outcomes = list(read_requests(path, {}, CONTEXT))
    assert [o.request.prompt for o in outcomes if o.request] == ["a", "b"]


# --- bad lines -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ("{", "invalid JSON: Expecting property name enclosed in double quotes at column 2"),
        ("prompt: hi", "invalid JSON: Expecting value at column 1"),
        ('{"prompt": "a"} {}', "invalid JSON: Extra data at column 17"),
        ('{"prompt": "a", "temperature": NaN}', "invalid JSON: NaN is not allowed"),
        ('{"prompt": "a", "temperature": Infinity}', "invalid JSON: Infinity is not allowed"),
        ('{"prompt": "a", "temperature": -Infinity}', "invalid JSON: -Infinity is not allowed"),
        ('{"prompt": "a", "temperature": 1e999}', "invalid JSON: the number 1e999 is out of range"),
        ("[1, 2]", "expected a JSON object, got array"),
        ('"hello"', "expected a JSON object, got string"),
        ("3", "expected a JSON object, got number"),
        ("null", "expected a JSON object, got null"),
        ("[" * 100_000, "invalid JSON: nested too deeply"),
        ('{"prompt": "a\\u0000b"}', "prompt: contains a NUL character (\\u0000)"),
        ('{"prompt": "a", "metadata": {"k": ["\\udc00"]}}', "metadata.k[0]: contains a lone surrogate"),
        ('{"\\n\\u0000": null}', '"\\n\\u0000": the key contains a NUL character'),  # the message stays on one line
    ],
)
def test_undecodable_lines(tmp_path: Path, raw: str, error: str) -> None:
    assert errors_of(tmp_path, raw)[0].startswith(error)


def test_surrogate_pair_escape_is_fine(tmp_path: Path) -> None:
    [outcome] = read(tmp_path, '{"prompt": "\\ud83d\\ude00"}')
    assert outcome.request is not None and outcome.request.prompt == "\U0001f600"


def test_invalid_utf8(tmp_path: Path) -> None:
    assert errors_of(tmp_path, b'{"prompt": "\xff"}') == ["invalid UTF-8 at byte 13"]  # 1-based, like JSON columns


def test_huge_integer(tmp_path: Path) -> None:
    [error] = errors_of(tmp_path, '{"prompt": "a", "seed": ' + "9" * 5000 + "}")
    assert error == "invalid JSON: an integer of 5000 digits is too long (the limit is 1000)"


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"prompt": None}, "exactly one of 'prompt' and 'messages' is required"),
        ({"messages": [{"role": "user", "content": "x"}]}, "exactly one of 'prompt' and 'messages' is required"),
        ({"prompt": 5}, "prompt: expected a string, got number 5"),
        ({"prompt": ""}, "prompt: must not be empty"),
        ({"temprature": 0.5}, "unknown field 'temprature' (did you mean 'temperature'?)"),
        ({"top_p": True}, "top_p: expected a number, got boolean"),
        ({"max_new_tokens": True}, "max_new_tokens: expected an integer, got boolean"),
        ({"temperature": False}, "temperature: expected a number, got boolean"),
        ({"temperature": "0.5"}, "temperature: expected a number, got string '0.5'"),
        ({"max_new_tokens": 3.0}, "max_new_tokens: expected an integer, got number 3.0"),
        ({"n": 2.5}, "n: expected an integer, got number 2.5"),
        ({"seed": "1"}, "seed: expected an integer, got string '1'"),
        ({"temperature": -1}, "temperature: must be >= 0, got -1"),
        ({"temperature": -0.5}, "temperature: must be >= 0, got -0.5"),
        ({"top_p": 0}, "top_p: must be in (0, 1], got 0"),
        ({"top_p": 1.5}, "top_p: must be in (0, 1], got 1.5"),
        ({"top_k": -1}, "top_k: must be >= 0 (0 turns top-k off), got -1"),
        ({"repetition_penalty": 0}, "repetition_penalty: must be > 0, got 0"),
        ({"max_new_tokens": 0}, "max_new_tokens: must be >= 1, got 0"),
        ({"max_new_tokens": 10_000}, "max_new_tokens: must be <= 8192 (the model's context), got 10000"),
        ({"n": 0}, "n: must be in [1, 128], got 0"),
        ({"n": 129}, "n: must be in [1, 128], got 129"),
        ({"num_beams": 0}, "num_beams: must be in [1, 64], got 0"),
        ({"num_beams": 65}, "num_beams: must be in [1, 64], got 65"),
        ({"seed": -1}, "seed: must be in [0, 2**63), got -1"),
        ({"seed": 2**63}, f"seed: must be in [0, 2**63), got {2**63}"),
        ({"stop": ["a", ""]}, "stop[1]: must not be empty"),
        ({"stop": ["s"] * 17}, "stop: must hold at most 16 strings, got 17"),
        ({"stop": 5}, "stop: expected a string or an array of strings, got number"),
        ({"stop": [1]}, "stop[0]: expected a string, got number 1"),
        ({"custom_id": ""}, "custom_id: must not be empty"),
        ({"custom_id": 7}, "custom_id: expected a string, got number 7"),
        ({"custom_id": "x" * 513}, "custom_id: must be at most 512 characters, got 513"),
        ({"metadata": [1]}, "metadata: expected an object, got array"),
        ({"n": 5, "num_beams": 4}, "n: must be <= num_beams for beam search, got n=5, num_beams=4"),
        (
            {"num_beams": 4, "temperature": 0.7},
            "num_beams: beam search cannot be combined with sampling, got num_beams=4, temperature=0.7 "
            "(set temperature to 0, or num_beams to 1)",
        ),
        ({"num_beams": 2, "top_p": 0.9}, "num_beams: beam search cannot be combined with sampling, got num_beams=2, top_p=0.9"),
        ({"num_beams": 2, "top_k": 50}, "num_beams: beam search cannot be combined with sampling, got num_beams=2, top_k=50"),
    ],
)
def test_bad_fields(tmp_path: Path, fields: dict[str, Any], error: str) -> None:
    errors = errors_of(tmp_path, line(**fields))
    assert any(e.startswith(error) for e in errors), errors


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([], "messages: must not be empty"),
        ("Hi", "messages: expected an array, got string 'Hi'"),
        (["Hi"], "messages[0]: expected an object, got string 'Hi'"),
        ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], "messages[1].role: must be one of system, user, assistant, got 'robot'"),
        ([{"role": "user"}], "messages[0].content: is required"),
        ([{"content": "a"}], "messages[0].role: is required"),
        ([{"role": "user", "content": 5}], "messages[0].content: expected a string, got number 5"),
        ([{"role": "user", "content": "a", "name": "bob"}], "messages[0]: unknown field 'name'"),
    ],
)
def test_bad_messages(tmp_path: Path, messages: Any, error: str) -> None:
    assert error in errors_of(tmp_path, {"messages": messages})


def test_prompt_and_messages_together(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, {"prompt": "a", "messages": [{"role": "user", "content": "b"}]})
    assert errors == ["exactly one of 'prompt' and 'messages' is required"]


def test_missing_input_is_reported_with_other_field_errors(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, {"top_p": 0, "temprature": 1})
    assert errors[0] == "exactly one of 'prompt' and 'messages' is required"
    assert "top_p: must be in (0, 1], got 0" in errors
    assert any(e.startswith("unknown field 'temprature'") for e in errors)


def test_errors_name_the_default_that_conflicts(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, line(num_beams=4), defaults={"temperature": 0.7, "n": 8})
    assert "n: must be <= num_beams for beam search, got n=8 (job default), num_beams=4" in errors
    assert any("temperature=0.7 (job default)" in e for e in errors)


def test_context_length_is_the_one_passed_in(tmp_path: Path) -> None:
    assert errors_of(tmp_path, line(max_new_tokens=4096), context_length=2048) == [
        "max_new_tokens: must be <= 2048 (the model's context), got 4096"
    ]


def test_over_long_line_is_rejected_without_decoding(tmp_path: Path) -> None:
    limit = 1 << 20
    long_line = b"{" + b"x" * limit  # not JSON: the length check must come first
    outcomes = read(tmp_path, line(), long_line, line(prompt="y" * (limit - 20)))
    assert [o.line_no for o in outcomes] == [1, 2, 3]
    assert outcomes[1].errors == [f"line is {limit + 1} bytes, the limit is {limit}"]
    assert outcomes[0].ok and outcomes[2].ok


def test_line_exactly_at_the_limit_is_read(tmp_path: Path) -> None:
    raw = json.dumps(line(prompt="z" * 80)).encode()
    [outcome] = read(tmp_path, raw, max_line_bytes=len(raw))
    assert outcome.ok
    [outcome] = read(tmp_path, raw, max_line_bytes=len(raw) - 1)
    assert outcome.errors == [f"line is {len(raw)} bytes, the limit is {len(raw) - 1}"]


def test_duplicate_custom_ids(tmp_path: Path) -> None:
    outcomes = read(tmp_path, line(custom_id="abc"), line(), line(custom_id="abc"), line(custom_id="2"), line(custom_id="5"), line())
    assert outcomes[2].errors == ["duplicate custom_id 'abc' (first on line 1)"]
    assert outcomes[3].errors == ["duplicate custom_id '2' (first on line 2)"]
    assert [o.ok for o in outcomes] == [True, True, False, False, True, True]


def test_explicit_custom_id_colliding_with_a_later_default(tmp_path: Path) -> None:
    outcomes = read(tmp_path, line(custom_id="3"), line(), line())
    assert outcomes[2].errors == [
        "duplicate custom_id '3' (first on line 1) (this line has no custom_id, so its line number is used)"
    ]


def test_duplicate_is_reported_alongside_other_errors(tmp_path: Path) -> None:
    outcomes = read(tmp_path, line(custom_id="a"), line(custom_id="a", top_p=0))
    assert outcomes[1].errors == ["top_p: must be in (0, 1], got 0", "duplicate custom_id 'a' (first on line 1)"]


def test_invalid_lines_do_not_claim_their_custom_id(tmp_path: Path) -> None:
    # With --skip-invalid the first line is dropped, so the second one must stay acceptable.
    outcomes = read(tmp_path, line(custom_id="a", top_p=0), line(custom_id="a"))
    assert outcomes[1].ok


def test_every_bad_line_is_reported_in_one_pass(tmp_path: Path) -> None:
    outcomes = read(tmp_path, line(), "not json", line(top_p=0), line(), "[]", line(temprature=1), line(custom_id="1"))
    bad = [(o.line_no, o.errors[0]) for o in outcomes if not o.ok]
    assert [n for n, _ in bad] == [2, 3, 5, 6, 7]
    assert format_error("prompts.jsonl", *bad[1]) == "prompts.jsonl:3: top_p: must be in (0, 1], got 0"


# --- the file as a whole -------------------------------------------------------------------------


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b"")
    with pytest.raises(EmptyInput, match=r"prompts.jsonl: the file is empty$"):
        list(read_requests(path, {}, CONTEXT))


def test_file_of_blank_lines_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b"\n  \n\r\n\t\n")
    with pytest.raises(EmptyInput, match="the file is empty"):
        list(read_requests(path, {}, CONTEXT))


def test_unreadable_paths(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match="no such file"):
        next(read_requests(tmp_path / "missing.jsonl", {}, CONTEXT))
    with pytest.raises(InputFileError, match="is a directory"):
        next(read_requests(tmp_path, {}, CONTEXT))


def test_reading_is_streamed(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "big.jsonl", (
        {"prompt": f"Tell me about item {i} " + "padding " * 60, "custom_id": f"id-{i}", "temperature": 0.5} for i in range(200_000)
    ))
    size = path.stat().st_size
    assert size > 100_000_000
    count, peak = accepted_and_peak(path, CONTEXT)
    assert count == 200_000
    assert peak < 60_000_000, f"peak {peak / 1e6:.0f} MB for a {size / 1e6:.0f} MB file"


# --- job defaults --------------------------------------------------------------------------------


def test_valid_defaults() -> None:
    values = {"max_new_tokens": 128, "temperature": 0, "top_p": 0.9, "top_k": None, "seed": 1, "n": 2}
    assert validate_defaults(values, CONTEXT) == []
    assert JobDefaults.model_validate({k: v for k, v in values.items() if v is not None}).to_dict() == {
        "max_new_tokens": 128, "temperature": 0.0, "top_p": 0.9, "seed": 1, "n": 2,
    }


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ({"top_p": 2.0}, "--top-p: must be in (0, 1], got 2"),
        ({"temperature": -1.0}, "--temperature: must be >= 0, got -1"),
        ({"max_new_tokens": 0}, "--max-new-tokens: must be >= 1, got 0"),
        ({"max_new_tokens": 9000}, "--max-new-tokens: must be <= 8192 (the model's context), got 9000"),
        ({"top_k": -5}, "--top-k: must be >= 0 (0 turns top-k off), got -5"),
        ({"seed": -1}, "--seed: must be in [0, 2**63), got -1"),
        ({"n": 500}, "--n: must be in [1, 128], got 500"),
        ({"temperature": float("nan")}, "--temperature: must be a finite number, got nan"),
    ],
)
def test_bad_defaults(values: dict[str, Any], error: str) -> None:
    assert validate_defaults(values, CONTEXT) == [error]


def test_all_bad_defaults_reported() -> None:
    assert len(validate_defaults({"top_p": 0.0, "n": 0, "seed": -2}, CONTEXT)) == 3


# --- properties ----------------------------------------------------------------------------------

VALID = {
    "prompt": "Once upon a time",
    "custom_id": "c1",
    "max_new_tokens": 32,
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": 40,
    "seed": 3,
    "stop": ["\n\n"],
    "n": 2,
    "metadata": {"source": "x"},
}
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
keys = st.sampled_from([*VALID, "messages", "num_beams", "repetition_penalty", "temprature", ""])
mutated_lines = st.builds(
    lambda drop, extra: json.dumps({**{k: v for k, v in VALID.items() if k not in drop}, **extra}),
    st.sets(st.sampled_from(list(VALID))),
    st.dictionaries(keys, json_values, max_size=3),
)
lines = st.binary(max_size=200) | json_values.map(json.dumps) | mutated_lines


def check_file(path: Path, content: bytes) -> None:
    path.write_bytes(content)
    try:
        for outcome in read_requests(path, {"temperature": 0.5}, 2048, max_line_bytes=300):
            assert (outcome.request is not None) != bool(outcome.errors)
            for error in outcome.errors:
                assert isinstance(error, str) and error and "\n" not in error and len(error) < 400
    except EmptyInput:
        assert not content.removeprefix(b"\xef\xbb\xbf").strip()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(lines.map(lambda x: x if isinstance(x, bytes) else x.encode()), max_size=6))
def test_any_input_gives_a_request_or_errors(tmp_path: Path, content: list[bytes]) -> None:
    check_file(tmp_path / "fuzz.jsonl", b"\n".join(content))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_byte_level_mutations_of_a_valid_line(tmp_path: Path, data: st.DataObject) -> None:
    raw = bytearray(json.dumps(VALID).encode())
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    check_file(tmp_path / "fuzz.jsonl", bytes(raw))
