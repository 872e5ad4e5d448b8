"""OpenAI Batch files: the input is translated into native lines and validated, the output has OpenAI's shapes.

The translation tests are fast (no services). The round trip at the end runs a real job: a real `producer
submit` process, real Redis, a real worker process on the tiny model, and `producer results --format openai`.
"""
from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types import Completion
from openai.types import completion_create_params as completions_params
from openai.types.chat import ChatCompletion
from openai.types.chat import completion_create_params as chat_params
from sqlalchemy import create_engine
from sqlalchemy import text as sql

from producer.openai_batch import BODY_FIELDS, CHAT, COMPLETIONS, VLLM_FIELDS
from producer.reader import LineOutcome, read_requests
from tests.helpers import TINY, accepted_and_peak, env_for, producer, submit_and_complete, write_jsonl

CONTEXT = 2048


def chat(custom_id: str | None = "c1", **body: Any) -> dict[str, Any]:
    line: dict[str, Any] = {"method": "POST", "url": CHAT,
                            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}], **body}}
    if custom_id is not None:
        line["custom_id"] = custom_id
    return line


def completion(custom_id: str = "p1", **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": COMPLETIONS,
            "body": {"model": "gpt-3.5-turbo-instruct", "prompt": "Once", **body}}


def read(tmp_path: Path, *lines: dict[str, Any] | str, defaults: dict[str, Any] | None = None) -> list[LineOutcome]:
    path = tmp_path / "batch.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return list(read_requests(path, defaults or {}, CONTEXT))


def errors_of(tmp_path: Path, line: dict[str, Any]) -> list[str]:
    [outcome] = read(tmp_path, line)
    assert outcome.request is None, outcome.request
    return outcome.errors


# --- accepted lines -----------------------------------------------------------------------------


def test_chat_line_is_translated(tmp_path: Path) -> None:
    [outcome] = read(tmp_path, chat(
        "q1",
        messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Why?"}],
        max_completion_tokens=7, temperature=0.7, top_p=0.9, n=3, stop="\n", seed=5,
        frequency_penalty=0.5, presence_penalty=-0.5, logprobs=True, top_logprobs=4,
        user="u-1", metadata={"team": "a"}, stream=False, store=False, tools=[], response_format={"type": "text"},
    ))
    request = outcome.request
    assert outcome.errors == [] and request is not None
    assert request.custom_id == "q1" and request.prompt is None
    assert request.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Why?"}]
    assert request.params == {"max_new_tokens": 7, "temperature": 0.7, "top_p": 0.9, "n": 3, "stop": ["\n"], "seed": 5,
                              "frequency_penalty": 0.5, "presence_penalty": -0.5, "logprobs": True, "top_logprobs": 4}
    assert request.metadata == {"url": CHAT, "model": "gpt-4o-mini", "user": "u-1", "metadata": {"team": "a"}}


def test_completions_line_and_its_integer_logprobs(tmp_path: Path) -> None:
    [outcome] = read(tmp_path, completion(max_tokens=9, logprobs=3, stop=[".", "!"], n=2, best_of=2, echo=False))
    request = outcome.request
    assert outcome.errors == [] and request is not None
    assert request.prompt == "Once" and request.messages is None
    assert request.params == {"max_new_tokens": 9, "logprobs": True, "top_logprobs": 3, "stop": [".", "!"], "n": 2}
    assert request.metadata == {"url": COMPLETIONS, "model": "gpt-3.5-turbo-instruct"}
    [zero] = read(tmp_path, completion(logprobs=0))
    assert zero.request is not None and zero.request.params == {"logprobs": True, "top_logprobs": 0}


def test_text_content_parts_are_joined(tmp_path: Path) -> None:
    parts = [{"type": "text", "text": "Look:"}, {"type": "text", "text": "a cat"}]
    [outcome] = read(tmp_path, chat(messages=[{"role": "system", "content": [{"type": "text", "text": "Brief."}]},
                                              {"role": "user", "content": parts}]))
    assert outcome.request is not None
    assert outcome.request.messages == [{"role": "system", "content": "Brief."}, {"role": "user", "content": "Look:\na cat"}]


def test_models_may_differ_between_lines(tmp_path: Path) -> None:
    outcomes = read(tmp_path, chat("a", model="gpt-4o"), chat("b", model="gpt-4o-mini"))
    assert [o.request.metadata["model"] for o in outcomes if o.request] == ["gpt-4o", "gpt-4o-mini"]


