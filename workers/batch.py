"""The one batch interface the engine drives, whichever way the rows are decoded.

`Scheduler` (workers.scheduler: continuous batching over a slot KV cache, the architectures of workers.architectures) and `StaticScheduler`
(workers.static_batches: static batches on transformers' forward, every other architecture) both take rows with
add(), give finished rows back from step(), and can drop waiting rows or forget everything; the engine holds one
of them and never asks which.
"""
from __future__ import annotations

from collections.abc import Callable, Sized
from dataclasses import dataclass
from typing import Protocol

import torch

from workers.rows import Row
from workers.types import Sample


@dataclass
class Finished:
    """A row that left the batch: its Sample, or why it failed."""

    row: Row
    sample: Sample | None
    error: str | None = None


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA out-of-memory error, or the CPU allocator failing to get memory."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    message = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


def out_of_memory_alone(row: Row, exc: BaseException) -> Finished:
    """The policy's last step: a row that runs out of memory in a batch of one fails (nothing smaller is left to try)."""
    return Finished(row, None, f"out of memory with a batch of one row: {exc}")


def halved(rows_limit: int, rows: int) -> int:
    """The rows limit after running out of memory with `rows` rows: at most half of them (at least one)."""
    return max(1, min(rows_limit, rows) // 2)


class BatchScheduler(Protocol):
    """What the engine needs of a scheduler (see the module docstring)."""

    waiting: Sized
    rows_limit: int
    """The most rows decoded together, lowered for the scheduler's life after an out-of-memory error."""
    eos_ids: frozenset[int]
    on_step: Callable[[int, int], None] | None
    """Called after every decode step with (rows running, rows the batch could hold): occupancy."""

    @property
    def idle(self) -> bool: ...

    @property
    def running(self) -> int: ...

    def add(self, rows: list[Row]) -> None: ...

    def step(self) -> list[Finished]: ...

    def drop_waiting(self, unwanted: Callable[[Row], bool]) -> list[Row]: ...

    def clear(self) -> list[Row]: ...
