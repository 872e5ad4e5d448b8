"""The OpenAI Batch input format: recognise its lines and translate each into a native line.

A line `{"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body": {...}}`
becomes the native line (producer.schema.PromptLine's fields) that asks for the same generation. The
native rules then validate it, and their errors are renamed to the field the user wrote:
`body.max_tokens: must be >= 1, got 0`. Every body field of the two endpoints (as of the openai SDK's
CompletionCreateParams, plus vLLM's sampling extras: VLLM_FIELDS) is either honoured, kept in the request's
metadata (harmless ones), or refused with an error naming it; none is dropped silently. A refused field is
accepted when it is null or holds the value that turns it off (`"stream": false`, `"tools": []`). Chat's
`response_format` (json_schema, json_object, text) is honoured: the answer is constrained to it while decoding
(contract.structured).

`body.model` is recorded in the metadata; the job runs on its own model (`--model`), whatever the lines name.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any

from producer.schema import ONE_INPUT, json_type, show

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
ENDPOINTS = (CHAT, COMPLETIONS)
COMPLETIONS_MAX_LOGPROBS = 5
"""The completions endpoint's `logprobs` is an integer: the number of top tokens, at most 5."""
PART_JOIN = "\n"
"""Text parts of one message's content are joined with this (as vLLM does)."""

_TOP_LEVEL = ("custom_id", "method", "url", "body")
_VLLM_SAME_NAME = ("min_p", "min_tokens", "stop_token_ids", "ignore_eos")
"""vLLM's extra body fields (its OpenAI server and batch runner take them), honoured with their native meaning."""
_SAME_NAME = ("temperature", "top_p", "n", "stop", "seed", "frequency_penalty", "presence_penalty", "logit_bias", *_VLLM_SAME_NAME)
"""Body fields whose native field has the same name and meaning."""
_CHAT_SAME_NAME = ("chat_template_kwargs",)
"""vLLM's chat-only extra: passed to the chat template (Qwen3's enable_thinking)."""
VLLM_FIELDS = {CHAT: (*_VLLM_SAME_NAME, *_CHAT_SAME_NAME), COMPLETIONS: _VLLM_SAME_NAME}
"""The body fields beyond OpenAI's that are honoured: vLLM's."""

_KEPT = {
    CHAT: ("user", "metadata", "safety_identifier", "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options"),
    COMPLETIONS: ("user",),
}
"""Accepted and kept in the request's metadata: identifiers and caching hints, which do not change the output."""

_OFF = object()
"""Marks a refused field that has no value meaning "off": only null is accepted."""

_REFUSED_COMMON: dict[str, tuple[Any, str]] = {
    "stream": (False, "streaming (a batch is never streamed)"),
    "stream_options": (_OFF, "streaming"),
}
_REFUSED: dict[str, dict[str, tuple[Any, str]]] = {
    CHAT: {
        **_REFUSED_COMMON,
        "tools": ([], "tool calling"),
        "tool_choice": ("none", "tool calling"),
        "parallel_tool_calls": (_OFF, "tool calling"),
        "functions": ([], "function calling"),
        "function_call": ("none", "function calling"),
        "audio": (_OFF, "audio output"),
        "modalities": (["text"], "output modalities other than text"),
        "prediction": (_OFF, "predicted outputs"),
        "reasoning_effort": (_OFF, "reasoning effort"),
        "verbosity": (_OFF, "verbosity control"),
        "web_search_options": (_OFF, "web search"),
        "moderation": (_OFF, "moderation"),
        "store": (False, "storing completions at OpenAI"),
        "service_tier": ("auto", "service tiers"),
    },
    COMPLETIONS: {
        **_REFUSED_COMMON,
        "echo": (False, "echoing the prompt"),
        "suffix": (_OFF, "insertion (suffix)"),
        # best_of is checked on its own: it is off when it equals n
    },
}
_ALSO_OFF = {"service_tier": ("default",)}

_HONOURED = {
    CHAT: ("model", "messages", "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs", "response_format",
           *_SAME_NAME, *_CHAT_SAME_NAME),
    COMPLETIONS: ("model", "prompt", "max_tokens", "logprobs", "best_of", *_SAME_NAME),
}
BODY_FIELDS = {url: (*_HONOURED[url], *_KEPT[url], *_REFUSED[url]) for url in ENDPOINTS}
"""Every body field each endpoint knows; any other is an unknown field."""

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
"""OpenAI's message roles we render, and the role each becomes (`developer` is the newer name of `system`)."""
_REFUSED_ROLES = {"tool": "tool results", "function": "function results"}
_MESSAGE_REFUSED: dict[str, tuple[Any, str]] = {
    "name": (_OFF, "participant names"),
    "tool_calls": ([], "tool calling"),
    "tool_call_id": (_OFF, "tool calling"),
    "function_call": (_OFF, "function calling"),
    "refusal": (_OFF, "refusals"),
    "audio": (_OFF, "audio"),
}
_PART_TYPES = ("text", "image_url", "input_audio", "file", "refusal")
_TEXT_PART_FIELDS = ("type", "text", "prompt_cache_breakpoint")
"""prompt_cache_breakpoint is a caching hint: accepted, no effect."""


