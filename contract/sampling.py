"""The rules of a request's sampling parameters, each field's range (RANGES) and the rules between fields
(combination_problems): the producer refuses a line that breaks one (with its number, before anything is stored),
the engine a request (every other way in). One statement, both sides."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

DEFAULT_MAX_NEW_TOKENS = 256
"""A request's max_new_tokens when neither it nor its job gives one."""
MAX_N = 128
MAX_BEAMS = 64
MAX_TOP_LOGPROBS = 20
"""OpenAI's limit for chat `top_logprobs`."""
REQUEST_SEED_LIMIT = 2**63
"""A seed a request gives must be below this (it fits a signed 64-bit integer). Not workers.rows.SEED_LIMIT
(2**31), the bound of the seeds the engine picks itself for a request that gives none."""
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS = 1024
"""Entries of a request's logit_bias (OpenAI documents none; vLLM none either): each is a (rows, vocab) write."""
LOGIT_BIAS_LIMIT = 100
"""OpenAI's range of a logit_bias value: [-100, 100]."""
TOKEN_ID_LIMIT = 2**31
"""A token id a request gives (stop_token_ids, logit_bias) must be below this; the worker also checks its vocabulary."""

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
    "min_p": (lambda v: 0 <= v <= 1, "in [0, 1] (0 turns min-p off)"),
    "min_tokens": (lambda v: v >= 0, ">= 0"),
}
"""The one statement of every sampling parameter's range (ok, rule): the producer's schema refuses a line with
`<field>: must be <rule>, got <value>`, the engine a request with `<field> must be <rule>, got <value>.`"""

ONE_INPUT = "exactly one of 'prompt' and 'messages' is required"
SAMPLING_OFF = {"temperature": 0, "top_p": 1, "top_k": 0}
"""The value of each sampling knob that turns it off, which beam search requires."""
NOT_WITH_BEAMS = (
    "frequency_penalty", "presence_penalty", "logprobs", "min_p", "min_tokens", "logit_bias", "stop_token_ids", "ignore_eos",
)
"""Set to anything but their off value, these apply to sampled rows only; beam search refuses them."""
_SHOW_LIMIT = 40

Lookup = Callable[[str], tuple[Any, str]]
"""A request's value of a field (None: not given) and where it came from, for messages: "" (the request itself)
or e.g. " (job default)"."""


def combination_problems(value: Lookup) -> list[str]:
    """What breaks the rules between fields, one message per broken rule (`<field>: <rule>, got <values>`):
    top_logprobs needs logprobs; min_tokens at most max_new_tokens; structured output takes no min_tokens and no
    ignore_eos (its grammar ends the answer); beam search takes no penalties, no logprobs,
    no sampling, none of the newer knobs (NOT_WITH_BEAMS), no structured output (`constraint`:
    contract.structured) and at most num_beams samples."""
    errors = []
    (min_tokens, min_from), (max_new, max_from) = value("min_tokens"), value("max_new_tokens")
    if min_tokens is not None and min_tokens > (max_new if max_new is not None else DEFAULT_MAX_NEW_TOKENS):
        got = f"max_new_tokens={max_new}{max_from}" if max_new is not None else f"max_new_tokens {DEFAULT_MAX_NEW_TOKENS} (default)"
        errors.append(f"min_tokens: must be <= max_new_tokens, got min_tokens={min_tokens}{min_from}, {got}")
    top_logprobs, logprobs = value("top_logprobs")[0], value("logprobs")[0]
    if top_logprobs and not logprobs:
        got = "not given" if logprobs is None else show(logprobs)
        errors.append(f"top_logprobs: needs logprobs set to true, got top_logprobs={top_logprobs}, logprobs {got}")
    constrained = value("constraint")[0] is not None
    for name in ("min_tokens", "ignore_eos"):
        given, source = value(name)
        if constrained and given:
            errors.append(f"{name}: cannot be combined with structured output (a constrained answer ends when its "
                          f"grammar is complete), got {name}={show(given)}{source}")
    beams = value("num_beams")[0]
    if beams is None or beams <= 1:
        return errors
    unsupported = [name for name in NOT_WITH_BEAMS if value(name)[0]]
    if constrained:
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


def token_id_problem(value: Any) -> str | None:
    """Why value is not a token id (an integer in [0, 2**31)), or None."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"expected a token id (an integer), got {json_type(value)}"
    if not 0 <= value < TOKEN_ID_LIMIT:
        return f"a token id must be in [0, 2**31), got {show(value)}"
    return None


def logit_bias_problems(bias: Any) -> list[str]:
    """What is wrong with a logit_bias (OpenAI's: a JSON object, token id -> bias in [-100, 100]); keys may be
    integers or their decimal text (JSON keys are text)."""
    if not isinstance(bias, dict):
        return [f"logit_bias: expected an object (token id -> bias), got {json_type(bias)}"]
    if len(bias) > MAX_LOGIT_BIAS:
        return [f"logit_bias: must hold at most {MAX_LOGIT_BIAS} entries, got {len(bias)}"]
    errors = []
    for key, bias_value in bias.items():
        token = int(key) if isinstance(key, str) and key.isascii() and key.isdecimal() else key
        problem = token_id_problem(token)
        if problem is not None:
            errors.append(f"logit_bias: {problem.replace('an integer', 'an integer key')} (key {show(key)})")
        elif isinstance(bias_value, bool) or not isinstance(bias_value, (int, float)) or bias_value != bias_value:
            errors.append(f"logit_bias[{show(key)}]: expected a number, got {json_type(bias_value)}")
        elif not -LOGIT_BIAS_LIMIT <= bias_value <= LOGIT_BIAS_LIMIT:
            errors.append(f"logit_bias[{show(key)}]: must be in [-{LOGIT_BIAS_LIMIT}, {LOGIT_BIAS_LIMIT}], got {show(bias_value)}")
    return errors


TEMPLATE_OWN_ARGUMENTS = (
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs",
)
"""Arguments of apply_chat_template that the engine sets itself: chat_template_kwargs may not name them."""


def chat_template_kwargs_problems(kwargs: Any, chat: bool) -> list[str]:
    """What is wrong with a request's chat_template_kwargs (an object passed to the chat template; chat only)."""
    if kwargs is None or kwargs == {}:
        return []
    if not isinstance(kwargs, dict):
        return [f"chat_template_kwargs: expected an object, got {json_type(kwargs)}"]
    if not chat:
        return ["chat_template_kwargs: needs messages (a plain prompt is not rendered with the chat template)"]
    own = [key for key in kwargs if key in TEMPLATE_OWN_ARGUMENTS]
    if own:
        return [f"chat_template_kwargs: {', '.join(map(show, own))} is set by the engine, not by a request"]
    return []


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