def test_job_defaults_apply_and_errors_name_the_openai_field(tmp_path: Path) -> None:
    [outcome] = read(tmp_path, chat(), defaults={"temperature": 0.2, "max_new_tokens": 5})
    assert outcome.request is not None and outcome.request.params == {}
    assert errors_of(tmp_path, chat(max_tokens=CONTEXT + 1)) == [f"body.max_tokens: must be <= {CONTEXT} (the model's context), got {CONTEXT + 1}"]


# --- rejected lines ------------------------------------------------------------------------------

REFUSED_CHAT = {
    "tools": [{"type": "function", "function": {"name": "f"}}],
    "tool_choice": "auto",
    "parallel_tool_calls": True,
    "functions": [{"name": "f"}],
    "function_call": "auto",
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
    "prediction": {"type": "content", "content": "x"},
    "reasoning_effort": "low",
    "verbosity": "low",
    "web_search_options": {},
    "moderation": {"model": "omni-moderation-latest"},
    "stream": True,
    "stream_options": {"include_usage": True},
    "store": True,
    "service_tier": "flex",
}
REFUSED_COMPLETIONS = {"echo": True, "suffix": "end", "best_of": 3, "stream": True,
                       "stream_options": {"include_usage": True}}


@pytest.mark.parametrize(("name", "value"), REFUSED_CHAT.items())
def test_every_refused_chat_field_is_an_error_naming_it(tmp_path: Path, name: str, value: Any) -> None:
    [error] = errors_of(tmp_path, chat(**{name: value}))
    assert error.startswith(f"body.{name}: not supported (") and error.endswith("; remove it")


@pytest.mark.parametrize(("name", "value"), REFUSED_COMPLETIONS.items())
def test_every_refused_completions_field_is_an_error_naming_it(tmp_path: Path, name: str, value: Any) -> None:
    [error] = errors_of(tmp_path, completion(**{name: value}))
    assert error.startswith(f"body.{name}: not supported (") and error.endswith("; remove it")


def test_refused_fields_are_accepted_only_when_off(tmp_path: Path) -> None:
    off = {"tools": [], "tool_choice": "none", "functions": [], "function_call": "none", "modalities": ["text"],
           "response_format": {"type": "text"}, "logit_bias": {}, "stream": False, "store": False, "service_tier": "default",
           "audio": None, "parallel_tool_calls": None}
    [outcome] = read(tmp_path, chat(**off))
    assert outcome.errors == []
    # a boolean is not a number: stream 0 is not "false"
    assert errors_of(tmp_path, chat(stream=0)) == ["body.stream: not supported (streaming (a batch is never streamed)), got 0; remove it"]


def test_the_field_lists_cover_the_openai_api(tmp_path: Path) -> None:
    """Every body field of the SDK's request types is honoured, kept or refused, never unknown; nothing else is known."""
    chat_sdk, completions_sdk = (set(typing.get_type_hints(p.CompletionCreateParamsBase)) for p in (chat_params, completions_params))
    assert set(BODY_FIELDS[CHAT]) == chat_sdk | {"stream", *VLLM_FIELDS[CHAT]}
    assert set(BODY_FIELDS[COMPLETIONS]) == completions_sdk | {"stream", *VLLM_FIELDS[COMPLETIONS]}


def test_unknown_fields(tmp_path: Path) -> None:
    assert errors_of(tmp_path, chat(temprature=1)) == ["body: unknown field 'temprature' (did you mean 'temperature'?)"]
    assert errors_of(tmp_path, completion(messages=[])) == [
        f"body: unknown field 'messages' for {COMPLETIONS} (it is a field of {CHAT})"]
    assert errors_of(tmp_path, completion(max_completion_tokens=3)) == [
        f"body: unknown field 'max_completion_tokens' for {COMPLETIONS} (it is a field of {CHAT})"]
    assert errors_of(tmp_path, {**chat(), "headers": {}}) == ["unknown field 'headers'"]


def test_bad_url_and_method(tmp_path: Path) -> None:
    assert errors_of(tmp_path, {**chat(), "url": "/v1/embeddings"}) == [
        f"url: must be {CHAT} or {COMPLETIONS}, got '/v1/embeddings'"]
    assert errors_of(tmp_path, {**chat(), "method": "GET"}) == ["method: must be POST, got 'GET'"]
    line = chat()
    del line["method"], line["url"]
    assert errors_of(tmp_path, line) == ["method: is required (POST)", f"url: is required ({CHAT} or {COMPLETIONS})"]
    assert errors_of(tmp_path, {**chat(), "body": [1]}) == ["body: expected an object, got array"]


