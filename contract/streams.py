"""Cutting a stream into lists of a bounded size: pages of Redis keys, groups of ids per message, chunks of rows
per insert. Memory stays bounded by one list, whatever the stream's length."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import TypeVar

T = TypeVar("T")


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """The items in order, in lists of `size` (the last one shorter)."""
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk
