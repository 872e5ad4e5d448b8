"""CUDA graphs of the decode step: a step's forward pass and its draw replayed by two launches instead of ~1,700.

An eager decode step on a GPU is bound by the host: at 256 rows of a 1B model the card was busy 23% of each step,
waiting for Python to launch the next of its kernels. A CUDA graph records a step's kernels once and replays them
with one call, so the step takes what the card needs. A graph replays fixed shapes and fixed addresses, so the
step it records is DecoderRunner.decode_graphable: rows padded to a bucket (ROW_STEPS per power of two), attention
over the cache's whole capacity, inputs read from the cache's own tensors (lengths) and one token buffer per bucket.

Two kinds, each by row bucket: DecodeGraphs, the forward pass; SamplingGraphs, the draw of every running row
(workers.sampling.sort_free_tokens: ~500 small kernels of bisection passes, which the eager step launched one by
one). What a row needs beyond the filters (logit bias, penalties, grammars) is applied eagerly before the draw.

Decode graphs belong to one KVCache (its tensors' addresses are baked in): when the scheduler reshapes the cache,
they are dropped and recaptured for the new one as it is used. A bucket is captured at its CAPTURE_AT-th run (the
runs before run the same function eagerly), so that shapes the scheduler passes through while the batch fills or
drains cost no capture. Each kind's graphs share one memory pool (they never run at once, and a run's output is
consumed before the next replay). A graph that cannot be recorded leaves its kind eager, said once in the log.

Not graphed (they run eagerly, as before): steps while some row reads the shared base (cascade attention), the
verify passes of speculative decoding and their draws, and prefills. On a CPU the same static functions can run
without capture (capture=False: the shapes and buffers of the GPU path, for tests).
"""
from __future__ import annotations

import logging
import weakref
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch
from torch import Tensor

from workers.batch import is_out_of_memory
from workers.decoder import DecoderRunner
from workers.kv_cache import KVCache
from workers.sampling import Filters, RowParams, sort_free_tokens

log = logging.getLogger(__name__)

ROW_STEPS = 4
"""Buckets per power of two of the rows a graph runs (at most 25% padding rows): 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14,
16, 20, 24, 28, 32, 40, ..."""
CAPTURE_AT = 2
"""A bucket is captured at its second step on the same cache: the first runs eagerly (and warms up what the
capture needs: cuBLAS handles, the allocator's blocks)."""


