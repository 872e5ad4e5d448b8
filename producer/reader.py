"""Stream a JSONL file of prompts into (line number, request | errors), in bounded memory.

A file is in one of two formats, set by its first JSON object: native lines (producer.schema) or
OpenAI Batch lines (producer.openai_batch, translated into native lines and validated the same way).
A line in the other format is an error.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from contract.errors import EmptyInput, InputFileError
from producer.limits import MAX_ROW_BYTES
from contract.structured import Constraint
from producer.openai_batch import is_openai_line, translate
from producer.schema import PromptLine, json_type, show, validate_line

MAX_LINE_BYTES = MAX_ROW_BYTES
"""A line is a row: the same limit as every other format's (producer.limits)."""
_BOM = b"\xef\xbb\xbf"
_DRAIN_CHUNK = 1 << 16
_MAX_INT_DIGITS = 1000
"""Python refuses to convert more than 4300 digits; no field needs anywhere near this many."""
_SUSPECT_ESCAPE = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")
"""\\u0000 and surrogate escapes: json accepts them, but the store cannot hold NUL or lone surrogates."""


__all__ = ["EmptyInput", "InputFileError", "LineOutcome", "RowChecker", "ValidRequest", "decode_line", "format_error", "read_requests"]
@dataclass(slots=True)
class ValidRequest:
    line_no: int
    custom_id: str
    """The line's custom_id, else its line number as a string."""
    prompt: str | None
    messages: list[dict[str, str]] | None
    params: dict[str, Any]
    """Only the sampling values set on this line (stop as a list); the job's defaults are stored on the job."""
    metadata: dict[str, Any] | None
    constraint: Constraint | None = None
    """The structured output it asks for (contract.structured), stored once per job under its key."""


@dataclass(slots=True)
class LineOutcome:
    line_no: int
    request: ValidRequest | None
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.request is not None


def format_error(path_name: str, line_no: int, reason: str) -> str:
    """`prompts.jsonl:17: top_p: must be in (0, 1], got 0`"""
    return f"{path_name}:{line_no}: {reason}"


