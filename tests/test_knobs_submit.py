"""The new knobs at submit: each bad value refused with its line and reason, OpenAI (and vLLM) lines translated,
and the job's system prompt put first in each chat request that has none."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, text

from producer.cli import main
from producer.reader import read_requests
from tests.helpers import TINY, write_jsonl

PROMPT = {"prompt": "hello"}
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def outcomes(tmp_path: Path, *lines: dict[str, Any], defaults: dict[str, Any] | None = None) -> list[Any]:
    return list(read_requests(write_jsonl(tmp_path / "in.jsonl", lines), defaults or {}, 2048))


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"min_p": 1.5}, "min_p: must be in [0, 1] (0 turns min-p off), got 1.5"),
        ({"min_p": -0.1}, "min_p: must be in [0, 1] (0 turns min-p off), got -0.1"),
        ({"min_p": True}, "min_p: expected a number, got boolean"),
        ({"min_tokens": -1}, "min_tokens: must be >= 0, got -1"),
        ({"min_tokens": 1.5}, "min_tokens: expected an integer, got number 1.5"),
        ({"min_tokens": 20, "max_new_tokens": 10}, "min_tokens: must be <= max_new_tokens, got min_tokens=20, max_new_tokens=10"),
        ({"min_tokens": 300}, "min_tokens: must be <= max_new_tokens, got min_tokens=300, max_new_tokens 256 (default)"),
        ({"stop_token_ids": [-1]}, "stop_token_ids[0]: must be a token id in [0, 2**31), got -1"),
        ({"stop_token_ids": 7}, "stop_token_ids: expected an array, got number 7"),
        ({"stop_token_ids": ["7"]}, "stop_token_ids[0]: expected an integer, got string '7'"),
        ({"stop_token_ids": list(range(65))}, "stop_token_ids: must hold at most 64 token ids, got 65"),
        ({"ignore_eos": 1}, "ignore_eos: expected a boolean, got number 1"),
        ({"logit_bias": [1]}, "logit_bias: expected an object, got array"),
        ({"logit_bias": {"abc": 1}}, "logit_bias: expected a token id (an integer key), got string (key 'abc')"),
        ({"logit_bias": {"-3": 1}}, "logit_bias: expected a token id (an integer key), got string (key '-3')"),
        ({"logit_bias": {"5": 101}}, "logit_bias['5']: must be in [-100, 100], got 101"),
        ({"logit_bias": {"5": "1"}}, "logit_bias['5']: expected a number, got string"),
        ({"logit_bias": {"5": True}}, "logit_bias['5']: expected a number, got boolean"),
        ({"logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias: must hold at most 1024 entries, got 1025"),
        ({"chat_template_kwargs": {"enable_thinking": False}}, "chat_template_kwargs: needs messages"),
        ({"num_beams": 2, "temperature": 0, "min_p": 0.1}, "num_beams: beam search cannot be combined with min_p"),
        ({"num_beams": 2, "temperature": 0, "ignore_eos": True}, "num_beams: beam search cannot be combined with ignore_eos"),
    ],
)
def test_a_bad_knob_is_refused_with_its_line_and_reason(tmp_path: Path, fields: dict[str, Any], error: str) -> None:
    good, bad = outcomes(tmp_path, PROMPT, {**PROMPT, **fields})
    assert good.request is not None and bad.request is None and bad.line_no == 2
    assert any(e.startswith(error) for e in bad.errors), bad.errors


def test_chat_template_kwargs_may_not_set_what_the_engine_sets(tmp_path: Path) -> None:
    [bad] = outcomes(tmp_path, {**CHAT, "chat_template_kwargs": {"add_generation_prompt": False}})
    assert bad.errors == ["chat_template_kwargs: 'add_generation_prompt' is set by the engine, not by a request"]


def test_good_knobs_are_stored_as_given(tmp_path: Path) -> None:
    knobs = {"min_p": 0.05, "min_tokens": 3, "stop_token_ids": [2, 7], "ignore_eos": True, "logit_bias": {"13": -100, "7": 2.5},
             "chat_template_kwargs": {"enable_thinking": False}}
    [ok] = outcomes(tmp_path, {**CHAT, **knobs})
    assert ok.request is not None and ok.request.params == knobs


def test_openai_and_vllm_body_fields_become_the_native_knobs(tmp_path: Path) -> None:
    body = {"model": "m", "messages": CHAT["messages"], "logit_bias": {"50256": -100}, "min_p": 0.1, "min_tokens": 2,
            "stop_token_ids": [5], "ignore_eos": False, "chat_template_kwargs": {"enable_thinking": True}}
    chat = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body}
    completion = {"custom_id": "b", "method": "POST", "url": "/v1/completions",
                  "body": {"model": "m", "prompt": "x", "logit_bias": {"1": 5}, "min_p": 0.2}}
    first, second = outcomes(tmp_path, chat, completion)
    assert first.request is not None and first.request.params == {k: v for k, v in body.items() if k not in ("model", "messages")}
    assert second.request is not None and second.request.params == {"logit_bias": {"1": 5}, "min_p": 0.2}
    bad = dict(chat, body=dict(body, logit_bias={"50256": -200}))
    completion_kwargs = dict(completion, body=dict(completion["body"], chat_template_kwargs={"x": 1}))
    one, two = outcomes(tmp_path, bad, completion_kwargs)
    assert one.errors == ["body.logit_bias['50256']: must be in [-100, 100], got -200"]
    assert any("chat_template_kwargs" in e and "unknown field" in e for e in two.errors), two.errors


def test_the_system_prompt_goes_first_in_chat_requests_without_one(tmp_path: Path) -> None:
    own = {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}]}
    chat, mine, plain = outcomes(tmp_path, CHAT, own, PROMPT, defaults={"system_prompt": "You are a pirate."})
    assert chat.request.messages == [{"role": "system", "content": "You are a pirate."}, *CHAT["messages"]]
    assert mine.request.messages == own["messages"]
    assert plain.request.prompt == "hello" and plain.request.messages is None


def test_submit_system_prompt_is_stored_with_the_requests(sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [CHAT, PROMPT])
    args = ["submit", str(path), "--model", TINY, "--database-url", sqlite_url, "--broker-url", broker_url]
    refused = CliRunner().invoke(main, [*args, "--system-prompt", ""], catch_exceptions=False)
    assert refused.exit_code == 1 and "--system-prompt: must not be empty" in refused.output
    result = CliRunner().invoke(main, [*args, "--system-prompt", "Answer in French."], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    with create_engine(sqlite_url).connect() as c:
        rows = c.execute(text("SELECT prompt, messages FROM requests ORDER BY id")).all()
        defaults = c.execute(text("SELECT defaults FROM jobs")).scalar_one()
    messages = json.loads(rows[0][1]) if isinstance(rows[0][1], str) else rows[0][1]
    assert messages[0] == {"role": "system", "content": "Answer in French."}
    assert rows[1][0] == "hello" and rows[1][1] in (None, "null")
    assert (json.loads(defaults) if isinstance(defaults, str) else defaults) == {"system_prompt": "Answer in French."}
