"""What one input line and the job-level defaults may hold, and every check on them.

All range checks live in the validators below and share vLLM's message pattern,
`<field>: must be in (0, 1], got 0`. Pydantic's own errors are turned into the same
short `<field>: <reason>` strings by `error_messages`; its multi-line output is never shown.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationError, model_validator

from contract.sampling import (
    MAX_STOP_TOKEN_IDS,
    ONE_INPUT,
    RANGES,
    TOKEN_ID_LIMIT,
    chat_template_kwargs_problems,
    combination_problems,
    json_type,
    logit_bias_problems,
    show,
)
from contract.structured import FIELDS as STRUCTURED_FIELDS
from contract.structured import Constraint, constraint_of

ROLES = ("system", "user", "assistant")
MAX_STOP = 16
MAX_CUSTOM_ID = 512
"""The width of requests.custom_id in the store."""

def _check(ok: Callable[[Any], bool], rule: str) -> AfterValidator:
    def validate(value: Any) -> Any:
        if not ok(value):
            raise ValueError(f"must be {rule}, got {show(value)}")
        return value

    return AfterValidator(validate)


def _not_empty(value: Any) -> Any:
    if len(value) == 0:
        raise ValueError("must not be empty")
    return value


def _at_most_chars(limit: int) -> AfterValidator:
    def validate(value: str) -> str:
        if len(value) > limit:
            raise ValueError(f"must be at most {limit} characters, got {len(value)}")
        return value

    return AfterValidator(validate)


def _stop_as_list(value: Any) -> Any:
    """vLLM accepts a single stop string; normalise it to a list before the strict list check."""
    if isinstance(value, str):
        return [value]
    if value is not None and not isinstance(value, list):
        raise ValueError(f"expected a string or an array of strings, got {json_type(value)}")
    return value


def _stop_count(value: list[str]) -> list[str]:
    if len(value) > MAX_STOP:
        raise ValueError(f"must hold at most {MAX_STOP} strings, got {len(value)}")
    return value


def _stop_token_count(value: list[int]) -> list[int]:
    if len(value) > MAX_STOP_TOKEN_IDS:
        raise ValueError(f"must hold at most {MAX_STOP_TOKEN_IDS} token ids, got {len(value)}")
    return value


MaxNewTokens = Annotated[int, _check(*RANGES["max_new_tokens"])]
Temperature = Annotated[float, _check(*RANGES["temperature"])]
TopP = Annotated[float, _check(*RANGES["top_p"])]
TopK = Annotated[int, _check(*RANGES["top_k"])]
Seed = Annotated[int, _check(*RANGES["seed"])]
Penalty = Annotated[float, _check(*RANGES["frequency_penalty"])]
"""frequency_penalty and presence_penalty, with OpenAI's range and meaning (0 = off)."""
TopLogprobs = Annotated[int, _check(*RANGES["top_logprobs"])]
N = Annotated[int, _check(*RANGES["n"])]
NumBeams = Annotated[int, _check(*RANGES["num_beams"])]
RepetitionPenalty = Annotated[float, _check(*RANGES["repetition_penalty"])]
MinP = Annotated[float, _check(*RANGES["min_p"])]
MinTokens = Annotated[int, _check(*RANGES["min_tokens"])]
TokenId = Annotated[int, _check(lambda v: 0 <= v < TOKEN_ID_LIMIT, "a token id in [0, 2**31)")]
StopTokenIds = Annotated[list[TokenId], AfterValidator(_stop_token_count)]
StopString = Annotated[str, AfterValidator(_not_empty)]
Stop = Annotated[list[StopString], BeforeValidator(_stop_as_list), AfterValidator(_stop_count)]
CustomId = Annotated[str, AfterValidator(_not_empty), _at_most_chars(MAX_CUSTOM_ID)]
Prompt = Annotated[str, AfterValidator(_not_empty)]


class _Strict(BaseModel):
    """No coercion: a boolean is not a number, "0.5" is not a number, 3.0 is not an integer (1 is a float)."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class _JobSampling(_Strict):
    """The sampling values that can be set both per job and per line; None means not given."""

    max_new_tokens: MaxNewTokens | None = None
    temperature: Temperature | None = None
    """0 means greedy."""
    top_p: TopP | None = None
    top_k: TopK | None = None
    seed: Seed | None = None
    n: N | None = None


class JobDefaults(_JobSampling):
    """The job-level defaults from the submit flags; each line's own values override them."""

    system_prompt: Prompt | None = None
    """Prepended as a system message to each chat request that has none (plain prompts are left as they are)."""

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


DEFAULT_FIELDS = tuple(JobDefaults.model_fields)
"""The sampling values a job may set for all its lines (the submit flags)."""


