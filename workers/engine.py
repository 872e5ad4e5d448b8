"""The generation engine: load a model once, then turn requests into results.

Two interfaces over one scheduler:
- `generate(requests) -> results`, in input order: add everything, step until idle (tests, benchmarks);
- `submit(key, request)` and `step() -> [(key, result)]`: what a worker uses to keep its batch full across
  queue messages (workers.worker); a request's result comes out of the step that finished its last row.

A request is checked, rendered (chat template), tokenized and expanded into rows (request x sample;
workers.rows), which go to the engine's one scheduler (workers.batch): the architectures of workers.architectures run them with
continuous batching (workers.scheduler over the KV cache of workers.kv_cache, forward passes in workers.decoder);
other architectures in static batches on transformers' forward (workers.static_batches.StaticScheduler), with the
same per-row sampling; beam-search requests go through transformers' own beam search (workers.beam).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from contract.registry import ModelSpec
from contract.sampling import ONE_INPUT, chat_template_kwargs_problems, combination_problems
from workers.architectures import text_config
from workers.batch import BatchScheduler, Finished, is_out_of_memory
from workers.beam import beam_search
from workers.decoder import DecoderRunner, supports
from workers.draft_model import DraftModel
from workers.finish import complete_greedy, eos_token_ids
from workers.kv_cache import kv_budget_tokens
from workers.loader import load_model
from workers.prefix_cache import PREFIX_CACHE_TOKENS, PrefixCache
from workers.quantize import QUANTIZE_MODES, check_combination, quantize_model
from workers.reasoning import marks_thinking, prompt_opens_thinking, split_thinking
from workers.rows import decoded_rows, expand_rows
from workers.scheduler import Scheduler
from workers.static_batches import StaticScheduler
from workers.speculation import SPECULATIVE_TOKENS, SpeculationPolicy
from workers.types import GenerationRequest, GenerationResult, Sample, SamplingParams

__all__ = ["Engine", "expand_rows", "is_out_of_memory"]

log = logging.getLogger(__name__)
DROPPED = "dropped"
"""The error of a request whose generation was stopped on purpose: no result comes out for it."""


@dataclass
class InFlight:
    """A submitted request whose rows are being generated."""

    prompt_tokens: int
    params: SamplingParams
    rows: int
    """Rows not finished yet."""
    samples: dict[int, Sample] = field(default_factory=dict)
    error: str | None = None
    thinking: bool | None = None
    """A chat request to a model whose template marks thinking: whether its prompt opened a <think> block
    (workers.reasoning); None: its text is all answer."""


class Engine:
    """A loaded model and tokenizer that turn GenerationRequests into GenerationResults."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        device: str,
        model_name: str,
        dtype: str,
        quantize: str = "none",
        max_batch_rows: int = 64,
        max_batch_tokens: int | None = None,
        batch_invariant: bool | None = None,
        prefix_cache_tokens: int = PREFIX_CACHE_TOKENS,
        speculative_tokens: int = SPECULATIVE_TOKENS,
        draft_model: DraftModel | None = None,
        static_batches: bool = False,
        cuda_graphs: bool | None = None,
        overlap: bool | None = None,
        compile_decode: bool = False,
    ) -> None:
        """max_batch_rows: most rows decoded together; max_batch_tokens: the KV cache's size in tokens, which
        the running rows' prompt + max_new_tokens stay within (a longer single row still runs alone). None:
        65,536 on a CPU (fewer if they would take over 1 GiB), on a GPU what 90% of its free memory holds (workers.kv_cache.kv_budget_tokens).

        batch_invariant (default: on for float32 without quantization) pads matrix products so that a row's
        numbers do not depend on its batch (see workers.decoder.DecoderRunner): a seeded request then gives the same
        text alone or in any batch. It costs a few percent; other precisions are not batch-invariant anyway.
        The model is used as given: load() quantizes it before it gets here.

        prefix_cache_tokens: the most prompt tokens whose K/V are kept for later rows that start with the same
        tokens (workers.prefix_cache); 0 turns prefix caching off. Fast-engine architectures only (workers.architectures).

        speculative_tokens: the most draft tokens a row proposes per step when speculative decoding pays
        (workers.speculation: prompt lookup, exact); 0 turns it off. Fast-engine architectures only (workers.architectures).

        draft_model: a smaller model with the same tokenizer that drafts in place of prompt lookup
        (workers.draft_model); None: prompt lookup.

        static_batches: decode in static batches on transformers' forward even where workers.decoder could run the
        model (what other architectures get; tests and benchmarks compare the two paths).

        cuda_graphs: replay decode steps from CUDA graphs (workers.graphs); None: on CUDA. True on a CPU runs the
        same static-shape steps eagerly (tests); False: every step eager.

        overlap: launch each decode step before recording the last one's tokens, so that the device computes while
        the host does its bookkeeping (workers.scheduler.Scheduler.step); None: on CUDA. Fast-engine architectures only.

        compile_decode: the graphed decode step through torch.compile first (workers.graphs.DecodeGraphs; only where
        cuda_graphs is on). Off by default: on our CPU compiled steps were slower, on a GPU it is unmeasured.
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
        self.context_length: int = text_config(model).max_position_embeddings
        self._eos_ids = eos_token_ids(model, tokenizer)
        self.marks_thinking = marks_thinking(tokenizer)
        """The chat template marks thinking: chat results keep it apart (Sample.reasoning)."""
        if batch_invariant is None:
            batch_invariant = dtype == "float32" and quantize == "none"
        self.batch_invariant = batch_invariant
        why_not = "asked for" if static_batches else supports(model)
        runner = DecoderRunner(model, batch_invariant) if why_not is None else None
        if why_not is not None:
            log.info("static batches on transformers' forward: %s", why_not)
        self.max_batch_tokens = kv_budget_tokens(self.device, runner.bytes_per_token() if runner is not None else None, max_batch_tokens)
        self.scheduler: BatchScheduler
        if runner is not None:
            self.scheduler = Scheduler(
                runner, tokenizer, self._eos_ids, self.device, max_batch_rows, self.max_batch_tokens,
                prefix=PrefixCache(prefix_cache_tokens), speculation=SpeculationPolicy(
                    speculative_tokens, drafter=draft_model.drafter if draft_model is not None else None
                ), graphs=cuda_graphs, overlap=overlap, compile_decode=compile_decode,
            )
        else:
            self.scheduler = StaticScheduler(model, tokenizer, self._eos_ids, self.device, max_batch_rows, self.max_batch_tokens)
        self._flights: dict[Hashable, InFlight] = {}
        self._ready: list[tuple[Hashable, GenerationResult]] = []

    @classmethod
    def load(
        cls,
        spec: ModelSpec,
        device: str = "cpu",
        dtype: str = "float32",
        quantize: str = "none",
        max_batch_rows: int = 64,
        max_batch_tokens: int | None = None,
        prefix_cache_tokens: int = PREFIX_CACHE_TOKENS,
        speculative_tokens: int = SPECULATIVE_TOKENS,
        draft_spec: ModelSpec | None = None,
        static_batches: bool = False,
        cuda_graphs: bool | None = None,
        overlap: bool | None = None,
        compile_decode: bool = False,
    ) -> Engine:
        """draft_spec: the draft model (Engine's draft_model), loaded on the same device in the same dtype."""
        problem = check_combination(device, dtype, quantize)  # before the slow load
        if problem is not None:
            raise ValueError(problem)
        model, tokenizer = load_model(spec, device, dtype)
        model = quantize_model(model, quantize)
        draft = None
        if draft_spec is not None and speculative_tokens > 0:
            draft = DraftModel(*load_model(draft_spec, device, dtype), target=tokenizer)
        return cls(
            model, tokenizer, device, spec.name, dtype, quantize, max_batch_rows, max_batch_tokens,
            prefix_cache_tokens=prefix_cache_tokens, speculative_tokens=speculative_tokens, draft_model=draft,
            static_batches=static_batches, cuda_graphs=cuda_graphs, overlap=overlap, compile_decode=compile_decode,
        )

    @property
    def eos_ids(self) -> frozenset[int]:
        """The tokens that end a row: the tokenizer's EOS and every EOS of the model's generation config."""
        return self._eos_ids

    @eos_ids.setter
    def eos_ids(self, ids: frozenset[int]) -> None:
        self._eos_ids = frozenset(ids)
        self.scheduler.eos_ids = self._eos_ids

    # --- what it holds ----------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """Nothing submitted is left to generate or to hand out."""
        return not self._flights and not self._ready

    @property
    def continuous(self) -> bool:
        """Rows run with continuous batching (workers.scheduler), not in static batches."""
        return isinstance(self.scheduler, Scheduler)

    @property
    def runner(self) -> DecoderRunner | None:
        """The forward passes of continuous batching; None on static batches."""
        return self.scheduler.runner if self.continuous else None  # type: ignore[attr-defined]

    @property
    def running_rows(self) -> int:
        return self.scheduler.running

    @property
    def waiting_rows(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def rows_limit(self) -> int:
        """max_batch_rows, lowered for the rest of the engine's life after an out-of-memory error."""
        return self.scheduler.rows_limit

    def on_step(self, callback: Callable[[int, int], None] | None) -> None:
        """Call callback(rows running, rows the cache allows) after every decode step (occupancy metrics)."""
        self.scheduler.on_step = callback

    # --- requests in, results out ------------------------------------------------------------------

    def render(self, request: GenerationRequest) -> str:
        """The prompt text the model sees: chat messages through the chat template, raw prompts as they are."""
        if request.messages is not None:
            return self.tokenizer.apply_chat_template(
                request.messages, tokenize=False, add_generation_prompt=True, **request.params.chat_template_kwargs
            )
        assert request.prompt is not None, "a request needs a prompt or messages"
        return request.prompt

    @torch.inference_mode()
    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """One result per request, in input order; each with params.n samples in sample-index order."""
        assert self.idle, "generate() needs an idle engine (a worker drives it with submit and step instead)"
        for i, request in enumerate(requests):
            self.submit(i, request)
        results: dict[Hashable, GenerationResult] = {}
        while not self.idle:
            results.update(self.step())
        return [results[i] for i in range(len(requests))]

    @torch.inference_mode()
    def submit(self, key: Hashable, request: GenerationRequest) -> None:
        """Take a request to generate; its result comes out of a later step() under key (unique while in flight)."""
        assert key not in self._flights, f"request {key!r} is already being generated"
        error = request.params.problem() or self._check_request(request)
        if error is not None:
            self._ready.append((key, GenerationResult(0, [], error=error)))
            return
        try:
            text = self.render(request)
        except Exception as exc:  # a malformed conversation fails its own request, not the batch
            self._ready.append((key, GenerationResult(0, [], error=f"cannot render the prompt: {type(exc).__name__}: {exc}")))
            return
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        error = self._check_length(len(ids), request.params)
        if error is not None:
            self._ready.append((key, GenerationResult(len(ids), [], error=error)))
            return
        params = request.params
        thinking = prompt_opens_thinking(text) if request.messages is not None and self.marks_thinking else None
        if params.num_beams > 1:
            samples = beam_search(self.model, self.tokenizer, ids, params, self.eos_ids, self.device)
            self._ready.append((key, GenerationResult(len(ids), _apart(samples, thinking))))
            return
        rows = expand_rows(key, ids, params)
        self._flights[key] = InFlight(len(ids), params, len(rows), thinking=thinking)
        self.scheduler.add(rows)

    @torch.inference_mode()
    def step(self) -> list[tuple[Hashable, GenerationResult]]:
        """One scheduler step (static batches: every row submitted); the requests whose last row finished."""
        if not self.scheduler.idle:
            for finished in self.scheduler.step():
                self._row_done(finished)
        ready, self._ready = self._ready, []
        return ready

    def drop(self, keys: set[Hashable]) -> None:
        """Stop generating these requests (e.g. their job was cancelled): their waiting rows leave now, their
        running rows finish; no result comes out for them."""
        for key in keys & self._flights.keys():
            self._flights[key].error = DROPPED
        for row in self.scheduler.drop_waiting(lambda r: r.request in keys):
            self._row_gone(row.request)
        self._ready = [(key, result) for key, result in self._ready if key not in keys]

    @torch.inference_mode()  # the cache's tensors are inference tensors: zeroing them needs the same mode
    def clear(self) -> list[Hashable]:
        """Forget everything submitted (after an error the caller hands it all back); returns the keys."""
        keys = list(self._flights) + [key for key, _ in self._ready]
        self.scheduler.clear()
        self._flights.clear()
        self._ready = []
        return keys

    # --- finished rows become results ------------------------------------------------------------------

    def _row_done(self, finished: Finished) -> None:
        key = finished.row.request
        flight = self._flights.get(key)
        if flight is None:
            return
        if finished.error is not None and flight.error is None:
            flight.error = finished.error
            for row in self.scheduler.drop_waiting(lambda r: r.request == key):  # its other rows need not run
                self._row_gone(key)
        if finished.sample is not None:
            flight.samples[finished.row.sample_index] = finished.sample
        self._row_gone(key)

    def _row_gone(self, key: Hashable) -> None:
        flight = self._flights[key]
        flight.rows -= 1
        if flight.rows > 0:
            return
        del self._flights[key]
        if flight.error == DROPPED:
            return
        if flight.error is not None:
            self._ready.append((key, GenerationResult(flight.prompt_tokens, [], error=flight.error)))
            return
        samples = [flight.samples[k] for k in range(decoded_rows(flight.params))]
        samples = _apart(complete_greedy(samples, flight.params), flight.thinking)
        self._ready.append((key, GenerationResult(flight.prompt_tokens, samples)))

    # --- checks ---------------------------------------------------------------------

    def _check_request(self, request: GenerationRequest) -> str | None:
        """The first rule between fields the request breaks (contract.sampling, as the producer checks them)."""
        if (request.prompt is None) == (request.messages is None):
            return ONE_INPUT
        if request.messages is not None and not request.messages:
            return "messages: must not be empty"
        problems = combination_problems(lambda name: (getattr(request.params, name), ""))
        problems += chat_template_kwargs_problems(request.params.chat_template_kwargs, request.messages is not None)
        vocab = getattr(text_config(self.model), "vocab_size", None) or len(self.tokenizer)
        beyond = sorted(t for t in [*request.params.stop_token_ids, *request.params.logit_bias] if t >= vocab)
        if beyond:
            problems.append(f"token ids {beyond} are beyond the model's vocabulary of {vocab} (stop_token_ids, logit_bias)")
        if problems:
            return problems[0]
        constraint = request.params.constraint
        problem = constraint.problem() if constraint is not None else None
        return None if problem is None else f"structured output ({constraint.kind}) cannot be enforced: {problem}"

    def _check_length(self, prompt_tokens: int, params: SamplingParams) -> str | None:
        if prompt_tokens == 0:
            return "prompt is empty (0 tokens)"
        if prompt_tokens + params.max_new_tokens > self.context_length:
            return (
                f"prompt has {prompt_tokens} tokens; with max_new_tokens {params.max_new_tokens} "
                f"it exceeds the model's context of {self.context_length}"
            )
        return None


def _apart(samples: list[Sample], thinking: bool | None) -> list[Sample]:
    """The samples with their thinking kept apart (workers.reasoning), for a chat request to a thinking model."""
    return samples if thinking is None else [split_thinking(sample, thinking) for sample in samples]
