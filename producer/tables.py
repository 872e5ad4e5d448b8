"""Table inputs: Parquet, CSV, a directory saved by `datasets`' save_to_disk, and in-memory tables
(pyarrow.Table, pandas.DataFrame, datasets.Dataset), each read as record batches in bounded memory and
turned into rows that producer.reader.RowChecker validates exactly as it does JSONL lines.

Columns map to fields: `prompt`, `messages`, `custom_id` and the sampling fields (max_new_tokens,
temperature, top_p, top_k, seed, n, stop, ...). A field takes the column the mapping names, else the column
named as the field. Every other column is kept in the request's metadata under its own name, so results
can be joined back (producer.export.write_joined). A null cell means "not given" (a null prompt is an
error); a NaN float is null; values JSON cannot carry become JSON (timestamps, dates and times as ISO 8601
strings, durations as seconds, decimals as strings, bytes as base64, numpy scalars as numbers).

CSV has no types: every cell is read as the text it holds. Only an unquoted empty cell is null ("not given";
a quoted "" is the empty string); pyarrow's null words (NA, null, N/A, nan, NULL, ...) are text, unless the
user names them (`submit --csv-null NA`, recorded with the job for --resume). Sampling fields are parsed
from the text (integers, finite numbers, true/false, a stop string or a JSON array of them; `nan` is refused
as not a number), `messages` from JSON text; metadata keeps the text as it is.

Where the batches come from is producer.table_sources (nothing there imports pandas or datasets: in-memory
objects are recognised by their module and attributes). A DataFrame is converted to one Arrow table (it is in
memory already; a column of mixed kinds is refused); a Dataset is read through its own Arrow view, batch by batch,
with any select/shuffle/filter applied.
"""
from __future__ import annotations

import base64
import datetime
import decimal
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from contract.errors import EmptyInput, InputFileError, InvalidDefaults
from producer.limits import MAX_ROW_BYTES, check_columns, row_too_large
from producer.reader import LineOutcome, RowChecker, _unstorable_string
from producer.schema import ONE_INPUT, PromptLine, show, validate_line
from producer.table_sources import TableSource

if TYPE_CHECKING:
    import pyarrow as pa

INPUT_FIELDS = ("prompt", "messages", "custom_id")
SAMPLING_FIELDS = tuple(name for name in PromptLine.model_fields if name not in (*INPUT_FIELDS, "metadata"))
FIELDS = (*INPUT_FIELDS, *SAMPLING_FIELDS)
"""What a column can be mapped to; `metadata` is not one: it is every column not mapped."""
_INT_FIELDS = frozenset({"max_new_tokens", "top_k", "seed", "n", "num_beams", "top_logprobs", "min_tokens"})
_BOOL_FIELDS = frozenset({"logprobs", "ignore_eos"})
_LIST_FIELDS = frozenset({"stop", "stop_token_ids", "logit_bias", "chat_template_kwargs"})
"""Fields a CSV cell gives as JSON text (a list, or an object) when it starts with [ or {."""


# --- the column mapping -----------------------------------------------------------------------