def row_bucket(rows: int, slots: int, min_rows: int = 1) -> int:
    """The rows a graph for `rows` running rows runs: rows rounded up to the next of ROW_STEPS steps per power of
    two, at least min_rows (batch invariance's padding), at most the cache's slots."""
    step = max(1, (1 << (max(1, rows).bit_length() - 1)) // ROW_STEPS)
    return min(max(-(-rows // step) * step, min_rows), slots)


@dataclass
class Graph:
    """One bucket's work: its static inputs (filled before each run) and run(), which performs it (a graph replay,
    or the same function eagerly) and returns its output, valid until the next run of any graph of its owner."""

    inputs: dict[str, Tensor]
    run: Callable[[], Tensor]


class BucketGraphs:
    """Graphs by bucket, each recorded at its CAPTURE_AT-th run (the runs before are eager, and warm up what the
    capture needs), all in one memory pool; a bucket that cannot be recorded leaves every later run eager."""

    def __init__(self, capture: bool, what: str) -> None:
        """capture: record CUDA graphs; False runs the same static functions eagerly (a CPU's tests)."""
        self.capture = capture
        self.what = what
        self._graphs: dict[tuple[int, Hashable], Graph] = {}
        """By (rows, what else fixes the function): (bucket, None) for decode steps, (bucket, Filters) for draws."""
        self._runs: Counter[tuple[int, Hashable]] = Counter()
        self._pool: tuple[int, int] | None = None
        self.recorded = 0
        """Buckets recorded over the object's life (as CUDA graphs when capturing; tests and logs)."""
        self.failed: str | None = None
        """Why recording a CUDA graph failed, if it did: callers run eagerly from then on."""

    def clear(self) -> None:
        """Drop every graph (what they hold is gone, or its memory is needed back)."""
        self._graphs.clear()
        self._runs.clear()

    def run(self, key: tuple[int, Hashable], make: Callable[[], Graph], fill: Callable[[Graph], None]) -> Tensor:
        """The output of key's graph (made by make() until recorded) with its inputs filled by fill()."""
        self._runs[key] += 1
        graph = self._graphs.get(key)
        if graph is not None:
            fill(graph)
            return graph.run()
        graph = make()
        fill(graph)
        out = graph.run()  # eagerly: this run's result (and, before a capture, its warm-up)
        if self._runs[key] >= CAPTURE_AT:
            self._record_or_give_up(key, graph)
        return out

    def _record_or_give_up(self, key: tuple[int, Hashable], graph: Graph) -> None:
        """Record the bucket's graph; if it cannot be captured (an operation a graph cannot hold: a model's
        quantized kernels, say), say why once and leave every later run eager: slower, never wrong. Out of memory
        propagates (the scheduler retries with fewer rows)."""
        try:
            self._graphs[key] = self._record(graph)
        except Exception as exc:
            if is_out_of_memory(exc):
                raise
            self.failed = f"{type(exc).__name__}: {exc}"
            self.clear()
            log.warning("%s stay eager: recording a CUDA graph of %d rows failed (%s)", self.what, key[0], self.failed)

    def _record(self, graph: Graph) -> Graph:
        """The graph recorded, when capturing; as it is otherwise. Recording runs nothing: the caller's eager run
        of the same inputs just now did this run's work."""
        self.recorded += 1
        if not self.capture:
            return graph
        cuda_graph = torch.cuda.CUDAGraph()
        # thread_local: a worker's other threads (heartbeats, the store) may touch CUDA state meanwhile
        with torch.cuda.graph(cuda_graph, pool=self._pool, capture_error_mode="thread_local"):
            out = graph.run()
        self._pool = cuda_graph.pool()

        def replay() -> Tensor:
            cuda_graph.replay()
            return out

        return Graph(graph.inputs, replay)


class DecodeGraphs(BucketGraphs):
    """The decode steps of one DecoderRunner through CUDA graphs, by row bucket, for the cache in use."""

    def __init__(self, runner: DecoderRunner, capture: bool | None = None, compile: bool = False) -> None:
        """capture: record CUDA graphs (default: when the model is on CUDA); False runs the same static step eagerly.
        compile: the static step through torch.compile first (inductor fuses the elementwise work between the
        products into fewer kernels; the graphs then record those), compiled at a bucket's first, eager run."""
        super().__init__(runner.model.device.type == "cuda" if capture is None else capture, "decode steps")
        self.runner = runner
        self._cache: weakref.ref[KVCache] | None = None
        rope = runner.host_bound_rope
        if rope is not None:
            self.failed = f"the {rope} rope type reads the step's positions on the host"
        self.compiled: Callable[[KVCache, Tensor], Tensor] | None = None
        if compile:
            # The default mode: no CUDA graphs of its own ("reduce-overhead": ours record the step, the draw beside
            # it) and no autotuning of the products ("max-autotune": minutes per shape, against cuBLAS's choice).
            self.compiled = torch.compile(runner.decode_graphable)
        self.compile_failed: str | None = None
        """Why torch.compile could not compile the step, if it could not: steps run uncompiled from then on."""

    def forward(self, cache: KVCache, tokens: Tensor) -> Tensor:
        """runner.decode_graphable, compiled when asked and compiling works; a compilation that fails says why once
        and leaves the step uncompiled (out of memory propagates)."""
        if self.compiled is not None:
            try:
                return self.compiled(cache, tokens)
            except Exception as exc:
                if is_out_of_memory(exc):
                    raise
                self.compile_failed, self.compiled = f"{type(exc).__name__}: {exc}"[:2000], None
                log.warning("decode steps run uncompiled: torch.compile failed (%s)", self.compile_failed)
        return self.runner.decode_graphable(cache, tokens)

    @staticmethod
    def eligible(cache: KVCache) -> bool:
        """Whether a step on this cache can be graphed: no row reads the base (its cascade stays eager)."""
        return not cache.uses_base

    def decode(self, cache: KVCache, tokens: Tensor) -> Tensor:
        """DecoderRunner.decode's result (logits (rows, vocab) of rows 0..len(tokens)-1), through the bucket's graph
        when the step can be graphed; the cache advances either way. The logits are valid until the next call."""
        if self.failed is not None or not self.eligible(cache):
            return self.runner.decode(cache, tokens)
        if self._cache is None or self._cache() is not cache:
            self.clear()
            self._cache = weakref.ref(cache)
        rows = tokens.shape[0]
        assert rows == cache.rows, f"decode feeds {rows} tokens to a batch of {cache.rows} rows"
        bucket = row_bucket(rows, cache.slots, self.runner.min_rows)
        held = self._cache  # a weak reference: a cache the scheduler dropped is freed at once

        def make() -> Graph:
            inputs = {"tokens": torch.zeros(bucket, dtype=torch.long, device=tokens.device)}
            return Graph(inputs, lambda: self.forward(_alive(held), inputs["tokens"]))

        def fill(graph: Graph) -> None:
            graph.inputs["tokens"][:rows].copy_(tokens)

        logits = self.run((bucket, None), make, fill)
        cache.advance()
        return logits[:rows]

    def clear(self) -> None:
        super().clear()
        self._cache = None


def _alive(held: weakref.ref[KVCache]) -> KVCache:
    cache = held()
    assert cache is not None, "a graph ran for a cache that is gone"
    return cache


class SamplingGraphs(BucketGraphs):
    """A step's draw for every running row (workers.sampling.sort_free_tokens) through CUDA graphs, by row bucket:
    the ~500 small kernels of the sort-free filters in one launch. The logits (already penalised), the rows'
    parameters and their uniforms are copied into the bucket's buffers; padding rows draw from what their buffers
    last held, and their tokens are dropped."""

    def __init__(self, capture: bool) -> None:
        super().__init__(capture, "draws")

    def tokens(self, logits: Tensor, params: RowParams, uniform: Tensor, filters: Filters) -> Tensor:
        """sort_free_tokens(logits, params, uniform, filters), valid until the next call."""
        assert params.min_p is not None, "a running batch's RowParams always has min_p (RowParams.build)"
        rows, vocab = logits.shape
        bucket = row_bucket(rows, 2 * rows)
        device = logits.device

        def make() -> Graph:
            inputs = {
                "logits": torch.zeros((bucket, vocab), dtype=torch.float32, device=device),
                "temperature": torch.ones(bucket, dtype=torch.float32, device=device),
                "top_k": torch.zeros(bucket, dtype=torch.long, device=device),
                "top_p": torch.ones(bucket, dtype=torch.float32, device=device),
                "min_p": torch.zeros(bucket, dtype=torch.float32, device=device),
                "uniform": torch.zeros(bucket, dtype=torch.float64, device=device),
            }
            given = RowParams(inputs["temperature"], inputs["top_k"], inputs["top_p"], inputs["temperature"], inputs["min_p"])
            return Graph(inputs, lambda: sort_free_tokens(inputs["logits"], given, inputs["uniform"], filters))

        def fill(graph: Graph) -> None:
            values = {
                "logits": logits, "temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p,
                "min_p": params.min_p, "uniform": uniform,
            }
            for name, value in values.items():
                graph.inputs[name][:rows].copy_(value)

        return self.run((bucket, filters), make, fill)[:rows]
