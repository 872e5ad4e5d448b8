"""The generation engine: load a model once, then generate(requests) -> results, in input order.

Every request is expanded into rows (request x sample index). For Llama-family models (workers.llama) the rows
go through continuous batching: rows wait in a queue sorted by prompt length; whenever the running batch has
room (rows and a token budget), the next rows are prefilled into free cache slots and join it; every step feeds
one token to each running row, each with its own sampling parameters, seed, stop strings and max_new_tokens; a
row that finishes leaves at once and its slot goes to a waiting row. Other architectures run the same per-row
decode loop on transformers' forward in static batches (decode_batch). Beam-search requests go through
transformers' own beam search.

In the order a request meets them: check_params -> expand_rows -> decode_continuous (SlotCache in workers.llama
owns the KV cache) -> sample_rows -> finish -> complete_greedy; the Engine class at the end ties them together,
and splits the batch when it runs out of memory.
"""
from __future__ import annotations

import gc
import logging
import secrets
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from workers.llama import LlamaRunner, SlotCache, supports
from workers.loader import load_model
from workers.quantize import QUANTIZE_MODES, check_combination, quantize_model
from workers.registry import ModelSpec
from workers.sampling import RowParams, draw_uniforms, next_tokens
from workers.types import GenerationRequest, GenerationResult, Sample, SamplingParams

log = logging.getLogger(__name__)

SEED_LIMIT = 2**31
"""Seeds the engine picks stay below this (and seed + i too), so they fit a 32-bit integer column."""
PREFILL_TOKENS = 4096
"""Most (padded) prompt tokens one prefill forward takes; more waiting rows wait for the next one."""

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


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA out-of-memory error, or the CPU allocator failing to get memory."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    message = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


@dataclass
class Running:
    """A row in the running batch: its generator and the tokens it has produced so far."""

    row: Row
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    seen: Tensor | None = None
    """bool (vocab,): the tokens of the prompt and of generated, kept only when the row has a repetition penalty."""
    counts: Tensor | None = None
    """float (vocab,): how often each token was generated, kept only when the row has a frequency/presence penalty."""
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    """One entry per generated token, kept only when the row asks for logprobs."""


def start_row(row: Row) -> Running:
    """A fresh Running: the generator is seeded here, so a row restarted after an out-of-memory error draws the same."""
    sampled = row.sampled and row.seed is not None
    return Running(row, torch.Generator().manual_seed(row.seed) if sampled else None)


def sample_rows(logits: Tensor, states: list[Running], eos_ids: frozenset[int], tokenizer: PreTrainedTokenizerBase) -> list[Sample | None]:
    """Draw every row's next token from its logits (rows, vocab), append it, and return each row's Sample if done."""
    device = logits.device
    params = RowParams.build(
        [s.row.params.temperature for s in states],
        [s.row.params.top_k for s in states],
        [s.row.params.top_p for s in states],
        [s.row.params.repetition_penalty for s in states],
        device,
    )
    seen = None
    if any(s.row.params.repetition_penalty != 1.0 for s in states):
        for s in states:
            if s.seen is None:
                s.seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=device)
                s.seen[torch.tensor(s.row.prompt_ids + s.generated, dtype=torch.long, device=device)] = True
        seen = torch.stack([s.seen for s in states])  # penalty 1.0 leaves a row's logits exactly as they are
    raw = logits
    logits = apply_openai_penalties(logits, states)
    tokens = next_tokens(logits, params, seen, draw_uniforms([s.generator for s in states], device))
    record_logprobs(raw, tokens, states, tokenizer)
    finished: list[Sample | None] = []
    for s, token in zip(states, tokens.tolist()):
        s.generated.append(token)
        if s.seen is not None:
            s.seen[token] = True
        if s.counts is not None:
            s.counts[token] += 1
        sample = finish(tokenizer, s.generated, s.row, eos_ids)
        if sample is not None and s.row.params.logprobs:
            sample.logprobs = s.logprobs[: sample.completion_tokens]
        finished.append(sample)
    return finished