def resolve_fields(source: TableSource, columns: Mapping[str, str] | None) -> dict[str, str]:
    """field -> column: the mapping given (checked), then each unmapped field's namesake column."""
    given = dict(columns or {})
    for key, column in given.items():
        if key not in FIELDS:
            import difflib

            close = difflib.get_close_matches(str(key), FIELDS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            if key == "metadata":
                hint = " (metadata is every column not mapped to a field)"
            raise InvalidDefaults(f"--column: unknown field {show(key)}{hint}; fields: {', '.join(FIELDS)}")
        if not isinstance(column, str) or not column:
            raise InvalidDefaults(f"--column {key}: the column must be a non-empty name, got {show(column)}")
    seen: dict[str, str] = {}
    for key, column in given.items():
        if column in seen:
            raise InvalidDefaults(f"--column: column {column!r} is mapped to both {seen[column]} and {key}")
        seen[column] = key
    names = source.schema.names
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise InputFileError(f"{source.name}: a column name is used twice: {_list(twice)}")
    for key, column in given.items():
        if column not in names:
            raise InputFileError(f"{source.name}: no column {column!r} (for {key}); its columns: {_list(names)}")
    fields = dict(given)
    for key in FIELDS:
        if key not in fields and key in names and key not in seen:
            fields[key] = key
    if "prompt" not in fields and "messages" not in fields:
        raise InputFileError(f"{source.name}: no prompt column: name one 'prompt' or 'messages', or give "
                             f"--prompt-column / --messages-column; its columns: {_list(names)}")
    return {key: fields[key] for key in FIELDS if key in fields}


def _list(names: list[str]) -> str:
    shown = ", ".join(map(repr, names[:30]))
    return shown + (f" and {len(names) - 30} more" if len(names) > 30 else "") if names else "(none)"


# --- cells to JSON values -----------------------------------------------------------------------

class _Unstorable(ValueError):
    pass


def jsonable(value: Any) -> Any:
    """A cell's Python value (from Arrow's to_pylist) as a JSON value; raises _Unstorable for an infinite number."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            raise _Unstorable(f"the number {value} is not allowed (JSON cannot carry it)")
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item) and getattr(value, "ndim", None) == 0:
        return jsonable(item())
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return jsonable(tolist())
    iso = getattr(value, "isoformat", None)  # pandas.Timestamp and the like
    if callable(iso):
        return iso()
    raise _Unstorable(f"a {type(value).__name__} is not a JSON value")


def _plain(kind: pa.DataType) -> bool:
    """Arrow types whose Python values are JSON values already (strings, integers, booleans, null)."""
    import pyarrow.types as t

    return t.is_string(kind) or t.is_large_string(kind) or t.is_integer(kind) or t.is_boolean(kind) or t.is_null(kind) \
        or getattr(t, "is_string_view", lambda _: False)(kind)


def _column_values(column: pa.Array, name: str, keep_floats: bool = False) -> tuple[list[Any], dict[int, str]]:
    """A column's cells as JSON values, and {index: reason} for the cells that cannot be one.
    `keep_floats`: an infinite number stays (a field's check refuses it by the field's name); NaN is null."""
    import pyarrow.compute as pc
    import pyarrow.types as t

    kind = column.type
    if t.is_dictionary(kind):
        column, kind = column.cast(kind.value_type), kind.value_type
    if _plain(kind):
        return column.to_pylist(), {}
    if t.is_floating(kind):
        if column.null_count == len(column) or not pc.any(pc.invert(pc.is_finite(column))).as_py():
            return column.to_pylist(), {}
        if keep_floats:
            return [None if v is not None and math.isnan(v) else v for v in column.to_pylist()], {}
    values = column.to_pylist()
    errors: dict[int, str] = {}
    for i, value in enumerate(values):
        try:
            values[i] = jsonable(value)
        except (_Unstorable, RecursionError) as exc:
            values[i] = None
            errors[i] = f"column {name!r}: {exc}"
    return values, errors


def _from_text(key: str, text: str) -> Any:
    """A sampling field's value from a CSV cell; the text itself when it does not parse (the check then says why)."""
    stripped = text.strip()
    try:
        if key in _INT_FIELDS:
            return int(stripped)
        if key in _BOOL_FIELDS:
            lowered = stripped.lower()
            return {"true": True, "false": False}.get(lowered, text)
        if key in _LIST_FIELDS:
            if stripped.startswith(("[", "{")):
                return json.loads(stripped)
            return text
        number = float(stripped)
        return number if math.isfinite(number) else text
    except ValueError:
        return text


def _messages_value(value: Any, column: str) -> tuple[Any, str | None]:
    """`messages` from a list<struct> cell (null struct fields dropped) or from JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            return None, f"messages: column {column!r} holds text that is not JSON ({exc})"
    if isinstance(value, list):
        return [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m for m in value], None
    return value, None


# --- the input ------------------------------------------------------------------------------

@dataclass(frozen=True)
class TableInput:
    source: TableSource
    fields: dict[str, str]
    """field -> column, as resolved (the mapping given plus the namesake columns)."""
    unit: str = "row"
    metadata_columns: tuple[str, ...] = field(default=())

    @classmethod
    def of(cls, source: TableSource, columns: Mapping[str, str] | None) -> TableInput:
        check_columns(source.name, source.schema.names)
        fields = resolve_fields(source, columns)
        used = set(fields.values())
        return cls(source, fields, metadata_columns=tuple(n for n in source.schema.names if n not in used))

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def path(self) -> str:
        return self.source.path

    @property
    def record(self) -> dict[str, Any]:
        """What the job keeps (jobs.input_columns): the mapping, for resume, and the schema, for the join export."""
        schema = self.source.schema.remove_metadata()
        record: dict[str, Any] = {"fields": dict(self.fields),
                                  "schema": base64.b64encode(schema.serialize().to_pybytes()).decode("ascii")}
        if self.source.null_words:
            record["csv_nulls"] = list(self.source.null_words)
        return record

    def outcomes(self, defaults: Mapping[str, Any], context_length: int) -> Iterator[LineOutcome]:
        checker = RowChecker(defaults, context_length, unit=self.unit)
        text_only = self.source.text_only
        fields = list(self.fields.items())
        metadata = list(self.metadata_columns)
        has_prompt, has_messages = "prompt" in self.fields, "messages" in self.fields
        renamed = {key: column for key, column in self.fields.items() if key != column}
        position = 0
        for batch in self.source.batches():
            if batch.num_rows == 0:
                continue
            batch, sizes = _oversized_rows(batch)
            errors: dict[int, list[str]] = {}
            field_values = []
            for key, column in fields:
                values, bad = _column_values(batch.column(column), column, keep_floats=True)
                for i, reason in bad.items():
                    errors.setdefault(i, []).append(reason)
                field_values.append((key, column, values))
            meta_values = []
            for column in metadata:
                values, bad = _column_values(batch.column(column), column)
                for i, reason in bad.items():
                    errors.setdefault(i, []).append(reason)
                meta_values.append(values)
            scan = _may_hold_nul(batch, self.source.schema)
            if sizes.nested:
                by_column = {column: values for _, column, values in field_values}
                by_column.update(zip(metadata, meta_values))
                sizes.add_nested([(c, by_column[c]) for c in sizes.nested], batch.num_rows)
            for i in range(batch.num_rows):
                position += 1
                if i in sizes.oversized:
                    yield LineOutcome(position, None, [sizes.oversized[i]])
                    continue
                row: dict[str, Any] = {}
                problems = list(errors.get(i, ()))
                for key, column, values in field_values:
                    value = values[i]
                    if value is None:
                        continue
                    if key == "messages":
                        value, problem = _messages_value(value, column)
                        if problem:
                            problems.append(problem)
                            continue
                    elif key == "custom_id":
                        if isinstance(value, int) and not isinstance(value, bool):
                            value = str(value)
                    elif key in SAMPLING_FIELDS:
                        if text_only and isinstance(value, str):
                            value = _from_text(key, value)
                        elif key in _INT_FIELDS and isinstance(value, float) and value.is_integer():
                            value = int(value)  # an integer column with nulls, as pandas holds it
                    row[key] = value
                if metadata:
                    row["metadata"] = {column: values[i] for column, values in zip(metadata, meta_values)}
                if not problems and scan:
                    bad_string = _unstorable_string(row)
                    if bad_string is not None:
                        problems.append(bad_string)
                if problems:  # the row's own checks too, but not the cross-row ones (a bad row's custom_id is not taken)
                    outcome = LineOutcome(position, None, problems + validate_line(row, defaults, context_length)[1])
                else:
                    outcome = checker.check_object(position, row)
                if "prompt" not in row and "messages" not in row:
                    missing = _no_input(self.fields, has_prompt, has_messages)
                    outcome.errors = [missing if e == ONE_INPUT else e for e in outcome.errors]
                if outcome.errors and renamed:
                    outcome.errors = [_name_column(e, renamed) for e in outcome.errors]
                yield outcome
        if position == 0:
            raise EmptyInput(f"{self.name}: the table has no rows")


@dataclass
class _Sizes:
    oversized: dict[int, str]
    """Row index -> why it is refused."""
    nested: list[str]
    """The nested columns, whose cells are sized as JSON once converted (add_nested)."""
    flat: list[int] | None = None
    """Each row's text and binary bytes, kept only where nested cells are to be added."""

    def add_nested(self, values: list[tuple[str, list[Any]]], rows: int) -> None:
        for i in range(rows):
            if i in self.oversized:
                continue
            sizes = {column: len(json.dumps(cells[i], ensure_ascii=False, default=str))
                     for column, cells in values if cells[i] is not None}
            size = sum(sizes.values()) + (self.flat[i] if self.flat else 0)
            if size > MAX_ROW_BYTES:
                largest = max(sizes, key=sizes.__getitem__)
                self.oversized[i] = _too_large(size, largest, sizes[largest])


def _oversized_rows(batch: pa.RecordBatch) -> tuple[pa.RecordBatch, _Sizes]:
    """The rows whose text and binary cells together pass MAX_ROW_BYTES, with the batch those rows' cells are
    nulled in (so no huge cell becomes a Python string). Vectorised: a few Arrow kernels per column."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.types as t

    total = None
    lengths: dict[str, Any] = {}
    nested: list[str] = []
    for name, column in zip(batch.schema.names, batch.columns):
        kind = column.type
        if t.is_dictionary(kind):
            column, kind = column.cast(kind.value_type), kind.value_type
        if t.is_nested(kind):
            nested.append(name)
            continue
        if not (t.is_string(kind) or t.is_large_string(kind) or t.is_binary(kind) or t.is_large_binary(kind)):
            continue  # numbers, booleans, dates: a few bytes each
        length = _cell_bytes(column, wide=t.is_large_string(kind) or t.is_large_binary(kind))
        lengths[name] = length
        total = length if total is None else total + length
    sizes = _Sizes({}, nested)
    if total is None:
        return batch, sizes
    if nested:
        sizes.flat = total.tolist()
    over = np.flatnonzero(total > MAX_ROW_BYTES)
    if not len(over):
        return batch, sizes
    for i in over.tolist():
        largest = max(lengths, key=lambda name: lengths[name][i])
        sizes.oversized[i] = _too_large(int(total[i]), largest, int(lengths[largest][i]))
    keep = pa.array(total <= MAX_ROW_BYTES)
    columns = [pc.if_else(keep, column, pa.nulls(len(column), column.type)) if name in lengths else column
               for name, column in zip(batch.schema.names, batch.columns)]
    return pa.RecordBatch.from_arrays(columns, schema=batch.schema), sizes


def _cell_bytes(column: pa.Array, wide: bool) -> Any:
    """Each cell's length in bytes (0 if null) from the column's offsets and validity buffers, as a numpy array:
    no copy of the text, and no pandas (Arrow's own to_numpy and Python scalars import it)."""
    import numpy as np

    validity, offsets = column.buffers()[:2]
    start, count = column.offset, len(column)
    ends = np.frombuffer(offsets, dtype=np.int64 if wide else np.int32, count=start + count + 1)[start:]
    lengths = np.diff(ends).astype(np.int64)
    if column.null_count and validity is not None:
        lengths *= np.unpackbits(np.frombuffer(validity, dtype=np.uint8), bitorder="little")[start:start + count]
    return lengths


def _too_large(size: int, column: str, cell: int) -> str:
    return f"{row_too_large(size)}; its largest cell: column {column!r}, {cell:,} bytes"


def _name_column(error: str, renamed: Mapping[str, str]) -> str:
    """`temperature: must be ...` -> `temperature (column 'temp'): must be ...` for a field read from another column."""
    for key, column in renamed.items():
        for sep in (": ", ".", "["):
            if error.startswith(key + sep) and "(column " not in error:
                return f"{key} (column {column!r}){error[len(key):]}"
    return error


def _no_input(fields: Mapping[str, str], has_prompt: bool, has_messages: bool) -> str:
    if has_prompt and has_messages:
        return f"exactly one of 'prompt' and 'messages' is required: columns {fields['prompt']!r} and {fields['messages']!r} are both null"
    if has_prompt:
        return f"prompt: is null (column {fields['prompt']!r}); every row needs a prompt"
    return f"messages: is null (column {fields['messages']!r}); every row needs messages"


def _may_hold_nul(batch: pa.RecordBatch, schema: pa.Schema) -> bool:
    """Whether a row of the batch may hold a NUL character (which no store can hold): any NUL in a string
    column, or any nested column (whose strings are checked row by row)."""
    import pyarrow.compute as pc
    import pyarrow.types as t

    for column in batch.columns:
        kind = column.type
        if t.is_dictionary(kind):
            column, kind = column.dictionary, kind.value_type
        if t.is_string(kind) or t.is_large_string(kind):
            if column.null_count < len(column) and pc.any(pc.match_substring(column, "\x00")).as_py():
                return True
        elif t.is_nested(kind):
            return True
    return False


def schema_of(record: Mapping[str, Any]) -> pa.Schema:
    """The input schema a job recorded (TableInput.record)."""
    import pyarrow as pa

    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(record["schema"])))
