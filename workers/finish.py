"""When a row is done, and what its Sample says: EOS, stop strings, max_new_tokens; decoding its text.

Pure functions of the generated ids (no tensors), shared by every decode path (workers.scheduler,
workers.static_batches, beam search).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workers.types import Sample, SamplingParams

if TYPE_CHECKING:
    from workers.rows import Row


def finish(tokenizer: PreTrainedTokenizerBase, ids: list[int], row: Row, eos_ids: frozenset[int]) -> Sample | None:
    """The finished Sample if the row is done after its last token ids[-1], else None.

    Done means, in this order: an EOS token or one of the row's stop_token_ids ('stop'; that token is not part of
    the text or the count; EOS not with ignore_eos), a stop string in the decoded text ('stop'; text cut before the
    earliest stop string), or max_new_tokens tokens ('length'). Before min_tokens tokens only the last can end a row
    (the sampler masks EOS and stop_token_ids until then: workers.rows).

    completion_tokens counts the generated tokens that were needed for the result, EOS excluded: for a
    stop-string finish that is every token up to and including the one whose decoding completed the stop string
    (so the count includes the stop string's tokens, although the text does not).
    """
    params = row.params
    if len(ids) < params.min_tokens:
        return Sample(decode(tokenizer, ids), "length", len(ids), row.seed) if len(ids) >= params.max_new_tokens else None
    if ids[-1] in ending_ids(params, eos_ids):
        text = cut_at_stop(decode(tokenizer, ids[:-1]), params.stop)
        return Sample(text, "stop", len(ids) - 1, row.seed)
    if params.stop:
        text = decode(tokenizer, ids)
        at = stop_position(text, params.stop)
        if at is not None:
            return Sample(text[:at], "stop", len(ids), row.seed)
    if len(ids) >= params.max_new_tokens:
        return Sample(decode(tokenizer, ids), "length", len(ids), row.seed)
    return None


def ending_ids(params: SamplingParams, eos_ids: frozenset[int]) -> frozenset[int]:
    """The tokens that end a row: EOS (unless ignore_eos) and the row's stop_token_ids."""
    ends = frozenset() if params.ignore_eos else eos_ids
    return ends | frozenset(params.stop_token_ids) if params.stop_token_ids else ends


def decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def stop_position(text: str, stops: list[str]) -> int | None:
    """Where the earliest occurrence of any stop string begins in text, or None."""
    positions = [i for i in (text.find(stop) for stop in stops if stop) if i >= 0]
    return min(positions) if positions else None


def cut_at_stop(text: str, stops: list[str]) -> str:
    """text up to (not including) the earliest stop string."""
    at = stop_position(text, stops)
    return text if at is None else text[:at]


def finish_sequence(tokenizer: PreTrainedTokenizerBase, ids: list[int], row: Row, eos_ids: frozenset[int]) -> Sample:
    """The Sample for a finished token sequence (from beam search), as if it had been decoded token by token."""
    for end in range(1, len(ids) + 1):
        sample = finish(tokenizer, ids[:end], row, eos_ids)
        if sample is not None:
            return sample
    # Shorter than max_new_tokens without an EOS: transformers stopped it for a reason of its own.
    return Sample(cut_at_stop(decode(tokenizer, ids), row.params.stop), "stop", len(ids), row.seed)


def complete_greedy(samples: list[Sample], params: SamplingParams) -> list[Sample]:
    """Copy a greedy request's one decoded sample to all n of its samples."""
    if params.temperature != 0 or params.n == 1:
        return samples
    first = samples[0]
    return [
        Sample(
            first.text, first.finish_reason, first.completion_tokens, None if params.seed is None else params.seed + i,
            first.logprobs, first.cached_tokens, first.draft_tokens, first.accepted_tokens,
        )
        for i in range(params.n)
    ]


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """The tokenizer's EOS and every EOS of the model's generation config."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    configured = model.generation_config.eos_token_id
    if configured is not None:
        ids.update([configured] if isinstance(configured, int) else configured)
    return frozenset(ids)
