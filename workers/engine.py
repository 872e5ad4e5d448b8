"""The generation engine: load a model once, then generate(requests) -> results, in input order.

Every request is expanded into rows (request x sample index). Rows are sorted by prompt length and packed into
batches; a batch is left-padded, prefilled in one forward pass, then decoded one token per step for all its
active rows, each row with its own sampling parameters, seed, stop strings and max_new_tokens. Beam-search
requests go through transformers' own beam search instead.

Functions come in the order a request meets them: check_params -> expand_rows -> KVBatch (the one owner of the
KV cache) -> decode_batch -> finish -> complete_greedy; the Engine class at the end ties them together.
"""
from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from workers.loader import load_model
from workers.registry import ModelSpec
from workers.sampling import RowParams, draw_uniforms, next_tokens
from workers.types import GenerationRequest, GenerationResult, Sample, SamplingParams

log = logging.getLogger(__name__)

QUANTIZE_MODES = ("none",)
SEED_LIMIT = 2**31
"""Seeds the engine picks stay below this (and seed + i too), so they fit a 32-bit integer column."""


def check_params(params: SamplingParams) -> str | None:
    """A message for the first out-of-range parameter (the producer validates too; this guards the engine)."""
    if params.max_new_tokens < 1:
        return f"max_new_tokens must be at least 1, got {params.max_new_tokens}."
    if params.temperature < 0:
        return f"temperature must be non-negative, got {params.temperature}."
    if not 0 < params.top_p <= 1:
        return f"top_p must be in (0, 1], got {params.top_p}."
    if params.top_k < 0:
        return f"top_k must be non-negative (0 disables it), got {params.top_k}."
    if params.repetition_penalty <= 0:
        return f"repetition_penalty must be positive, got {params.repetition_penalty}."
    if params.n < 1:
        return f"n must be at least 1, got {params.n}."
    if params.num_beams < 1:
        return f"num_beams must be at least 1, got {params.num_beams}."
    if params.num_beams > 1 and params.n > params.num_beams:
        return f"n must not exceed num_beams for beam search, got n={params.n} and num_beams={params.num_beams}."
    return None


@dataclass
class Row:
    """One sample of one request: what decode_batch generates."""

    request_index: int
    sample_index: int
    prompt_ids: list[int]
    params: SamplingParams
    seed: int | None
    """The seed reported in the Sample; for sampled rows (temperature > 0) also the seed of the row's generator."""

    @property
    def sampled(self) -> bool:
        return self.params.temperature > 0


def decoded_rows(params: SamplingParams) -> int:
    """How many rows a request is decoded as: n, but one for a greedy request (its samples are all the same)."""
    return 1 if params.temperature == 0 else params.n


def expand_rows(request_index: int, prompt_ids: list[int], params: SamplingParams) -> list[Row]:
    """Rows of one request: sample i is drawn with seed + i (the seed is picked here when the request has none).

    Greedy samples report seed + i when the request gave a seed, None otherwise (see complete_greedy).
    """
    if params.temperature == 0:
        return [Row(request_index, 0, prompt_ids, params, params.seed)]
    seed = params.seed if params.seed is not None else secrets.randbelow(SEED_LIMIT - params.n)
    return [Row(request_index, i, prompt_ids, params, seed + i) for i in range(decoded_rows(params))]


