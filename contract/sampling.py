"""The rules of a request's sampling parameters, each field's range (RANGES) and the rules between fields
(combination_problems): the producer refuses a line that breaks one (with its number, before anything is stored),
the engine a request (every other way in). One statement, both sides."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

MAX_N = 128
MAX_BEAMS = 64
MAX_TOP_LOGPROBS = 20
"""OpenAI's limit for chat `top_logprobs`."""
REQUEST_SEED_LIMIT = 2**63
"""A seed a request gives must be below this (it fits a signed 64-bit integer). Not workers.rows.SEED_LIMIT
(2**31), the bound of the seeds the engine picks itself for a request that gives none."""

RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_new_tokens": (lambda v: v >= 1, ">= 1"),
    "temperature": (lambda v: v >= 0, ">= 0"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "top_k": (lambda v: v >= 0, ">= 0 (0 turns top-k off)"),
    "repetition_penalty": (lambda v: v > 0, "> 0"),
    "seed": (lambda v: 0 <= v < REQUEST_SEED_LIMIT, "in [0, 2**63)"),
    "n": (lambda v: 1 <= v <= MAX_N, f"in [1, {MAX_N}]"),
    "num_beams": (lambda v: 1 <= v <= MAX_BEAMS, f"in [1, {MAX_BEAMS}]"),
    "frequency_penalty": (lambda v: -2 <= v <= 2, "in [-2, 2]"),
    "presence_penalty": (lambda v: -2 <= v <= 2, "in [-2, 2]"),
    "top_logprobs": (lambda v: 0 <= v <= MAX_TOP_LOGPROBS, f"in [0, {MAX_TOP_LOGPROBS}]"),
}
"""The one statement of every sampling parameter's range (ok, rule): the producer's schema refuses a line with
`<field>: must be <rule>, got <value>`, the engine a request with `<field> must be <rule>, got <value>.`"""

ONE_INPUT = "exactly one of 'prompt' and 'messages' is required"
SAMPLING_OFF = {"temperature": 0, "top_p": 1, "top_k": 0}
"""The value of each sampling knob that turns it off, which beam search requires."""
NOT_WITH_BEAMS = ("frequency_penalty", "presence_penalty", "logprobs")
"""Set to anything but their off value, these apply to sampled rows only; beam search refuses them."""
_SHOW_LIMIT = 40

Lookup = Callable[[str], tuple[Any, str]]
"""A request's value of a field (None: not given) and where it came from, for messages: "" (the request itself)
or e.g. " (job default)"."""


def combination_problems(value: Lookup) -> list[str]:
    """What breaks the rules between fields, one message per broken rule (`<field>: <rule>, got <values>`):
    top_logprobs needs logprobs; beam search takes no penalties, no logprobs, no sampling and at most num_beams
    samples, and no structured output (`constraint`: contract.structured)."""
    errors = []
    top_logprobs, logprobs = value("top_logprobs")[0], value("logprobs")[0]
    if top_logprobs and not logprobs:
        got = "not given" if logprobs is None else show(logprobs)
        errors.append(f"top_logprobs: needs logprobs set to true, got top_logprobs={top_logprobs}, logprobs {got}")
    beams = value("num_beams")[0]
    if beams is None or beams <= 1:
        return errors
    unsupported = [name for name in NOT_WITH_BEAMS if value(name)[0]]
    if value("constraint")[0] is not None:
        unsupported.append("structured output")
    if unsupported:
        errors.append(f"num_beams: beam search cannot be combined with {', '.join(unsupported)}, got num_beams={beams}")
    n, n_from = value("n")
    if n is not None and n > beams:
        errors.append(f"n: must be <= num_beams for beam search, got n={n}{n_from}, num_beams={beams}")
    sampling = {name: value(name) for name, off in SAMPLING_OFF.items() if value(name)[0] not in (None, off)}
    if sampling:
        got = ", ".join(f"{name}={show(v)}{source}" for name, (v, source) in sampling.items())
        fix = " and ".join(f"{name} to {SAMPLING_OFF[name]}" for name in sampling)
        errors.append(
            f"num_beams: beam search cannot be combined with sampling, got num_beams={beams}, {got} "
            f"(set {fix}, or num_beams to 1)"
        )
    return errors


def show(value: Any) -> str:
    """A value as it looks in JSON, shortened, for the `got ...` part of a message."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        text = repr(value)
        text = text[:-2] if text.endswith(".0") else text
    elif isinstance(value, int):
        text = str(value) if value.bit_length() < 128 else f"an integer of {len(str(abs(value)))} digits"
    elif isinstance(value, str):
        text = repr(value if len(value) <= _SHOW_LIMIT else value[:_SHOW_LIMIT] + "...")
    else:
        text = json_type(value)
    return text


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__
