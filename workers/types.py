"""The data that crosses the engine's boundary: requests with their sampling parameters in, results out."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from contract.sampling import DEFAULT_MAX_NEW_TOKENS, RANGES, logit_bias_problems, token_id_problem
from contract.sampling import MAX_BEAMS, MAX_N, MAX_TOP_LOGPROBS  # noqa: F401 (their one statement)
from contract.structured import Constraint


@dataclass
class SamplingParams:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    top_k: int = 0
    """0 means no top-k filter (transformers' implicit top_k=50 is never applied)."""
    repetition_penalty: float = 1.0
    seed: int | None = None
    """Seed of sample 0; sample i uses seed + i. None: the engine picks one and reports it."""
    stop: list[str] = field(default_factory=list)
    n: int = 1
    num_beams: int = 1
    frequency_penalty: float = 0.0
    """OpenAI semantics: logit -= frequency_penalty * (times the token was generated so far)."""
    presence_penalty: float = 0.0
    """OpenAI semantics: logit -= presence_penalty if the token was generated at least once."""
    logprobs: bool = False
    """Return each generated token's log-probability (under the distribution it was sampled from)."""
    top_logprobs: int = 0
    """With logprobs: also the this many most likely tokens at each position (0-20)."""
    min_p: float = 0.0
    """Keep a token when its probability is at least min_p times the most likely token's (after top-k/top-p); 0 = off."""
    min_tokens: int = 0
    """No EOS and no stop_token_ids (they are masked) and no stop string end the row before this many tokens."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Tokens that end the row like EOS ('stop'; not in the text or the count)."""
    ignore_eos: bool = False
    """EOS does not end the row (it runs to max_new_tokens, a stop string or a stop_token_id)."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """OpenAI's: added to the token's logit before any other processing, in [-100, 100]."""
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Passed to the chat template (e.g. Qwen3's enable_thinking); chat requests only."""
    constraint: Constraint | None = None
    """Structured output: the text is decoded under this grammar (workers.grammar); None: free text."""

    def problem(self) -> str | None:
        """The first out-of-range parameter, in vLLM's message pattern; None when every one is in range.

        The ranges are RANGES, which the producer's schema checks too (with the line number, before anything is
        stored); this guards every other way into the engine. The rules between fields are the engine's
        _check_request (contract.sampling.combination_problems).
        """
        for name, (ok, rule) in RANGES.items():
            value = getattr(self, name)
            if value is not None and not ok(value):
                return f"{name} must be {rule}, got {value}."
        for token in self.stop_token_ids:
            if token_id_problem(token) is not None:
                return f"stop_token_ids: {token_id_problem(token)}."
        problems = logit_bias_problems(self.logit_bias)
        return problems[0] + "." if problems else None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.num_beams > 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "repetition_penalty": self.repetition_penalty,
            "seed": self.seed,
            "stop": list(self.stop),
            "n": self.n,
            "num_beams": self.num_beams,
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
            "logprobs": self.logprobs,
            "top_logprobs": self.top_logprobs,
            "min_p": self.min_p,
            "min_tokens": self.min_tokens,
            "stop_token_ids": list(self.stop_token_ids),
            "ignore_eos": self.ignore_eos,
            "logit_bias": {str(k): v for k, v in self.logit_bias.items()},
            "chat_template_kwargs": dict(self.chat_template_kwargs),
        }


@dataclass
class GenerationRequest:
    """Exactly one of prompt (raw completion) and messages (chat, rendered with the chat template)."""

    params: SamplingParams
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None


@dataclass
class Sample:
    text: str
    finish_reason: str
    """'stop' (EOS or a stop string) or 'length' (max_new_tokens reached)."""
    completion_tokens: int
    seed: int | None
    """The seed this sample was drawn with (None for greedy and beam search)."""
    logprobs: list[dict[str, Any]] | None = None
    """With params.logprobs: one entry per generated token of the text,
    {"token": str, "logprob": float, "top_logprobs": [{"token": str, "logprob": float}, ...]}."""
    cached_tokens: int = field(default=0, compare=False)
    """Prompt tokens whose K/V came from the prefix cache instead of being computed for this sample (accounting:
    two samples with the same text, reason, tokens and seed are equal wherever their prompt's K/V came from)."""
    draft_tokens: int = field(default=0, compare=False)
    """Tokens speculative decoding proposed for this sample (workers.speculation)."""
    accepted_tokens: int = field(default=0, compare=False)
    """Of draft_tokens, those kept: each one saved a decode step."""
    reasoning: str | None = None
    """A reasoning model's thinking (workers.reasoning), when its chat template marks it; text is then the answer."""


@dataclass
class GenerationResult:
    prompt_tokens: int
    samples: list[Sample]
    """n samples, in sample-index order; empty when error is set."""
    error: str | None = None
    """A permanent, per-request failure (e.g. the prompt does not fit the context)."""


SAMPLING_FIELDS = (
    "max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop", "n", "num_beams",
    "frequency_penalty", "presence_penalty", "logprobs", "top_logprobs", "min_p", "min_tokens", "stop_token_ids",
    "ignore_eos", "logit_bias", "chat_template_kwargs",
)


def resolve_params(job_defaults: dict[str, Any], overrides: dict[str, Any]) -> SamplingParams:
    """Merge a job's defaults (from submit flags) with one line's own values; the line wins.

    A temperature given nowhere means 1.0 for sampling rows and greedy for beam-search rows.
    """
    merged: dict[str, Any] = {}
    for name in SAMPLING_FIELDS:
        if overrides.get(name) is not None:
            merged[name] = overrides[name]
        elif job_defaults.get(name) is not None:
            merged[name] = job_defaults[name]
    if "temperature" not in merged:
        merged["temperature"] = 0.0 if merged.get("num_beams", 1) > 1 else 1.0
    if "stop" in merged:
        merged["stop"] = list(merged["stop"])
    if "logit_bias" in merged:  # stored as JSON: its keys are text
        merged["logit_bias"] = {int(k): float(v) for k, v in merged["logit_bias"].items()}
    return SamplingParams(**merged)