class KVBatch:
    """The KV cache of one batch, with its attention mask and the position of each row's next token.

    This class alone creates, advances and shrinks the cache, so that a different cache (static, paged,
    prefix-shared) only has to change here.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.cache = DynamicCache(config=model.config)
        self.attention_mask: Tensor | None = None
        self.next_position: Tensor | None = None

    def prefill(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Run the left-padded prompts (rows, length); return the logits of each row's last position (rows, vocab)."""
        # Positions count real tokens only, so left padding does not shift them (as transformers' generate does).
        position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        self.attention_mask = attention_mask
        self.next_position = position_ids[:, -1] + 1
        return self._forward(input_ids, position_ids)

    def step(self, tokens: Tensor) -> Tensor:
        """Feed one new token per row (rows,); return the next logits (rows, vocab)."""
        assert self.attention_mask is not None and self.next_position is not None, "prefill first"
        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones(len(tokens), 1)], dim=-1)
        position_ids = self.next_position[:, None]
        self.next_position = self.next_position + 1
        return self._forward(tokens[:, None], position_ids)

    def keep(self, index: Tensor) -> None:
        """Keep only the rows at index (finished rows leave the batch, so they cost nothing more)."""
        assert self.attention_mask is not None and self.next_position is not None, "prefill first"
        self.cache.batch_select_indices(index)
        self.attention_mask = self.attention_mask[index]
        self.next_position = self.next_position[index]

    def _forward(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        out = self.model(
            input_ids=input_ids,
            attention_mask=self.attention_mask,
            position_ids=position_ids,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :]


def left_pad(rows: list[Row], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """input_ids and attention_mask (rows, longest prompt), padded on the left."""
    length = max(len(row.prompt_ids) for row in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.prompt_ids)
        input_ids[i, length - n :] = torch.tensor(row.prompt_ids, dtype=torch.long)
        attention_mask[i, length - n :] = 1
    return input_ids.to(device), attention_mask.to(device)


def seen_tokens(rows: list[Row], vocab_size: int, device: torch.device) -> Tensor | None:
    """bool (rows, vocab): the tokens of each row's prompt (padding excluded); None when no row is penalised."""
    if all(row.params.repetition_penalty == 1.0 for row in rows):
        return None
    seen = torch.zeros((len(rows), vocab_size), dtype=torch.bool, device=device)
    for i, row in enumerate(rows):
        seen[i, torch.tensor(row.prompt_ids, dtype=torch.long, device=device)] = True
    return seen


def decode_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[Row],
    eos_ids: frozenset[int],
    device: torch.device,
) -> list[Sample]:
    """Generate every row of one batch; returns one Sample per row, in the rows' order.

    Each step feeds one token to every active row. A row that finishes leaves the batch (its cache rows are
    dropped), so it neither costs compute nor influences the others; the loop ends when no row is left.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked out: any id does
    input_ids, attention_mask = left_pad(rows, pad_id, device)
    params = RowParams.build(
        [row.params.temperature for row in rows],
        [row.params.top_k for row in rows],
        [row.params.top_p for row in rows],
        [row.params.repetition_penalty for row in rows],
        device,
    )
    generators = [torch.Generator().manual_seed(row.seed) if row.sampled and row.seed is not None else None for row in rows]
    kv = KVBatch(model)
    logits = kv.prefill(input_ids, attention_mask)
    seen = seen_tokens(rows, logits.shape[-1], device)

    active = list(range(len(rows)))  # batch position -> index into rows
    generated: list[list[int]] = [[] for _ in rows]
    samples: list[Sample | None] = [None] * len(rows)
    while True:
        uniform = draw_uniforms([generators[r] for r in active], device)
        tokens = next_tokens(logits, params, seen, uniform)
        if seen is not None:
            seen[torch.arange(len(active), device=device), tokens] = True
        for r, token in zip(active, tokens.tolist()):
            generated[r].append(token)
            samples[r] = finish(tokenizer, generated[r], rows[r], eos_ids)
        still = [i for i, r in enumerate(active) if samples[r] is None]
        if not still:
            break
        if len(still) < len(active):
            index = torch.tensor(still, dtype=torch.long, device=device)
            kv.keep(index)
            params = params.select(index)
            seen = seen[index] if seen is not None else None
            tokens = tokens[index]
            active = [active[i] for i in still]
        logits = kv.step(tokens)
    assert all(sample is not None for sample in samples)
    return samples  # type: ignore[return-value]


def finish(tokenizer: PreTrainedTokenizerBase, ids: list[int], row: Row, eos_ids: frozenset[int]) -> Sample | None:
    """The finished Sample if the row is done after its last token ids[-1], else None.

    Done means, in this order: an EOS token ('stop'; the EOS is not part of the text or the count), a stop string
    in the decoded text ('stop'; text cut before the earliest stop string), or max_new_tokens tokens ('length').

    completion_tokens counts the generated tokens that were needed for the result, EOS excluded: for a
    stop-string finish that is every token up to and including the one whose decoding completed the stop string
    (so the count includes the stop string's tokens, although the text does not).
    """
    params = row.params
    if ids[-1] in eos_ids:
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
        Sample(first.text, first.finish_reason, first.completion_tokens, None if params.seed is None else params.seed + i)
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


class Engine:
    """A loaded model and tokenizer that turn batches of GenerationRequests into GenerationResults."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        device: str,
        model_name: str,
        dtype: str,
        quantize: str = "none",
        max_batch_rows: int = 64,
        max_batch_tokens: int = 65536,
    ) -> None:
        """max_batch_tokens bounds rows x (longest prompt + largest max_new_tokens) of a batch, i.e. its KV cache."""
        if quantize not in QUANTIZE_MODES:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {quantize!r}")
        if max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be at least 1, got {max_batch_rows}")
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.model_name = model_name
        self.dtype = dtype
        self.quantize = quantize
        self.max_batch_rows = max_batch_rows
        self.max_batch_tokens = max_batch_tokens
        self.context_length: int = model.config.max_position_embeddings
        self.eos_ids = eos_token_ids(model, tokenizer)

    @classmethod
    def load(
        cls, spec: ModelSpec, device: str = "cpu", dtype: str = "float32", quantize: str = "none", max_batch_rows: int = 64
    ) -> Engine:
        if quantize not in QUANTIZE_MODES:  # checked before the slow load, too
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {quantize!r}")
        model, tokenizer = load_model(spec, device, dtype)
        return cls(model, tokenizer, device, spec.name, dtype, quantize, max_batch_rows)

    def render(self, request: GenerationRequest) -> str:
        """The prompt text the model sees: chat messages through the chat template, raw prompts as they are."""
        if request.messages is not None:
            return self.tokenizer.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
        assert request.prompt is not None, "a request needs a prompt or messages"
        return request.prompt

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)

    @torch.inference_mode()
    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """One result per request, in input order; each with params.n samples in sample-index order."""
        results: list[GenerationResult | None] = [None] * len(requests)
        prompts: dict[int, list[int]] = {}
        for i, request in enumerate(requests):
            error = self._check_request(request)
            if error is not None:
                results[i] = GenerationResult(0, [], error=error)
                continue
            try:
                text = self.render(request)
            except Exception as exc:  # a malformed conversation fails its own request, not the batch
                results[i] = GenerationResult(0, [], error=f"cannot render the prompt: {type(exc).__name__}: {exc}")
                continue
            prompts[i] = self.tokenizer(text, add_special_tokens=False).input_ids
        for i, ids in prompts.items():
            error = self._check_length(len(ids), requests[i].params)
            if error is not None:
                results[i] = GenerationResult(len(ids), [], error=error)

        rows: list[Row] = []
        for i, ids in prompts.items():
            if results[i] is not None:
                continue
            params = requests[i].params
            if params.num_beams > 1:
                results[i] = GenerationResult(len(ids), self._beam_search(ids, params))
            else:
                rows.extend(expand_rows(i, ids, params))

        decoded: dict[tuple[int, int], Sample] = {}
        for batch in self._batches(rows):
            log.debug("decoding %d rows, prompts of %d-%d tokens", len(batch), len(batch[0].prompt_ids), len(batch[-1].prompt_ids))
            for row, sample in zip(batch, decode_batch(self.model, self.tokenizer, batch, self.eos_ids, self.device)):
                decoded[row.request_index, row.sample_index] = sample
        for i, ids in prompts.items():
            if results[i] is None:
                params = requests[i].params
                request_samples = [decoded[i, k] for k in range(decoded_rows(params))]
                results[i] = GenerationResult(len(ids), complete_greedy(request_samples, params))
        assert all(result is not None for result in results)
        return results  # type: ignore[return-value]

    def _check_request(self, request: GenerationRequest) -> str | None:
        if (request.prompt is None) == (request.messages is None):
            return "a request needs exactly one of prompt and messages"
        if request.messages is not None and not request.messages:
            return "messages must not be empty"
        return check_params(request.params)

    def _check_length(self, prompt_tokens: int, params: SamplingParams) -> str | None:
        if prompt_tokens == 0:
            return "prompt is empty (0 tokens)"
        if prompt_tokens + params.max_new_tokens > self.context_length:
            return (
                f"prompt has {prompt_tokens} tokens; with max_new_tokens {params.max_new_tokens} "
                f"it exceeds the model's context of {self.context_length}"
            )
        return None

    def _batches(self, rows: list[Row]) -> list[list[Row]]:
        """Rows sorted by prompt length, cut into batches of at most max_batch_rows rows and max_batch_tokens."""
        batches: list[list[Row]] = []
        batch: list[Row] = []
        longest = 0
        for row in sorted(rows, key=lambda r: len(r.prompt_ids)):
            size = len(row.prompt_ids) + row.params.max_new_tokens
            if batch and (len(batch) == self.max_batch_rows or (len(batch) + 1) * max(longest, size) > self.max_batch_tokens):
                batches.append(batch)
                batch, longest = [], 0
            batch.append(row)
            longest = max(longest, size)
        if batch:
            batches.append(batch)
        return batches

    def _beam_search(self, prompt_ids: list[int], params: SamplingParams) -> list[Sample]:
        """params.n sequences from transformers' beam search, stop strings applied to them afterwards."""
        input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        output = self.model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            num_beams=params.num_beams,
            num_return_sequences=params.n,
            do_sample=False,
            max_new_tokens=params.max_new_tokens,
            repetition_penalty=params.repetition_penalty,
            # Unused without sampling, but given so that no generation-config default (top_k=50) can leak in.
            top_k=params.top_k,
            top_p=params.top_p,
            no_repeat_ngram_size=0,
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.tokenizer.pad_token_id,
        )
        samples = []
        for i, sequence in enumerate(output[:, len(prompt_ids) :].tolist()):
            row = Row(-1, i, prompt_ids, params, None if params.seed is None else params.seed + i)
            samples.append(finish_sequence(self.tokenizer, sequence, row, self.eos_ids))
        return samples