def read_requests(
    path: str | os.PathLike[str],
    defaults: Mapping[str, Any],
    context_length: int,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> Iterator[LineOutcome]:
    """Yield one outcome per non-blank line, in file order; raise EmptyInput at the end if there was none.

    `defaults` are the job's (already validated) defaults: cross-field rules use the line's value, else these.
    Raises InputFileError (on the first next()) when the file cannot be opened.
    """
    name = os.fspath(path)
    checker = RowChecker(defaults, context_length)
    any_line = False
    with _open(name) as file:
        for line_no, content in _physical_lines(file, max_line_bytes):
            if isinstance(content, int):
                any_line = True
                yield LineOutcome(line_no, None, [f"line is {content} bytes, the limit is {max_line_bytes}"])
                continue
            if line_no == 1 and content.startswith(_BOM):
                content = content[len(_BOM) :]
            if not content.strip():
                continue
            any_line = True
            yield checker.check_bytes(line_no, content)
    if not any_line:
        raise EmptyInput(f"{name}: the file is empty" + ("" if _is_zero_bytes(name) else " (it holds only blank lines)"))


def _open(name: str) -> BinaryIO:
    try:
        return open(name, "rb")
    except FileNotFoundError:
        raise InputFileError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise InputFileError(f"{name}: is a directory, not a file") from None
    except PermissionError:
        raise InputFileError(f"{name}: permission denied") from None
    except OSError as exc:
        raise InputFileError(f"{name}: cannot be read ({exc.strerror or exc})") from None


def _is_zero_bytes(name: str) -> bool:
    try:
        return os.path.getsize(name) == 0
    except OSError:
        return False


def _physical_lines(file: BinaryIO, max_line_bytes: int) -> Iterator[tuple[int, bytes | int]]:
    """Yield (line number, content without its line ending), or (line number, byte count) for a line over the limit.

    A line over the limit is skipped in chunks, so memory stays bounded by max_line_bytes.
    """
    line_no = 0
    while chunk := file.readline(max_line_bytes + 2):  # room for the content plus "\r\n"
        line_no += 1
        if chunk.endswith(b"\n") or len(chunk) < max_line_bytes + 2:
            content = _strip_ending(chunk)
            yield line_no, (content if len(content) <= max_line_bytes else len(content))
            continue
        total = len(chunk)
        while not chunk.endswith(b"\n") and (chunk := file.readline(_DRAIN_CHUNK)):
            total += len(chunk)
        yield line_no, total - (len(chunk) - len(_strip_ending(chunk)) if chunk else 0)


def _strip_ending(chunk: bytes) -> bytes:
    if chunk.endswith(b"\r\n"):
        return chunk[:-2]
    if chunk.endswith(b"\n"):
        return chunk[:-1]
    return chunk


class _Format:
    """The file's format, set by its first JSON object: native or OpenAI Batch."""

    def __init__(self) -> None:
        self.openai: bool | None = None
        self.first_line = 0

    def mismatch(self, line_no: int, openai: bool) -> str | None:
        """None if the line is in the file's format (setting it on the first line), else the error."""
        if self.openai is None:
            self.openai, self.first_line = openai, line_no
            return None
        if openai == self.openai:
            return None
        this, first = ("an OpenAI Batch line", "a native line") if openai else ("a native line", "an OpenAI Batch line")
        return f"this is {this} but line {self.first_line} is {first}: a file must hold one format"


class RowChecker:
    """Validates an input's rows in order, whatever holds them (a JSONL line, a table row, a Python dict):
    each row alone, and across rows (one format per input, no custom_id twice)."""

    def __init__(self, defaults: Mapping[str, Any], context_length: int, unit: str = "line") -> None:
        self.unit = unit
        """What a position counts, as messages say it: 'line' or 'row'."""
        self.defaults = defaults
        self.context_length = context_length
        self._seen = _SeenIds()
        self._format = _Format()

    def check_bytes(self, position: int, content: bytes) -> LineOutcome:
        """A row as the bytes of one JSON object."""
        obj, error = decode_line(content)
        if error is not None:
            return LineOutcome(position, None, [error])
        return self.check_object(position, obj)

    def check_value(self, position: int, value: Any) -> LineOutcome:
        """A row given as a Python value: held to exactly what a JSONL line may hold (it goes through JSON),
        so a NaN, a NUL, a lone surrogate or a value JSON cannot carry is refused the same way."""
        if not isinstance(value, Mapping):
            return LineOutcome(position, None, [f"expected an object (a dict of fields), got {type(value).__name__}"])
        try:
            text = json.dumps(value, ensure_ascii=False, allow_nan=False, default=_not_json)
        except _NotJson as exc:
            return LineOutcome(position, None, [str(exc)])
        except ValueError:
            return LineOutcome(position, None, ["NaN and infinite numbers are not allowed"])
        except RecursionError:
            return LineOutcome(position, None, ["nested too deeply"])
        content = text.encode("utf-8", "surrogatepass")
        if len(content) > MAX_ROW_BYTES:
            return LineOutcome(position, None, [f"{self.unit} is {len(content)} bytes as JSON, the limit is {MAX_ROW_BYTES}"])
        return self.check_bytes(position, content)

    def check_object(self, position: int, obj: dict[str, Any]) -> LineOutcome:
        """A row already decoded from JSON."""
        openai = is_openai_line(obj)
        mismatch = self._format.mismatch(position, openai)
        if mismatch is not None:
            return LineOutcome(position, None, [mismatch])
        if openai:
            translation = translate(obj)
            line, errors = validate_line(translation.line, self.defaults, self.context_length)
            errors = translation.errors + translation.rename(errors)
            line = None if errors else line
        else:
            line, errors = validate_line(obj, self.defaults, self.context_length)
        custom_id = _custom_id(obj, position, required=openai)
        if custom_id is not None:
            first = self._seen.first_line(custom_id)
            if first is not None:
                hint = "" if "custom_id" in obj and obj["custom_id"] is not None else f" (this {self.unit} has no custom_id, so its {self.unit} number is used)"
                errors.append(f"duplicate custom_id {show(custom_id)} (first on {self.unit} {first}){hint}")
            elif line is not None and not errors:
                self._seen.add(custom_id, position)
        if line is None or errors:
            return LineOutcome(position, None, errors)
        return LineOutcome(position, _request(position, custom_id or str(position), line), [])


def _not_json(value: Any) -> Any:
    """json.dumps' fallback: numpy scalars and arrays become plain values; anything else is refused."""
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", None) == 0:
        return item()
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return tolist()
    raise _NotJson(f"a {type(value).__name__} is not a JSON value (give strings, numbers, booleans, null, lists and dicts)")


def decode_line(content: bytes) -> tuple[Any, str | None]:
    """Bytes of one line -> (JSON object, None) or (None, reason)."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"invalid UTF-8 at byte {exc.start + 1}"
    try:
        obj = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float, parse_int=_bounded_int)
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON: {exc.msg} at column {exc.colno}"
    except _NotJson as exc:
        return None, f"invalid JSON: {exc}"
    except RecursionError:
        return None, "invalid JSON: nested too deeply"
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {json_type(obj)}"
    if _SUSPECT_ESCAPE.search(text):
        bad = _unstorable_string(obj)
        if bad is not None:
            return None, bad
    return obj, None


class _NotJson(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _NotJson(f"{name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _NotJson(f"the number {text[:40]} is out of range")
    return value


def _bounded_int(text: str) -> int:
    if len(text) > _MAX_INT_DIGITS:
        raise _NotJson(f"an integer of {len(text)} digits is too long (the limit is {_MAX_INT_DIGITS})")
    return int(text)


def _unstorable_string(obj: Any) -> str | None:
    """The first string (key or value) with a NUL or a lone surrogate, which no store can hold; iterative, any depth."""
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                name = key if key.isprintable() else json.dumps(key)  # a message is one line: escape \n and the like
                path = f"{where}.{name}" if where else name
                if (reason := _bad_string(key)) is not None:
                    return f"{path}: the key {reason}"
                stack.append((path, item))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", item) for i, item in enumerate(value))
        elif isinstance(value, str) and (reason := _bad_string(value)) is not None:
            return f"{where}: {reason}"
    return None


def _bad_string(text: str) -> str | None:
    if "\x00" in text:
        return "contains a NUL character (\\u0000)"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "contains a lone surrogate (an unpaired \\ud800-\\udfff escape)"
    return None


def _custom_id(obj: dict[str, Any], line_no: int, required: bool = False) -> str | None:
    """The id duplicates are checked on: the line's custom_id, its line number when absent (unless required), None when unusable."""
    value = obj.get("custom_id")
    if value is None:
        return None if required else str(line_no)
    return value if isinstance(value, str) and value else None


def _request(line_no: int, custom_id: str, line: PromptLine) -> ValidRequest:
    messages = [{"role": m.role, "content": m.content} for m in line.messages] if line.messages is not None else None
    return ValidRequest(
        line_no=line_no,
        custom_id=custom_id,
        prompt=line.prompt,
        messages=messages,
        params=line.sampling_params(),
        metadata=line.metadata,
        constraint=line.constraint,
    )


class _SeenIds:
    """custom_id -> first line, keyed by an 8-byte blake2b digest so tens of millions of ids fit in memory.

    A false duplicate needs a 64-bit collision: about 3 in a million for a file of 10**7 ids.
    """

    def __init__(self) -> None:
        self._first: dict[int, int] = {}

    @staticmethod
    def _key(custom_id: str) -> int:
        digest = hashlib.blake2b(custom_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        return int.from_bytes(digest, "little")

    def first_line(self, custom_id: str) -> int | None:
        return self._first.get(self._key(custom_id))

    def add(self, custom_id: str, line_no: int) -> None:
        self._first[self._key(custom_id)] = line_no
