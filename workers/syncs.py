"""Where the host waits for the device: the one read of a decode step, and a counter that finds any other.

A GPU runs ahead of the Python that feeds it only while nothing asks it for a value: every `.item()`, `.tolist()`,
`bool(tensor)`, `int(tensor)` or copy to the host makes the host wait until the device has caught up, and the
device then idles while the host prepares the next step. The engine's decode step asks once, through host_read,
for everything the host needs of it (the new tokens and, for rows that ask, their logprobs); what the host needs
to plan (the rows' lengths, which rows sample how) it keeps itself (KVCache.host_lengths, SamplingGroups).

count_syncs() counts the other ways of asking, on any device (on a CPU they cost nothing, but the code paths are
the GPU's), so that a test without a GPU guards the rule; on CUDA, torch.cuda.set_sync_debug_mode says the same.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


def host_read(*tensors: Tensor) -> list[Any]:
    """Each tensor's values as Python lists, in one wait for the device: on CUDA every tensor is copied without
    blocking into pinned memory and one event is waited for; elsewhere they are read as they are."""
    return start_read(*tensors).values()


def sent(values: Tensor, device: torch.device) -> Tensor:
    """A host tensor on the device, without waiting for it: on CUDA through pinned memory (a copy from pageable
    memory may wait for the stream's queued work first, which would stall a step launched ahead; the caching
    host allocator keeps the pinned block until the copy is done)."""
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


class PendingRead:
    """Tensors' values on their way to the host (start_read): values() waits for them, once. Meanwhile the host
    may queue more work for the device (the next decode step): the copies were queued before it, so they hold
    the values as they were when the read started."""

    def __init__(self, tensors: tuple[Tensor, ...]) -> None:
        self._lists: list[Any] | None = None
        self._copies: list[Tensor] = []
        self._done: torch.cuda.Event | None = None
        if not tensors or tensors[0].device.type != "cuda":
            # on a CPU there is nothing to wait for, and the tensors may be written again before values()
            _count_read()
            with _inside():
                self._lists = [t.tolist() for t in tensors]
            return
        with _inside():
            self._copies = [t.to("cpu", non_blocking=True) for t in tensors]  # pinned memory: asynchronous copies
            self._done = torch.cuda.Event()
            self._done.record()

    def values(self) -> list[Any]:
        """Each tensor's values as Python lists (waits for the device the first time)."""
        if self._lists is None:
            _count_read()
            with _inside():
                assert self._done is not None
                self._done.synchronize()
                self._lists = [c.tolist() for c in self._copies]
        return self._lists


def start_read(*tensors: Tensor) -> PendingRead:
    """Start copying the tensors' values to the host; PendingRead.values() has them. Counted by count_syncs as one
    host_read, when the values are read (on a CPU: here, where they are)."""
    return PendingRead(tensors)


def _count_read() -> None:
    for counter in _counting:
        counter.add("host_read")


@dataclass
class SyncCounter:
    """What count_syncs() saw: the calls that read tensors' values on the host, by name (host_read's included)."""

    calls: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def add(self, name: str) -> None:
        if not _depth[0]:
            self.calls[name] = self.calls.get(name, 0) + 1

    def reset(self) -> None:
        self.calls.clear()


_counting: list[SyncCounter] = []
_depth = [0]
"""How deep the current call is inside a counted read: what a read does inside is the same read."""


@contextmanager
def _inside() -> Iterator[None]:
    _depth[0] += 1
    try:
        yield
    finally:
        _depth[0] -= 1


READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero")
"""Tensor methods that read values on the host (nonzero: its output's size depends on them)."""


def _reads_by_mask(index: Any) -> bool:
    """Indexing with a bool tensor (or a tuple holding one): its result's size depends on the mask's values."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(part, Tensor) and part.dtype == torch.bool for part in parts)


@contextmanager
def count_syncs() -> Iterator[SyncCounter]:
    """Count, while inside, every call that reads a tensor's values on the host: READS, mask indexing, and
    host_read (once per call, whatever it reads). Patches torch.Tensor for the duration: a diagnostic for tests
    and benchmarks, not for production, and not thread-safe."""
    counter = SyncCounter()
    originals = {name: getattr(Tensor, name) for name in (*READS, "__getitem__", "__setitem__")}

    def counting(name: str) -> Any:
        original = originals[name]

        def wrapper(self: Tensor, *args: Any, **kwargs: Any) -> Any:
            counter.add(name)
            with _inside():
                return original(self, *args, **kwargs)

        return wrapper

    def getitem(self: Tensor, index: Any) -> Any:
        if _reads_by_mask(index):
            counter.add("mask index")
        with _inside():
            return originals["__getitem__"](self, index)

    def setitem(self: Tensor, index: Any, value: Any) -> None:
        if _reads_by_mask(index):
            counter.add("mask index")
        with _inside():
            originals["__setitem__"](self, index, value)

    for name in READS:
        setattr(Tensor, name, counting(name))
    Tensor.__getitem__, Tensor.__setitem__ = getitem, setitem  # type: ignore[method-assign]
    _counting.append(counter)
    try:
        yield counter
    finally:
        _counting.remove(counter)
        for name, original in originals.items():
            setattr(Tensor, name, original)
