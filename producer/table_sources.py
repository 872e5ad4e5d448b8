"""Where a table input's record batches come from: a Parquet file, a CSV/TSV file, a directory saved by `datasets`'
save_to_disk, or an in-memory pyarrow.Table, pandas.DataFrame or datasets.Dataset, each a TableSource read in
bounded memory (producer.tables turns its batches into rows). Nothing here imports pandas or datasets: in-memory
objects are recognised by their module and attributes."""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contract.errors import EmptyInput, InputFileError
from producer.limits import batch_rows

if TYPE_CHECKING:
    import pyarrow as pa

BATCH_ROWS = 8192
"""Rows per record batch read from a table (bounded memory whatever its size; fewer for a wide one: limits.batch_rows)."""
_PARQUET_MAGIC = b"PAR1"
_ARROW_MAGIC = b"ARROW1"


@dataclass
class TableSource:
    """A table's schema and its record batches, in order; `text_only` for CSV (every cell read as a string)."""

    name: str
    path: str
    schema: pa.Schema
    batches: Callable[[], Iterator[pa.RecordBatch]]
    text_only: bool = False
    null_words: tuple[str, ...] = ()
    """CSV: the cells read as null besides an empty one (`submit --csv-null`); the job records them for --resume."""


def _arrow_error(name: str, exc: BaseException) -> InputFileError:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return InputFileError(f"{name}: cannot be read ({text})")


def open_path(path: str, null_words: Sequence[str] = ()) -> TableSource | None:
    """The table at `path` (by its bytes, else its name), or None when it is not one (JSONL). `null_words`: CSV
    cells read as null besides an empty one (none by default: a CSV cell is the text it holds)."""
    name = Path(path).name
    if os.path.isdir(path):
        return _saved_dataset(path) if _is_saved_dataset(path) else None
    suffix = Path(path).suffix.lower()
    try:
        with open(path, "rb") as file:
            head = file.read(8)
    except OSError as exc:
        raise InputFileError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if head.startswith(_PARQUET_MAGIC) or suffix in (".parquet", ".pq"):
        if not head.startswith(_PARQUET_MAGIC):
            raise InputFileError(f"{name}: not a Parquet file (it does not start with PAR1)")
        return _parquet(path)
    if head.startswith(_ARROW_MAGIC) or suffix in (".arrow", ".feather"):
        return _arrow_files(path, name, [path])
    if suffix in (".csv", ".tsv"):
        from producer.csv_source import open_csv

        return open_csv(path, delimiter="\t" if suffix == ".tsv" else ",", null_words=tuple(null_words))
    return None


def _parquet(path: str) -> TableSource:
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = Path(path).name
    try:
        file = pq.ParquetFile(path)
        schema = file.schema_arrow
    except (pa.ArrowException, OSError) as exc:
        raise _arrow_error(name, exc) from None

    def batches() -> Iterator[pa.RecordBatch]:
        # no pre-buffering and no reader threads: a row group is decoded page by page (measured: 20 MiB less peak RSS
        # over 1M rows, no slower: validation, not decoding, takes the time)
        reader = pq.ParquetFile(path, memory_map=True, pre_buffer=False)
        try:
            yield from reader.iter_batches(batch_size=batch_rows(len(schema), BATCH_ROWS), use_threads=False)
        except (pa.ArrowException, OSError) as exc:
            raise _arrow_error(name, exc) from None
        finally:
            reader.close()

    return TableSource(name, path, schema, batches)


