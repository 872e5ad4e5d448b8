"""The inputs `producer submit` reads, each streamed as one outcome per row (producer.reader.LineOutcome):
a request ready to store, or the reasons the row is invalid, with its position.

- JSONL (any file that is not one of the others): one JSON object per line, native or OpenAI Batch
  (producer.reader); the position is the line number.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from contract.errors import InputFileError
from producer.reader import LineOutcome, read_requests


class Input(Protocol):
    name: str
    """How messages name it: `prompts.jsonl:17: reason`."""
    path: str
    """What the job records as its source (and `--resume` is told to pass again)."""
    unit: str
    """What a position counts: 'line' or 'row'."""

    def outcomes(self, defaults: Mapping[str, Any], context_length: int) -> Iterator[LineOutcome]: ...


@dataclass(frozen=True)
class JsonlInput:
    path: str
    unit: str = "line"

    @property
    def name(self) -> str:
        return Path(self.path).name

    def outcomes(self, defaults: Mapping[str, Any], context_length: int) -> Iterator[LineOutcome]:
        return read_requests(self.path, defaults, context_length)


def open_input(source: Any, columns: Mapping[str, str] | None = None) -> Input:
    """The input `source` names; raises InputFileError when it cannot be read."""
    if isinstance(source, (JsonlInput,)):
        return source
    try:
        path = os.fspath(source)
    except TypeError:
        raise InputFileError(f"cannot read {type(source).__name__} as an input: give a path") from None
    if not os.path.exists(path):
        raise InputFileError(f"{path}: no such file")
    if os.path.isdir(path):
        raise InputFileError(f"{path}: is a directory, not a file")
    if columns:
        raise InputFileError(f"{path}: column options are for Parquet, CSV and dataset inputs, not JSONL")
    return JsonlInput(path)
