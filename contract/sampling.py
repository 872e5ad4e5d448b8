"""The ranges of the sampling parameters: the producer refuses a line outside them (with its number, before
anything is stored), the engine a request (every other way in). One statement, both sides."""
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
