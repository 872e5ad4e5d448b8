"""A CSV or TSV file as a TableSource: every cell a string, read by pyarrow in blocks (bounded memory).

The header is read by Python's csv module from at most MAX_ROW_BYTES of the file, so a header too large, not
UTF-8 or of too many columns is refused before pyarrow sees it (pyarrow would say "Empty CSV file or block").
When pyarrow cannot read a block (a row not UTF-8, a quote never closed, a row of more cells than the header,
a row larger than a block) it names no row; the file is then read again by Python's csv module, which finds
the row and says what is wrong with it, or says plainly that the row is unknown.
"""
from __future__ import annotations

import codecs
import csv
import io
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from contract.errors import EmptyInput, InputFileError
from producer.limits import MAX_ROW_BYTES, check_columns, row_too_large
from producer.table_sources import TableSource

if TYPE_CHECKING:
    import pyarrow as pa

BLOCK_BYTES = 2 * MAX_ROW_BYTES + (1 << 16)
"""pyarrow's read block: a row within the row limit always fits one (a row larger than a block cannot be read)."""
_BOM = codecs.BOM_UTF8
_NOT_UTF8 = re.compile("[\udc80-\udcff]")
"""What surrogateescape turns a byte that is not UTF-8 into."""


def open_csv(path: str, delimiter: str, null_words: tuple[str, ...] = ()) -> TableSource:
    """Every cell a string, as written: an unquoted empty cell is null ("not given"; a quoted "" is the empty
    string), and so is a cell that is exactly one of `null_words`; pyarrow's own null words (NA, null, N/A, nan,
    NULL, ...) are text like any other (a prompt "NA" is a prompt)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    name = Path(path).name
    header = read_header(path, name, delimiter)
    if len(set(header)) != len(header):
        twice = sorted({c for c in header if header.count(c) > 1})
        raise InputFileError(f"{name}: the header names a column twice: {', '.join(map(repr, twice[:20]))}")
    schema = pa.schema([(column, pa.string()) for column in header])
    convert = pacsv.ConvertOptions(column_types={column: pa.string() for column in header},
                                   null_values=["", *null_words], strings_can_be_null=True, quoted_strings_can_be_null=False)
    parse = pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True)

    def batches() -> Iterator[pa.RecordBatch]:
        rows = 0
        try:
            reader = pacsv.open_csv(path, parse_options=parse, convert_options=convert,
                                    read_options=pacsv.ReadOptions(block_size=BLOCK_BYTES, use_threads=False))
            for batch in reader:
                rows += batch.num_rows
                yield batch
        except (pa.ArrowException, OSError) as exc:
            raise locate_problem(path, name, delimiter, header, rows, exc) from None

    return TableSource(name, path, schema, batches, text_only=True, null_words=null_words)


def read_header(path: str, name: str, delimiter: str) -> list[str]:
    """The header row, from at most MAX_ROW_BYTES (+1) of the file: InputFileError if it does not end there, is not
    UTF-8, or names more than MAX_COLUMNS columns; EmptyInput if the file is empty."""
    try:
        with open(path, "rb") as file:
            head = file.read(MAX_ROW_BYTES + 1)
    except OSError as exc:
        raise InputFileError(f"{name}: cannot be read ({exc.strerror or exc})") from None
    whole = len(head) <= MAX_ROW_BYTES
    skipped = len(_BOM) if head.startswith(_BOM) else 0
    try:
        text, bad = codecs.getincrementaldecoder("utf-8")().decode(head[skipped:], final=whole), None
    except UnicodeDecodeError as exc:
        text, bad = head[skipped:skipped + exc.start].decode("utf-8"), skipped + exc.start
    complete = whole and bad is None  # the whole file, read and decoded
    # else a character after what was decoded: it starts a second row only if the header's row had ended
    with _field_limit(MAX_ROW_BYTES + 2):
        rows = csv.reader(io.StringIO(text if complete else text + "x", newline=""), delimiter=delimiter)
        try:
            header = next(rows, None)
            ended = complete or next(rows, None) is not None
        except csv.Error as exc:
            raise InputFileError(f"{name}: the header cannot be read ({exc})") from None
    if not ended:
        if bad is not None:
            raise InputFileError(f"{name}: the header is not UTF-8 (byte {bad + 1})")
        raise InputFileError(f"{name}: the header row is larger than the {MAX_ROW_BYTES:,}-byte row limit "
                             "(is the first row a header?)")
    if not header:
        raise EmptyInput(f"{name}: the file is empty")
    check_columns(name, header)
    return header


def locate_problem(path: str, name: str, delimiter: str, header: list[str], rows_read: int, exc: BaseException) -> InputFileError:
    """What pyarrow could not read, as `name:ROW: reason` found by reading the file again with Python's csv module
    (past the rows_read that pyarrow read whole); else pyarrow's reason and "the row is unknown"."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    try:
        row, problem = _first_bad_row(path, delimiter, header, rows_read)
    except (OSError, csv.Error, UnicodeError) as again:
        row, problem = -1, None
        reason += f"; reading it again: {again}"
    if problem is not None:
        return InputFileError(f"{name}:{row}: {problem}")
    if row == 0:  # a header and no row (pyarrow: "Empty CSV file or block" when the header has no line break)
        return EmptyInput(f"{name}: the table has no rows")
    return InputFileError(f"{name}: cannot be read ({reason}); the row is unknown (after row {rows_read:,}, "
                          "the last read whole)")


def _first_bad_row(path: str, delimiter: str, header: list[str], after: int) -> tuple[int, str | None]:
    """(row number, what is wrong with it) for the first bad row past `after`; (rows read, None) if none is."""
    with _field_limit(MAX_ROW_BYTES + 1), open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as file:
        rows = csv.reader(file, delimiter=delimiter, strict=True)
        number = -1  # the header is row 0
        while True:
            try:
                cells = next(rows)
            except StopIteration:
                return max(number, 0), None
            except csv.Error as exc:
                number += 1
                if "unexpected end of data" in str(exc):
                    return number, "a quoted cell is never closed (its quote opens in this row and runs to the end of the file)"
                if "field larger than field limit" in str(exc):
                    return number, (f"a cell is larger than the row limit, {MAX_ROW_BYTES:,} bytes (1 MiB), or a quote "
                                    "opened in this row is never closed")
                if number > after:
                    return number, f"the row cannot be read as CSV ({exc})"
                continue
            if not cells:
                continue  # a blank line, skipped by pyarrow too
            number += 1
            if number <= after:
                continue
            for column, cell in zip(header, cells):
                if _NOT_UTF8.search(cell):
                    return number, f"column {column!r} is not UTF-8 text"
            size = sum(len(cell.encode("utf-8", "surrogateescape")) for cell in cells)
            if size > MAX_ROW_BYTES:
                return number, row_too_large(size)
            if len(cells) != len(header):
                return number, f"{len(cells)} cell{'s' if len(cells) != 1 else ''}, but the header names {len(header)} columns"


@contextmanager
def _field_limit(limit: int) -> Iterator[None]:
    """csv's field size limit (131,072 characters by default; process-wide) raised for a while: a cell may be as
    large as a row."""
    before = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(before)