def is_openai_line(obj: dict[str, Any]) -> bool:
    """A line in the OpenAI Batch format (rather than a native line): it has a body, a method or a url."""
    return "body" in obj or "method" in obj or "url" in obj


@dataclass
class Translation:
    line: dict[str, Any]
    """The native line (PromptLine's fields) to validate; values the translation refused are left out."""
    errors: list[str] = field(default_factory=list)
    """Errors found while translating, already in the user's field names."""
    names: dict[str, str] = field(default_factory=dict)
    """Native field -> the field the user wrote, to rename the native validator's errors."""
    input_reported: bool = False
    """The prompt or messages problem was reported here: drop the native `exactly one of` error."""

    def rename(self, errors: list[str]) -> list[str]:
        renamed = []
        for error in errors:
            if error == ONE_INPUT and self.input_reported:
                continue
            match = _LEADING_NAME.match(error)
            if match and match.group(1) in self.names:
                error = self.names[match.group(1)] + error[match.end(1) :]
            renamed.append(error)
        return renamed


_LEADING_NAME = re.compile(r"([a-z_]+)(?=[\[.:])")


def translate(obj: dict[str, Any]) -> Translation:
    """The native line for one decoded OpenAI Batch line, with the errors only the OpenAI shape can have."""
    out = Translation(line={}, names={"custom_id": "custom_id"})
    errors = out.errors
    for key in obj:
        if key not in _TOP_LEVEL:
            errors.append(_unknown("", key, _TOP_LEVEL))
    if obj.get("custom_id") is None:
        errors.append("custom_id: is required (every line of an OpenAI Batch file needs one)")
    else:
        out.line["custom_id"] = obj["custom_id"]
    method = obj.get("method")
    if method is None:
        errors.append("method: is required (POST)")
    elif method != "POST":
        errors.append(f"method: must be POST, got {show(method)}")
    url = obj.get("url")
    body = obj.get("body")
    if url is None:
        errors.append(f"url: is required ({' or '.join(ENDPOINTS)})")
    elif url not in ENDPOINTS:
        errors.append(f"url: must be {' or '.join(ENDPOINTS)}, got {show(url)}")
    if body is None:
        errors.append("body: is required")
    elif not isinstance(body, dict):
        errors.append(f"body: expected an object, got {json_type(body)}")
    if url not in ENDPOINTS or not isinstance(body, dict):
        out.input_reported = True  # nothing to translate; the reasons are above
        return out
    _body(url, body, out)
    return out


def _body(url: str, body: dict[str, Any], out: Translation) -> None:
    line, errors, names = out.line, out.errors, out.names
    other = COMPLETIONS if url == CHAT else CHAT
    for key in body:
        if key in BODY_FIELDS[other] and key not in BODY_FIELDS[url]:
            errors.append(f"body: unknown field {show(key)} for {url} (it is a field of {other})")
        elif key not in BODY_FIELDS[url]:
            errors.append(_unknown("body", key, BODY_FIELDS[url]))
    for key, (off, what) in _REFUSED[url].items():
        if key in body and not _is_off(body[key], off, _ALSO_OFF.get(key, ())):
            errors.append(f"body.{key}: not supported ({what}), got {show(body[key])}; remove it")

    model = body.get("model")
    if model is None:
        errors.append("body.model: is required")
    elif not isinstance(model, str):
        errors.append(f"body.model: expected a string, got {json_type(model)}")
    metadata: dict[str, Any] = {"url": url}
    if isinstance(model, str):
        metadata["model"] = model
    metadata.update({key: body[key] for key in _KEPT[url] if body.get(key) is not None})
    line["metadata"] = metadata

    if url == CHAT:
        _chat_input(body, out)
    else:
        _completions_input(body, out)

    for name in _SAME_NAME:
        _copy(body, name, name, line, names)
    given = [name for name in ("max_tokens", "max_completion_tokens") if body.get(name) is not None]
    if len(given) == 2:
        errors.append("body: give one of max_tokens and max_completion_tokens, not both")
    elif given:
        _copy(body, given[0], "max_new_tokens", line, names)

    if url == CHAT:
        for name in _CHAT_SAME_NAME:
            _copy(body, name, name, line, names)
        _copy(body, "response_format", "response_format", line, names)  # structured output: contract.structured
        _copy(body, "logprobs", "logprobs", line, names)
        _copy(body, "top_logprobs", "top_logprobs", line, names)
    else:
        _completions_logprobs(body.get("logprobs"), out)
        best_of = body.get("best_of")
        n = body.get("n") if body.get("n") is not None else 1
        if best_of is not None and not (_is_int(best_of) and best_of == n):
            errors.append(f"body.best_of: not supported (best-of-n selection) unless it equals n, got {show(best_of)}; remove it")