def test_custom_id_and_model_are_required(tmp_path: Path) -> None:
    assert errors_of(tmp_path, chat(custom_id=None)) == ["custom_id: is required (every line of an OpenAI Batch file needs one)"]
    line = chat()
    del line["body"]["model"]
    assert errors_of(tmp_path, line) == ["body.model: is required"]
    assert errors_of(tmp_path, chat(custom_id="")) == ["custom_id: must not be empty"]


def test_content_parts_other_than_text_are_refused_by_type(tmp_path: Path) -> None:
    parts = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "https://x/cat.png"}},
             {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]
    assert errors_of(tmp_path, chat(messages=[{"role": "user", "content": parts}])) == [
        "body.messages[0].content[1]: content parts of type 'image_url' are not supported (only 'text')",
        "body.messages[0].content[2]: content parts of type 'input_audio' are not supported (only 'text')",
    ]
    assert errors_of(tmp_path, chat(messages=[{"role": "user", "content": [{"type": "text", "text": 3}]}])) == [
        "body.messages[0].content[0].text: expected a string, got number"]
    assert errors_of(tmp_path, chat(messages=[{"role": "user", "content": []}])) == ["body.messages[0].content: must not be empty"]


def test_messages_that_need_tools_or_names_are_refused(tmp_path: Path) -> None:
    messages = [
        {"role": "user", "content": "Hi", "name": "bob"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]},
        {"role": "tool", "content": "42", "tool_call_id": "1"},
        {"role": "robot", "content": "x"},
    ]
    assert errors_of(tmp_path, chat(messages=messages)) == [
        "body.messages[0].name: not supported (participant names), got 'bob'; remove it",
        "body.messages[1].tool_calls: not supported (tool calling), got array; remove it",
        "body.messages[2].role: 'tool' is not supported (tool results)",
        "body.messages[2].tool_call_id: not supported (tool calling), got '1'; remove it",
        "body.messages[3].role: must be one of system, developer, user, assistant, got 'robot'",
        "body.messages[1].content: expected a string, got null",
    ]


def test_completions_prompt_must_be_one_string(tmp_path: Path) -> None:
    assert errors_of(tmp_path, completion(prompt=["a", "b"])) == [
        "body.prompt: a list of prompts (or of token ids) is not supported, got an array of 2; write one line per prompt"]
    assert errors_of(tmp_path, completion(prompt=None)) == [f"body.prompt: is required for {COMPLETIONS}"]
    assert errors_of(tmp_path, completion(prompt="")) == ["body.prompt: must not be empty"]
    assert errors_of(tmp_path, chat(messages=None)) == [f"body.messages: is required for {CHAT}"]


def test_logprobs_follow_each_endpoint(tmp_path: Path) -> None:
    assert errors_of(tmp_path, completion(logprobs=True)) == [
        f"body.logprobs: expected an integer (the number of top tokens, 0-5) for {COMPLETIONS}, got boolean"]
    assert errors_of(tmp_path, completion(logprobs=6)) == ["body.logprobs: must be in [0, 5], got 6"]
    assert errors_of(tmp_path, chat(logprobs=3)) == ["body.logprobs: expected a boolean, got number 3"]
    assert errors_of(tmp_path, chat(logprobs=True, top_logprobs=21)) == ["body.top_logprobs: must be in [0, 20], got 21"]
    assert errors_of(tmp_path, chat(top_logprobs=2)) == [
        "body.top_logprobs: needs logprobs set to true, got top_logprobs=2, logprobs not given"]


def test_native_rules_apply_with_openai_names(tmp_path: Path) -> None:
    assert errors_of(tmp_path, chat(max_tokens=0, temperature=-1, frequency_penalty=2.5, stop=[""], n=0)) == [
        "body.max_tokens: must be >= 1, got 0",
        "body.temperature: must be >= 0, got -1",
        "body.n: must be in [1, 128], got 0",
        "body.stop[0]: must not be empty",
        "body.frequency_penalty: must be in [-2, 2], got 2.5",
    ]
    assert errors_of(tmp_path, chat(max_tokens=3, max_completion_tokens=4)) == [
        "body: give one of max_tokens and max_completion_tokens, not both"]


def test_mixed_formats_are_an_error_on_the_lines_that_differ(tmp_path: Path) -> None:
    outcomes = read(tmp_path, "not json", chat("a"), {"prompt": "native"}, completion("b"), {"custom_id": "n2", "prompt": "x"})
    assert [o.line_no for o in outcomes if o.ok] == [2, 4]
    assert outcomes[2].errors == ["this is a native line but line 2 is an OpenAI Batch line: a file must hold one format"]
    assert outcomes[4].errors == ["this is a native line but line 2 is an OpenAI Batch line: a file must hold one format"]
    native_first = read(tmp_path, {"prompt": "native"}, chat("a"))
    assert native_first[1].errors == ["this is an OpenAI Batch line but line 1 is a native line: a file must hold one format"]