class PromptLine(_JobSampling):
    """One line of the input file: exactly one of `prompt` (raw completion) and `messages` (chat)."""

    prompt: Prompt | None = None
    messages: Annotated[list[Message], AfterValidator(_not_empty)] | None = None
    custom_id: CustomId | None = None
    repetition_penalty: RepetitionPenalty | None = None
    stop: Stop | None = None
    num_beams: NumBeams | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    logprobs: bool | None = None
    """Store each generated token's log-probability with the result."""
    top_logprobs: TopLogprobs | None = None
    """With logprobs: also this many most likely tokens at each position."""
    min_p: MinP | None = None
    min_tokens: MinTokens | None = None
    stop_token_ids: StopTokenIds | None = None
    ignore_eos: bool | None = None
    logit_bias: dict[str, Any] | None = None
    """Token id (JSON keys are text) -> bias in [-100, 100], added to the logit (OpenAI's); checked in check_against."""
    chat_template_kwargs: dict[str, Any] | None = None
    """Passed to the model's chat template (Qwen3: {"enable_thinking": false}); chat requests only."""
    metadata: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    """Structured output (contract.structured): OpenAI's json_schema or json_object, or vLLM's guided_* below."""
    guided_json: dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[Any] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> PromptLine:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError(ONE_INPUT)
        return self

    def sampling_params(self) -> dict[str, Any]:
        """Only the sampling values set on this line: they are stored as the request's overrides."""
        return self.model_dump(exclude_none=True, exclude={"prompt", "messages", "custom_id", "metadata", *STRUCTURED_FIELDS})

    @property
    def constraint(self) -> Constraint | None:
        """The structured output the line asks for (None: none, or one that check_against refuses)."""
        return constraint_of({name: getattr(self, name) for name in STRUCTURED_FIELDS})[0]

    def check_against(self, defaults: Mapping[str, Any], context_length: int) -> list[str]:
        """Cross-field rules (contract.sampling), on the effective values: the line's, else the job default's."""
        errors = []
        if self.max_new_tokens is not None and self.max_new_tokens > context_length:
            errors.append(_too_long(self.max_new_tokens, context_length))
        if self.logit_bias is not None:
            errors += logit_bias_problems(self.logit_bias)
        errors += chat_template_kwargs_problems(self.chat_template_kwargs, self.messages is not None)
        errors += constraint_of({name: getattr(self, name) for name in STRUCTURED_FIELDS})[1]
        return errors + combination_problems(lambda name: self._effective(name, defaults))

    def with_system_prompt(self, system_prompt: str | None) -> PromptLine:
        """The line with the job's system prompt first, when it is a chat request without a system message."""
        if system_prompt is None or self.messages is None or any(m.role == "system" for m in self.messages):
            return self
        return self.model_copy(update={"messages": [Message(role="system", content=system_prompt), *self.messages]})

    def _effective(self, name: str, defaults: Mapping[str, Any]) -> tuple[Any, str]:
        value = getattr(self, name, None)
        if value is not None:
            return value, ""
        value = defaults.get(name)
        return value, (" (job default)" if value is not None else "")


def _too_long(max_new_tokens: int, context_length: int, name: str = "max_new_tokens") -> str:
    return f"{name}: must be <= {context_length} (the model's context), got {max_new_tokens}"


def validate_line(obj: dict[str, Any], defaults: Mapping[str, Any], context_length: int) -> tuple[PromptLine | None, list[str]]:
    """Validate one decoded JSON object; returns the line or the list of `field: reason` errors."""
    try:
        line = PromptLine.model_validate(obj)
    except ValidationError as exc:
        errors = error_messages(exc)
        # The one-input rule is a model validator, which pydantic skips once a field failed; report it anyway.
        if ONE_INPUT not in errors and (obj.get("prompt") is None) == (obj.get("messages") is None):
            errors.insert(0, ONE_INPUT)
        return None, errors
    errors = line.check_against(defaults, context_length)
    return (None, errors) if errors else (line.with_system_prompt(defaults.get("system_prompt")), [])


def validate_defaults(values: Mapping[str, Any], context_length: int) -> list[str]:
    """Check the submit flags with the line rules; errors name the flag: `--top-p: must be in (0, 1], got 2`."""
    given = {name: value for name, value in values.items() if value is not None}
    try:
        defaults = JobDefaults.model_validate(given)
    except ValidationError as exc:
        return error_messages(exc, JobDefaults, name_field=flag_name)
    if defaults.max_new_tokens is not None and defaults.max_new_tokens > context_length:
        return [_too_long(defaults.max_new_tokens, context_length, flag_name("max_new_tokens"))]
    return []


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def error_messages(
    exc: ValidationError, model: type[BaseModel] = PromptLine, name_field: Callable[[str], str] = str
) -> list[str]:
    """Turn pydantic's errors into one-line `field: reason` strings; `model` is the one validated (for typo hints)."""
    messages = []
    for error in exc.errors(include_url=False):
        loc = error["loc"]
        if error["type"] == "extra_forbidden":
            known = Message.model_fields if len(loc) > 1 else model.model_fields
            where, reason = _path(loc[:-1], name_field), _unknown_field(name_field(str(loc[-1])), list(map(name_field, known)))
        else:
            where, reason = _path(loc, name_field), _reason(error)
        messages.append(f"{where}: {reason}" if where else reason)
    return messages


def _path(loc: tuple[int | str, ...], name_field: Callable[[str], str]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + (name_field(part) if not text else part)
    return text


def _unknown_field(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown field {show(name)}{hint}"


_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "bool_type": "a boolean",
}


def _reason(error: Any) -> str:
    kind, value = error["type"], error.get("input")
    if kind == "value_error":
        return str(error["ctx"]["error"])
    if kind == "missing":
        return "is required"
    if kind == "literal_error":  # only Message.role is a Literal
        return f"must be one of {', '.join(ROLES)}, got {show(value)}"
    if kind in ("finite_number", "float_parsing") or (kind == "float_type" and isinstance(value, int) and not isinstance(value, bool)):
        return f"must be a finite number, got {show(value)}"
    if kind in _EXPECTED:
        got = json_type(value)
        if got in ("number", "string"):
            got += f" {value!r}" if isinstance(value, float) else f" {show(value)}"
        return f"expected {_EXPECTED[kind]}, got {got}"
    return error["msg"][0].lower() + error["msg"][1:]