def _required_input(body: dict[str, Any], field: str, url: str, out: Translation) -> Any:
    """body's field, the request's input, named body.<field> in the native validator's messages; when it is
    missing (None), that is reported here."""
    value = body.get(field)
    out.names[field] = f"body.{field}"
    if value is None:
        out.errors.append(f"body.{field}: is required for " + url)
        out.input_reported = True
    return value


def _chat_input(body: dict[str, Any], out: Translation) -> None:
    messages = _required_input(body, "messages", CHAT, out)
    if messages is None:
        return
    if not isinstance(messages, list):
        out.line["messages"] = messages  # the native validator names the wrong type
        return
    out.line["messages"] = [_message(i, m, out.errors) for i, m in enumerate(messages)]


def _message(index: int, message: Any, errors: list[str]) -> Any:
    """One chat message as a native one ({role, content}); a wrong shape is passed on for the native validator."""
    if not isinstance(message, dict):
        return message
    where = f"body.messages[{index}]"
    native = dict(message)
    role = message.get("role")
    # a refused role is reported here and replaced, so that the native validator does not report it again
    if not isinstance(role, str):
        pass  # missing or not a string: the native validator reports it
    elif role in _REFUSED_ROLES:
        errors.append(f"{where}.role: {show(role)} is not supported ({_REFUSED_ROLES[role]})")
        native["role"] = "user"
    elif role not in _ROLES:
        errors.append(f"{where}.role: must be one of {', '.join(_ROLES)}, got {show(role)}")
        native["role"] = "user"
    else:
        native["role"] = _ROLES[role]
    for key, (off, what) in _MESSAGE_REFUSED.items():
        if key in native:
            value = native.pop(key)
            if not _is_off(value, off):
                errors.append(f"{where}.{key}: not supported ({what}), got {show(value)}; remove it")
    content = message.get("content")
    if isinstance(content, list):
        native["content"] = _text_parts(where, content, errors)
    return native


def _text_parts(where: str, parts: list[Any], errors: list[str]) -> Any:
    """A list of content parts -> their texts joined; any part that is not text is an error naming its type."""
    if not parts:
        errors.append(f"{where}.content: must not be empty")
        return ""
    texts = []
    for j, part in enumerate(parts):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            errors.append(f"{at}: expected an object, got {json_type(part)}")
            continue
        kind = part.get("type")
        if kind != "text":
            if kind in _PART_TYPES:
                errors.append(f"{at}: content parts of type {show(kind)} are not supported (only 'text')")
            else:
                errors.append(f"{at}.type: must be 'text', got {show(kind) if kind is not None else 'nothing'}")
            continue
        for key in part:
            if key not in _TEXT_PART_FIELDS:
                errors.append(_unknown(at, key, _TEXT_PART_FIELDS))
        text = part.get("text")
        if not isinstance(text, str):
            errors.append(f"{at}.text: expected a string, got {json_type(text)}")
            continue
        texts.append(text)
    return PART_JOIN.join(texts)


def _completions_input(body: dict[str, Any], out: Translation) -> None:
    prompt = _required_input(body, "prompt", COMPLETIONS, out)
    if prompt is None:
        return
    if isinstance(prompt, list):
        out.errors.append(
            f"body.prompt: a list of prompts (or of token ids) is not supported, got an array of {len(prompt)}; "
            "write one line per prompt"
        )
        out.input_reported = True
    else:
        out.line["prompt"] = prompt


def _completions_logprobs(value: Any, out: Translation) -> None:
    """The completions endpoint's `logprobs: N` (top N, 0-5) means logprobs on, with N top tokens."""
    if value is None:
        return
    if not _is_int(value):
        out.errors.append(
            f"body.logprobs: expected an integer (the number of top tokens, 0-{COMPLETIONS_MAX_LOGPROBS}) "
            f"for {COMPLETIONS}, got {json_type(value)}"
        )
    elif not 0 <= value <= COMPLETIONS_MAX_LOGPROBS:
        out.errors.append(f"body.logprobs: must be in [0, {COMPLETIONS_MAX_LOGPROBS}], got {show(value)}")
    else:
        out.line["logprobs"] = True
        out.line["top_logprobs"] = value
        out.names["top_logprobs"] = out.names["logprobs"] = "body.logprobs"


def _copy(body: dict[str, Any], name: str, native: str, line: dict[str, Any], names: dict[str, str]) -> None:
    if body.get(name) is not None:
        line[native] = body[name]
        names[native] = f"body.{name}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_off(value: Any, off: Any, also: tuple[Any, ...] = ()) -> bool:
    """null, or exactly the value that turns the feature off (a boolean is not a number: 0 is not false)."""
    if value is None:
        return True
    return any(off is not _OFF and _same_json(value, candidate) for candidate in (off, *also))


def _same_json(a: Any, b: Any) -> bool:
    return json_type(a) == json_type(b) and a == b


def _unknown(where: str, key: str, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {show(close[0])}?)" if close else ""
    reason = f"unknown field {show(key)}{hint}"
    return f"{where}: {reason}" if where else reason

