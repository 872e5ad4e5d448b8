"""The inputs `producer submit` reads, each streamed as one outcome per row (producer.reader.LineOutcome):
a request ready to store, or the reasons the row is invalid, with its position.

- JSONL (any file that is not one of the others): one JSON object per line, native or OpenAI Batch
  (producer.reader); the position is the line number.
- Rows in Python (a list, a generator, any iterable of dicts, native or OpenAI Batch): each held to what
  a JSONL line may hold (its size too); the position is the row number, from 1. Read once, as it is validated.
- Tables (producer.tables): a Parquet file, a CSV file, a directory written by `datasets`' save_to_disk, or
  in memory a pyarrow.Table, a pandas.DataFrame or a datasets.Dataset; columns are mapped to fields and the
  other columns kept as the request's metadata; the position is the row number, from 1.

Every format is held to the same bounds (producer.limits): a row of at most 1 MiB, a table of at most 1,024
columns, and a path that is a regular file or a directory.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from contract.errors import EmptyInput, InputFileError
from producer.limits import check_path
from producer.reader import LineOutcome, RowChecker, read_requests


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


@dataclass(frozen=True)
class RowsInput:
    rows: Iterable[Any]
    name: str = "rows"
    path: str = "<rows from Python>"
    unit: str = "row"

    def outcomes(self, defaults: Mapping[str, Any], context_length: int) -> Iterator[LineOutcome]:
        checker = RowChecker(defaults, context_length, unit=self.unit)
        position = 0
        for position, row in enumerate(self.rows, 1):
            yield checker.check_value(position, row)
        if position == 0:
            raise EmptyInput("no rows: the iterable is empty")


def open_input(source: Any, columns: Mapping[str, str] | None = None, csv_nulls: Sequence[str] = ()) -> Input:
    """The input `source` names; raises InputFileError when it cannot be read, InvalidDefaults when `columns`
    (field -> column, for tables only) names an unknown field. `csv_nulls`: the CSV cells read as null besides
    an empty one (none by default)."""
    from producer import table_sources, tables

    if isinstance(source, (JsonlInput, RowsInput, tables.TableInput)):
        return source
    csv_nulls = (csv_nulls,) if isinstance(csv_nulls, str) else tuple(csv_nulls)
    only_csv = "null words (--csv-null) are for CSV and TSV inputs only"
    if not isinstance(source, (str, bytes, os.PathLike)):
        if csv_nulls:
            raise InputFileError(only_csv)
        table = table_sources.in_memory(source)
        if table is not None:
            return tables.TableInput.of(table, columns)
        if isinstance(source, Mapping):
            raise InputFileError("a single dict is not an input: give a list (or any iterable) of dicts")
        if isinstance(source, Iterable):
            if columns:
                raise InputFileError("column options are for Parquet, CSV and dataset inputs, not rows of dicts")
            return RowsInput(source)
        raise InputFileError(f"cannot read a {type(source).__name__} as an input: give a path, a table or an iterable of dicts")
    path = os.fspath(source)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    check_path(path)  # missing, a link loop, a device or a FIFO: refused before anything reads it
    table = table_sources.open_path(path, csv_nulls)
    if csv_nulls and (table is None or not table.text_only):
        raise InputFileError(f"{path}: {only_csv}")
    if table is not None:
        return tables.TableInput.of(table, columns)
    if os.path.isdir(path):
        raise InputFileError(f"{path}: is a directory, not a file (a directory must be one saved by datasets' save_to_disk)")
    if columns:
        raise InputFileError(f"{path}: column options are for Parquet, CSV and dataset inputs, not JSONL")
    return JsonlInput(path)