def _is_saved_dataset(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json"))


def _saved_dataset(path: str) -> TableSource:
    """A directory written by Dataset.save_to_disk: Arrow IPC streams listed in state.json."""
    name = Path(path).name or path
    if os.path.exists(os.path.join(path, "dataset_dict.json")):
        splits = sorted(p.name for p in Path(path).iterdir() if (p / "state.json").exists())
        raise InputFileError(f"{name}: a DatasetDict (several splits); give one split's directory: "
                             + ", ".join(os.path.join(path, s) for s in splits))
    if not os.path.isfile(os.path.join(path, "state.json")):  # a FIFO there would block the read
        raise InputFileError(f"{name}: state.json is not a regular file")
    try:
        with open(os.path.join(path, "state.json"), encoding="utf-8") as file:
            state = json.load(file)
        files = [os.path.join(path, entry["filename"]) for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputFileError(f"{name}: state.json does not list the dataset's files ({exc})") from None
    if not files:
        raise EmptyInput(f"{name}: the dataset has no data files")
    return _arrow_files(path, name, files)


def _open_ipc(file: str) -> Any:
    import pyarrow as pa

    source = pa.memory_map(file)
    try:
        return pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        return pa.ipc.open_file(source)


def _arrow_files(path: str, name: str, files: list[str]) -> TableSource:
    """Arrow IPC files (the stream format datasets writes, or the file format), memory-mapped, read in turn."""
    import pyarrow as pa

    for file in files:
        if not os.path.isfile(file):
            raise InputFileError(f"{name}: {Path(file).name} is missing")
    try:
        schema = _open_ipc(files[0]).schema
    except (pa.ArrowException, OSError) as exc:
        raise _arrow_error(name, exc) from None

    def batches() -> Iterator[pa.RecordBatch]:
        try:
            for file in files:
                reader = _open_ipc(file)
                if not reader.schema.equals(schema, check_metadata=False):
                    raise InputFileError(f"{name}: {Path(file).name} has other columns than {Path(files[0]).name}")
                if isinstance(reader, pa.ipc.RecordBatchFileReader):
                    for i in range(reader.num_record_batches):
                        yield from _rebatch(reader.get_batch(i))
                else:
                    for batch in reader:
                        yield from _rebatch(batch)
        except (pa.ArrowException, OSError) as exc:
            raise _arrow_error(name, exc) from None

    return TableSource(name, path, schema, batches)


def _rebatch(batch: pa.RecordBatch) -> Iterator[pa.RecordBatch]:
    rows = batch_rows(batch.num_columns, BATCH_ROWS)
    for start in range(0, batch.num_rows, rows):
        yield batch.slice(start, rows)


def in_memory(value: Any) -> TableSource | None:
    """A pyarrow.Table (or RecordBatch), pandas.DataFrame or datasets.Dataset as a source; None for anything else.
    Recognised by module and attributes: pandas and datasets are never imported here."""
    module = type(value).__module__ or ""
    kind = type(value).__name__
    if module.startswith("pyarrow") and kind in ("Table", "RecordBatch"):
        import pyarrow as pa

        table = pa.Table.from_batches([value]) if kind == "RecordBatch" else value
        return _memory_source(f"<{kind}>", table.schema, lambda: iter(table.to_batches(max_chunksize=batch_rows(table.num_columns, BATCH_ROWS))))
    if module.startswith("pandas") and kind == "DataFrame":
        return _dataframe(value)
    if module.startswith("datasets") and callable(getattr(value, "with_format", None)) and hasattr(value, "features"):
        if not hasattr(value, "__len__"):
            raise InputFileError("an IterableDataset: give a datasets.Dataset (or iterate it into a list of dicts)")
        return _dataset(value)
    return None


def _memory_source(name: str, schema: pa.Schema, batches: Callable[[], Iterator[pa.RecordBatch]]) -> TableSource:
    return TableSource(name, f"{name} from Python", schema, batches)


def _dataframe(frame: Any) -> TableSource:
    import pyarrow as pa

    columns = list(frame.columns)
    bad = [c for c in columns if not isinstance(c, str)]
    if bad:
        raise InputFileError(f"DataFrame: column names must be strings, got {', '.join(map(repr, bad[:5]))}")
    if len(set(columns)) != len(columns):
        raise InputFileError("DataFrame: a column name is used twice")
    try:
        table = pa.Table.from_pandas(frame, preserve_index=False)
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise InputFileError(f"DataFrame: cannot be read as a table ({str(exc).splitlines()[0]}); "
                             "a column must hold values of one kind") from None
    table = table.replace_schema_metadata(None)
    return _memory_source("<DataFrame>", table.schema, lambda: iter(table.to_batches(max_chunksize=batch_rows(table.num_columns, BATCH_ROWS))))


def _dataset(dataset: Any) -> TableSource:
    """A datasets.Dataset, through its own Arrow view (which applies a select/shuffle/filter's indices)."""
    arrow = dataset.with_format("arrow")
    schema = getattr(getattr(dataset, "data", None), "schema", None)
    if schema is None:
        schema = next(iter(arrow.iter(batch_size=1))).schema
    columns = set(dataset.column_names)
    schema = _select(schema, [n for n in schema.names if n in columns])

    def batches() -> Iterator[pa.RecordBatch]:
        for table in arrow.iter(batch_size=batch_rows(len(schema), BATCH_ROWS)):
            yield from table.select(schema.names).to_batches()

    return _memory_source("<Dataset>", schema, batches)


def _select(schema: pa.Schema, names: list[str]) -> pa.Schema:
    import pyarrow as pa

    return pa.schema([schema.field(n) for n in names])