def apply_openai_penalties(logits: Tensor, states: list[Running]) -> Tensor:
    """OpenAI's penalties on the generated tokens: logit -= frequency * count + presence * (count > 0)."""
    if not any(s.row.params.frequency_penalty or s.row.params.presence_penalty for s in states):
        return logits
    for s in states:
        if s.counts is None:
            s.counts = torch.zeros(logits.shape[-1], dtype=torch.float32, device=logits.device)
            for token in s.generated:
                s.counts[token] += 1
    counts = torch.stack([s.counts for s in states])  # type: ignore[misc]
    frequency = torch.tensor([s.row.params.frequency_penalty for s in states], dtype=torch.float32, device=logits.device)
    presence = torch.tensor([s.row.params.presence_penalty for s in states], dtype=torch.float32, device=logits.device)
    penalty = frequency[:, None] * counts + presence[:, None] * (counts > 0).float()
    return logits - penalty.to(logits.dtype)


def record_logprobs(raw: Tensor, tokens: Tensor, states: list[Running], tokenizer: PreTrainedTokenizerBase) -> None:
    """For rows that ask: the chosen token's log-probability and the top_logprobs most likely tokens, under the
    model's own distribution (raw logits, before penalties, temperature and filters, as vLLM reports them)."""
    wanted = [i for i, s in enumerate(states) if s.row.params.logprobs]
    if not wanted:
        return
    index = torch.tensor(wanted, dtype=torch.long, device=raw.device)
    logprobs = raw[index].float().log_softmax(dim=-1)
    chosen = logprobs.gather(-1, tokens[index][:, None]).squeeze(-1).tolist()
    width = max(states[i].row.params.top_logprobs for i in wanted)
    top = logprobs.topk(width, dim=-1) if width else None
    for j, i in enumerate(wanted):
        s = states[i]
        token = int(tokens[i])
        entry: dict[str, Any] = {"token": tokenizer.decode([token]), "logprob": chosen[j], "top_logprobs": []}
        for value, candidate in zip(
            (top.values[j].tolist() if top is not None else [])[: s.row.params.top_logprobs],
            (top.indices[j].tolist() if top is not None else [])[: s.row.params.top_logprobs],
        ):
            entry["top_logprobs"].append({"token": tokenizer.decode([candidate]), "logprob": value})
        s.logprobs.append(entry)