def test_duplicate_custom_ids_across_endpoints(tmp_path: Path) -> None:
    outcomes = read(tmp_path, chat("same"), completion("same"))
    assert outcomes[1].errors == ["duplicate custom_id 'same' (first on line 1)"]


def test_native_lines_take_the_new_sampling_fields(tmp_path: Path) -> None:
    path = tmp_path / "native.jsonl"
    path.write_text(json.dumps({"prompt": "x", "frequency_penalty": 1, "presence_penalty": -2, "logprobs": True, "top_logprobs": 0}) + "\n"
                    + json.dumps({"prompt": "y", "presence_penalty": 2.01, "logprobs": 1}) + "\n"
                    + json.dumps({"prompt": "z", "num_beams": 2, "logprobs": True, "frequency_penalty": 0.5}) + "\n")
    first, second, third = read_requests(path, {}, CONTEXT)
    assert first.request is not None
    assert first.request.params == {"frequency_penalty": 1.0, "presence_penalty": -2.0, "logprobs": True, "top_logprobs": 0}
    assert second.errors == ["presence_penalty: must be in [-2, 2], got 2.01", "logprobs: expected a boolean, got number 1"]
    assert third.errors == ["num_beams: beam search cannot be combined with frequency_penalty, logprobs, got num_beams=2"]


# --- round trip through a real job ---------------------------------------------------------------

LONG_PROMPT = "hello " * 2100
"""More tokens than the tiny model's context of 2048: fails at the worker (the producer does not tokenize)."""

