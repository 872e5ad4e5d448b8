"""CUDA graphs of the decode step: the whole forward pass of a step replayed by one launch instead of ~1,200.

An eager decode step on a GPU is bound by the host: at 256 rows of a 1B model the card was busy 23% of each step,
waiting for Python to launch the next of its kernels. A CUDA graph records a step's kernels once and replays them
with one call, so the step takes what the card needs. A graph replays fixed shapes and fixed addresses, so the
step it records is DecoderRunner.decode_graphable: rows padded to a bucket (ROW_STEPS per power of two), attention
over the cache's whole capacity, inputs read from the cache's own tensors (lengths) and one token buffer per bucket.

One set of graphs belongs to one KVCache (its tensors' addresses are baked in): when the scheduler reshapes the
cache, the graphs are dropped and recaptured for the new one as it is used. A bucket is captured at its
CAPTURE_AT-th step on the same cache (the steps before run the same function eagerly), so that shapes the
scheduler passes through while the batch fills or drains cost no capture. Every bucket's graph shares one
memory pool (they never run at once, and each step's logits are consumed before the next replay).

Not graphed (they run eagerly, as before): steps while some row reads the shared base (cascade attention), the
verify passes of speculative decoding, prefills, and the sampling after the forward pass. On a CPU the same
static step can run without capture (capture=False: the shapes and buffers of the GPU path, for tests).
"""
from __future__ import annotations

import logging
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from workers.batch import is_out_of_memory
from workers.decoder import DecoderRunner
from workers.kv_cache import KVCache

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
    """One bucket's step: tokens, the static input (each row's token, padding rows' included); run() performs the
    step (a graph replay, or the static step eagerly) and returns its logits (bucket, vocab), valid until the next run."""

    tokens: Tensor
    run: Callable[[], Tensor]


class DecodeGraphs:
    """The decode steps of one DecoderRunner through CUDA graphs, by row bucket, for the cache in use."""

    def __init__(self, runner: DecoderRunner, capture: bool | None = None) -> None:
        """capture: record CUDA graphs (default: when the model is on CUDA); False runs the same static step eagerly."""
        self.runner = runner
        self.capture = runner.model.device.type == "cuda" if capture is None else capture
        self._cache: weakref.ref[KVCache] | None = None
        self._graphs: dict[int, Graph] = {}
        self._steps: Counter[int] = Counter()
        """Steps per bucket on the current cache."""
        self._pool: tuple[int, int] | None = None
        self.recorded = 0
        """Buckets recorded over the object's life (as CUDA graphs when capturing; tests and logs)."""
        self.failed: str | None = None
        """Why recording a CUDA graph failed, if it did: every step is eager from then on."""

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
        self._steps[bucket] += 1
        graph = self._graphs.get(bucket)
        if graph is None:
            graph = Graph(torch.zeros(bucket, dtype=torch.long, device=tokens.device), lambda: torch.empty(0))
            graph.run = self._static(cache, graph.tokens)
            graph.tokens[:rows].copy_(tokens)
            logits = graph.run()  # eagerly: the step's result (and, before a capture, its warm-up)
            if self._steps[bucket] >= CAPTURE_AT:
                self._record_or_give_up(bucket, graph)
        else:
            graph.tokens[:rows].copy_(tokens)
            logits = graph.run()
        cache.advance()
        return logits[:rows]

    def clear(self) -> None:
        """Drop every graph (their cache is gone, or memory is needed back)."""
        self._graphs.clear()
        self._steps.clear()
        self._cache = None

    def _static(self, cache: KVCache, tokens: Tensor) -> Callable[[], Tensor]:
        runner = self.runner

        def step() -> Tensor:
            return runner.decode_graphable(cache, tokens)

        return step

    def _record_or_give_up(self, bucket: int, graph: Graph) -> None:
        """Record the bucket's graph; if the step cannot be captured (an operation a graph cannot hold: a model's
        quantized kernels, say), say why once and run every later step eagerly: slower, never wrong. Out of
        memory propagates (the scheduler retries with fewer rows)."""
        try:
            self._graphs[bucket] = self._record(graph)
        except Exception as exc:
            if is_out_of_memory(exc):
                raise
            self.failed = f"{type(exc).__name__}: {exc}"
            self.clear()
            log.warning("decode steps stay eager: recording a CUDA graph of %d rows failed (%s)", bucket, self.failed)

    def _record(self, graph: Graph) -> Graph:
        """The bucket's step as a CUDA graph, when capturing; as it is otherwise. Recording runs nothing: the
        caller's eager run of the same step just now did this step's work."""
        self.recorded += 1
        if not self.capture:
            return graph
        cuda_graph = torch.cuda.CUDAGraph()
        # thread_local: a worker's other threads (heartbeats, the store) may touch CUDA state meanwhile
        with torch.cuda.graph(cuda_graph, pool=self._pool, capture_error_mode="thread_local"):
            logits = graph.run()
        self._pool = cuda_graph.pool()

        def replay() -> Tensor:
            cuda_graph.replay()
            return logits

        return Graph(graph.tokens, replay)