def decode_continuous(
    runner: LlamaRunner,
    cache: SlotCache,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[Row],
    eos_ids: frozenset[int],
    max_rows: int,
    max_tokens: int,
    done: dict[tuple[int, int], Sample],
    admit_at: int | None = None,
) -> None:
    """Generate every row with continuous batching; each finished row's Sample goes into done as it finishes.

    Rows wait sorted by prompt length (so that a prefill pads little). Before each step, waiting rows join while
    the batch has fewer than max_rows rows and the rows' prompt + max_new_tokens sum stays within max_tokens (a
    row that would exceed it alone still runs alone); they join in groups of at least admit_at rows (default
    max_rows / 8: each prefill reads every weight once more, so one prefill per finished row cost 3-7% in
    bfloat16), or whatever is left. Every row must fit the cache's capacity. Rows already in done are skipped.
    """
    assert cache.rows == 0, "the cache must start empty"
    admit_at = max(1, max_rows // 8) if admit_at is None else admit_at
    pending = deque(sorted((r for r in rows if (r.request_index, r.sample_index) not in done), key=lambda r: len(r.prompt_ids)))
    running: list[Running] = []  # running[i] lives in cache slot i
    budget = 0

    def retire(finished: list[tuple[int, Sample]]) -> None:
        nonlocal budget
        for slot, sample in sorted(finished, key=lambda f: f[0], reverse=True):
            row = running[slot].row
            done[row.request_index, row.sample_index] = sample
            budget -= len(row.prompt_ids) + row.params.max_new_tokens
            last = len(running) - 1
            if slot != last:  # the last row takes the free slot, so the batch stays contiguous
                cache.move(last, slot)
                running[slot] = running[last]
            running.pop()
            cache.rows -= 1

    while pending or running:
        free = max_rows - len(running)
        if pending and free > 0 and (free >= admit_at or not running or len(pending) <= free):
            group: list[Row] = []
            while pending and len(group) < free:
                row = pending[0]
                need = len(row.prompt_ids) + row.params.max_new_tokens
                if (running or group) and budget + need > max_tokens:
                    break
                if group and (len(group) + 1) * runner.aligned(len(row.prompt_ids)) > PREFILL_TOKENS:
                    break
                group.append(pending.popleft())
                budget += need
            if group:
                states = [start_row(row) for row in group]
                logits = runner.prefill(cache, [row.prompt_ids for row in group])
                first = len(running)
                running.extend(states)
                ended = sample_rows(logits, states, eos_ids, tokenizer)
                retire([(first + i, sample) for i, sample in enumerate(ended) if sample is not None])
        if running:
            tokens = torch.tensor([s.generated[-1] for s in running], dtype=torch.long, device=cache.keys.device)
            logits = runner.decode(cache, tokens)
            ended = sample_rows(logits, running, eos_ids, tokenizer)
            retire([(slot, sample) for slot, sample in enumerate(ended) if sample is not None])


def capacity_groups(rows: list[Row]) -> list[list[Row]]:
    """Rows grouped by the power of two their prompt + max_new_tokens rounds up to, smallest first.

    Each group runs on a cache sized for its longest row, so one long request does not make every slot long.
    """
    groups: dict[int, list[Row]] = {}
    for row in rows:
        need = len(row.prompt_ids) + row.params.max_new_tokens
        groups.setdefault(1 << (need - 1).bit_length(), []).append(row)
    return [groups[size] for size in sorted(groups)]


# --- static batches on transformers' forward: models workers.llama does not run ---------------------------------


class KVBatch:
    """transformers' DynamicCache for one static batch, with its attention mask and each row's next position.

    Only for architectures workers.llama does not run; the continuous path keeps its cache in llama.SlotCache.
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
        batch_invariant: bool | None = None,
    ) -> None:
        """max_batch_rows: most rows decoded together; max_batch_tokens: most prompt + max_new_tokens tokens summed
        over the running rows, i.e. the KV cache's size (a longer single row still runs alone).

        batch_invariant (default: on for float32 without quantization) pads matrix products so that a row's
        numbers do not depend on its batch (see workers.llama.LlamaRunner): a seeded request then gives the same
        text alone or in any batch. It costs a few percent; other precisions are not batch-invariant anyway.
        The model is used as given: load() quantizes it before it gets here.
        """
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
        self.rows_limit = max_batch_rows
        """max_batch_rows, lowered for the rest of the engine's life after an out-of-memory error."""
        self.context_length: int = model.config.max_position_embeddings
        self.eos_ids = eos_token_ids(model, tokenizer)
        if batch_invariant is None:
            batch_invariant = dtype == "float32" and quantize == "none"
        self.batch_invariant = batch_invariant
        why_not = supports(model)
        self.runner: LlamaRunner | None = LlamaRunner(model, batch_invariant) if why_not is None else None
        if why_not is not None:
            log.info("static batches on transformers' forward: %s", why_not)
        self._cache: SlotCache | None = None

    @classmethod
    def load(
        cls, spec: ModelSpec, device: str = "cpu", dtype: str = "float32", quantize: str = "none", max_batch_rows: int = 64
    ) -> Engine:
        problem = check_combination(device, dtype, quantize)  # before the slow load
        if problem is not None:
            raise ValueError(problem)
        model, tokenizer = load_model(spec, device, dtype)
        model = quantize_model(model, quantize)
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
        failed: dict[int, str] = {}
        if self.runner is not None:
            for group in capacity_groups(rows):
                self._decode_continuous(group, decoded, failed)
        else:
            for batch in self._batches(rows):
                self._decode_static(batch, decoded, failed)
        for i, ids in prompts.items():
            if results[i] is None:
                params = requests[i].params
                if i in failed:
                    results[i] = GenerationResult(len(ids), [], error=failed[i])
                    continue
                request_samples = [decoded[i, k] for k in range(decoded_rows(params))]
                results[i] = GenerationResult(len(ids), complete_greedy(request_samples, params))
        assert all(result is not None for result in results)
        return results  # type: ignore[return-value]

    def _decode_continuous(self, rows: list[Row], done: dict[tuple[int, int], Sample], failed: dict[int, str]) -> None:
        """decode_continuous over a cache that fits the rows; on out of memory, fewer rows at once, from scratch.

        A row that was running when memory ran out starts over from its prompt with a fresh generator, so it gives
        exactly what it would have given without the error. Rows that finished before it are kept.
        """
        assert self.runner is not None
        capacity = max(len(r.prompt_ids) + r.params.max_new_tokens for r in rows)
        while True:
            todo = [r for r in rows if (r.request_index, r.sample_index) not in done and r.request_index not in failed]
            if not todo:
                return
            slots = max(1, min(self.rows_limit, len(todo), self.max_batch_tokens // capacity))
            try:
                cache = self._slot_cache(slots, capacity)
                decode_continuous(
                    self.runner, cache, self.tokenizer, todo, self.eos_ids, slots, self.max_batch_tokens, done
                )
                return
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                running = self._cache.rows if self._cache is not None else slots
                self._release_memory()
                if slots == 1:
                    # Alone and still out of memory: no longer a batch-size problem. The row that ran is the first
                    # of todo in the scheduler's order (by prompt length); its request fails, the others go on.
                    row = min(todo, key=lambda r: len(r.prompt_ids))
                    failed[row.request_index] = f"out of memory with a batch of one row: {exc}"
                    continue
                self.rows_limit = max(1, min(slots, running) // 2)
                log.warning("out of memory with %d rows running; retrying with at most %d rows", running, self.rows_limit)

    def _slot_cache(self, slots: int, capacity: int) -> SlotCache:
        """The engine's SlotCache, emptied; a new one when the old one is too small or more than twice too big."""
        assert self.runner is not None
        dtype = self.runner.activation_dtype
        cache = self._cache
        if cache is None or not cache.fits(slots, capacity, dtype, self.device) or cache.nbytes() > 2 * self._cache_bytes(slots, capacity):
            self._cache = None  # drop the old one before allocating the new one
            cache = self._cache = self.runner.new_cache(slots, capacity, self.device)
        cache.rows = 0
        return cache

    def _cache_bytes(self, slots: int, capacity: int) -> int:
        assert self.runner is not None
        probe = self.runner
        per_token = 2 * len(probe.layers) * probe.kv_heads * probe.head_dim * torch.tensor([], dtype=probe.activation_dtype).element_size()
        return max(slots, probe.min_rows) * probe.aligned(capacity) * per_token

    def _release_memory(self) -> None:
        self._cache = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _decode_static(self, batch: list[Row], done: dict[tuple[int, int], Sample], failed: dict[int, str]) -> None:
        """decode_batch on transformers' forward; on out of memory, each half on its own."""
        try:
            samples = decode_batch(self.model, self.tokenizer, batch, self.eos_ids, self.device)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            self._release_memory()
            if len(batch) == 1:
                failed[batch[0].request_index] = f"out of memory with a batch of one row: {exc}"
                return
            log.warning("out of memory with a batch of %d rows; splitting it", len(batch))
            half = len(batch) // 2
            self._decode_static(batch[:half], done, failed)
            self._decode_static(batch[half:], done, failed)
            return
        for row, sample in zip(batch, samples):
            done[row.request_index, row.sample_index] = sample

    def _check_request(self, request: GenerationRequest) -> str | None:
        params = request.params
        if self.runner is None and (params.frequency_penalty or params.presence_penalty or params.logprobs):
            return "frequency_penalty, presence_penalty and logprobs need a Llama-family model (continuous batching) in this version"
        if params.num_beams > 1 and (params.frequency_penalty or params.presence_penalty or params.logprobs):
            return "frequency_penalty, presence_penalty and logprobs are not available with beam search"
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