ROUND_TRIP = [
    chat("chat-n2-stop", messages=[{"role": "user", "content": "Count: 1, 2, 3,"}], n=2, stop=[",", "\n"], seed=3, max_tokens=12),
    chat("chat-parts-logprobs", messages=[{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                                          {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
         temperature=0, max_completion_tokens=6, logprobs=True, top_logprobs=2),
    completion("cmpl-n3-stop", prompt="Once upon a time", n=3, stop=".", seed=11, max_tokens=10, logprobs=2),
    completion("cmpl-greedy", prompt="The sea is", temperature=0, max_tokens=16),
    completion("cmpl-greedy-penalised", prompt="The sea is", temperature=0, max_tokens=16,
               frequency_penalty=2.0, presence_penalty=2.0),
    completion("too-long", prompt=LONG_PROMPT, max_tokens=10),
]


@pytest.mark.slow
def test_openai_batch_round_trip(sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    env = env_for(sqlite_url, broker_url)
    source = write_jsonl(tmp_path / "batch_input.jsonl", ROUND_TRIP)
    job_id = submit_and_complete(source, env, sqlite_url)
    exported = producer(["results", str(job_id), "--format", "openai"], env, check=True)
    lines = [json.loads(x) for x in exported.stdout.splitlines()]
    by_id = {line["custom_id"]: line for line in lines}
    assert [line["custom_id"] for line in lines] == [x["custom_id"] for x in ROUND_TRIP]  # input order, ids as given
    assert len({line["id"] for line in lines}) == len(lines)

    for sent in ROUND_TRIP:
        if sent["custom_id"] == "too-long":
            continue
        line = by_id[sent["custom_id"]]
        assert set(line) == {"id", "custom_id", "response", "error"} and line["error"] is None
        response = line["response"]
        assert response["status_code"] == 200 and response["request_id"]
        body = response["body"]
        is_chat = sent["url"] == CHAT
        # the official SDK's response types parse it (required fields, literals, types)
        (ChatCompletion if is_chat else Completion).model_validate(body)
        assert body["object"] == ("chat.completion" if is_chat else "text_completion")
        assert body["model"] == TINY and isinstance(body["created"], int)
        n = sent["body"].get("n", 1)
        assert [c["index"] for c in body["choices"]] == list(range(n))
        for choice in body["choices"]:
            assert choice["finish_reason"] in ("stop", "length")
            text = choice["message"]["content"] if is_chat else choice["text"]
            if is_chat:
                assert choice["message"]["role"] == "assistant"
            assert isinstance(text, str)
            for stop in _stops(sent):
                assert stop not in text
            if "logprobs" not in sent["body"]:
                assert choice["logprobs"] is None
        usage = body["usage"]
        assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] >= 0
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    failed = by_id["too-long"]
    assert failed["error"] is None and failed["response"]["status_code"] == 400
    error = failed["response"]["body"]["error"]
    assert error["type"] == "invalid_request_error" and "context" in error["message"]

    # usage sums each request's samples (from the store's own rows)
    engine = create_engine(sqlite_url)
    with engine.connect() as c:
        sums = dict(c.execute(sql(
            "SELECT q.custom_id, sum(r.completion_tokens) FROM results r JOIN requests q ON q.id = r.request_id "
            "WHERE r.job_id = :j GROUP BY q.custom_id"), {"j": job_id}).all())
    engine.dispose()
    for custom_id, total in sums.items():
        assert by_id[custom_id]["response"]["body"]["usage"]["completion_tokens"] == total

    # --- these need the engine part (logprobs computed, penalties applied): every missing piece is listed at once ---
    gaps = _engine_gaps(by_id)
    assert not gaps, "missing engine support:\n" + "\n".join(gaps)


def _engine_gaps(by_id: dict[str, dict[str, Any]]) -> list[str]:
    """What the output lacks that only the engine provides: logprobs in both shapes, penalties that change the text."""
    gaps = []
    choice = by_id["chat-parts-logprobs"]["response"]["body"]["choices"][0]
    content = (choice["logprobs"] or {}).get("content")
    if not content:
        gaps.append(f"chat logprobs asked for (top_logprobs=2) but not returned: {choice['logprobs']!r}")
    else:
        for entry in content:
            assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"} and entry["logprob"] <= 0
            assert entry["bytes"] == list(entry["token"].encode()) and len(entry["top_logprobs"]) == 2
        assert "".join(e["token"] for e in content) == choice["message"]["content"]
    for choice in by_id["cmpl-n3-stop"]["response"]["body"]["choices"]:
        logprobs = choice["logprobs"]
        if logprobs is None:
            gaps.append(f"completions logprobs asked for (logprobs=2) but not returned for choice {choice['index']}")
            continue
        assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == len(logprobs["text_offset"])
        assert "".join(logprobs["tokens"]).startswith(choice["text"])  # a stop string may end inside the last token
        assert all(len(top) == 2 for top in logprobs["top_logprobs"]) and all(lp <= 0 for lp in logprobs["token_logprobs"])
    plain = by_id["cmpl-greedy"]["response"]["body"]["choices"][0]["text"]
    penalised = by_id["cmpl-greedy-penalised"]["response"]["body"]["choices"][0]["text"]
    if penalised == plain:
        gaps.append(f"frequency_penalty=2 and presence_penalty=2 did not change the greedy text {plain!r}")
    return gaps


def _stops(sent: dict[str, Any]) -> list[str]:
    stop = sent["body"].get("stop") or []
    return [stop] if isinstance(stop, str) else stop


def test_openai_files_are_read_streamed(tmp_path: Path) -> None:
    """Memory stays bounded: well under the file's size (the ids seen so far are the only thing that grows)."""
    path = write_jsonl(tmp_path / "big.jsonl", (
        chat(f"id-{i}", messages=[{"role": "user", "content": [{"type": "text", "text": "padding " * 120}]}], max_tokens=8)
        for i in range(40_000)
    ))
    size = path.stat().st_size
    assert size > 40_000_000
    count, peak = accepted_and_peak(path, CONTEXT)
    assert count == 40_000
    assert peak < 15_000_000, f"peak {peak / 1e6:.0f} MB for a {size / 1e6:.0f} MB file"


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["type", "text", "role", "content", "x"]), inner, max_size=3),
    max_leaves=8,
)
_keys = st.sampled_from(sorted(set(BODY_FIELDS[CHAT]) | set(BODY_FIELDS[COMPLETIONS]) | {"bogus"}))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(url=st.sampled_from([CHAT, COMPLETIONS, "/v1/x"]), body=st.dictionaries(_keys, _json, max_size=5),
       messages=st.lists(st.dictionaries(st.sampled_from(["role", "content", "name", "tool_calls"]), _json), max_size=3))
def test_any_openai_line_gives_a_request_or_errors(tmp_path: Path, url: str, body: dict[str, Any], messages: list[Any]) -> None:
    line = {"custom_id": "x", "method": "POST", "url": url, "body": {"model": "m", "messages": messages, "prompt": "p", **body}}
    [outcome] = read(tmp_path, line)
    assert (outcome.request is not None) != bool(outcome.errors)
    assert all(isinstance(e, str) and e and "\n" not in e for e in outcome.errors)


def test_submit_help_says_openai_batch_files_are_taken_as_they_are() -> None:
    from click.testing import CliRunner

    from producer.cli import main

    help_text = CliRunner().invoke(main, ["submit", "--help"]).output
    assert "OpenAI Batch API input file" in help_text and "--format openai" in help_text
