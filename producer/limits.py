"""What one input row may hold, the same whatever the format (docs/security.md, "Inputs"), and the checks on an
input's path before anything reads it.

- A row is at most MAX_ROW_BYTES: a JSONL line (its bytes), a table row (the bytes of its text and binary cells
  together, nested cells as JSON: so a single cell, the prompt or any metadata column, too), a row from Python
  (as JSON). Over it, the row is refused by its number, as any bad row is.
- A table has at most MAX_COLUMNS columns (Parquet, CSV, a saved dataset, a table in memory), each named in at most
  MAX_COLUMN_NAME characters: the columns not mapped to a field become each row's metadata, and every one is held
  in memory per batch (fewer rows per batch for a wide table: BATCH_CELLS).
- A path must be a regular file or a directory: a device (/dev/zero), a FIFO or a socket could be read forever
  or block forever.
"""
from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence

from contract.errors import InputFileError

MAX_ROW_BYTES = 1 << 20
"""1 MiB: the JSONL line limit, and every other format's row limit."""
MAX_COLUMNS = 1024
MAX_COLUMN_NAME = 1024
"""Characters in a column's name (each row's metadata repeats it)."""
BATCH_CELLS = 1 << 18
"""Cells per record batch read from a table: a wide table is read in fewer rows per batch, so the Python values
of one batch stay about the same size (8,192 rows of 32 columns) however many columns it has."""


def batch_rows(columns: int, most: int) -> int:
    """Rows per batch for a table of `columns` columns: `most`, fewer for a wide table, at least 1."""
    return max(1, min(most, BATCH_CELLS // max(1, columns)))


def check_columns(name: str, columns: Sequence[str]) -> None:
    """A table's column names: at most MAX_COLUMNS of them, each at most MAX_COLUMN_NAME characters."""
    if len(columns) > MAX_COLUMNS:
        raise InputFileError(f"{name}: {len(columns):,} columns, the limit is {MAX_COLUMNS:,} (every column not mapped "
                             "to a field is kept as metadata): keep the columns you need, then submit that")
    for number, column in enumerate(columns, 1):
        if len(column) > MAX_COLUMN_NAME:
            raise InputFileError(f"{name}: column {number}'s name is {len(column):,} characters, the limit is "
                                 f"{MAX_COLUMN_NAME:,} (is the first row a header?)")


def row_too_large(size: int, unit: str = "row") -> str:
    return f"{unit} is {size:,} bytes, the limit is {MAX_ROW_BYTES:,} (1 MiB, whatever the input's format)"


def check_path(path: str) -> os.stat_result:
    """The input's stat, following links; InputFileError with the reason when it is missing, unreadable, a link
    loop, or neither a regular file nor a directory."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise InputFileError(f"{path}: a symbolic link to nothing (its target {os.readlink(path)!r} does not exist)") from None
        raise InputFileError(f"{path}: no such file") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputFileError(f"{path}: a symbolic link loop (too many levels of symbolic links)") from None
        raise InputFileError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not (stat.S_ISREG(found.st_mode) or stat.S_ISDIR(found.st_mode)):
        kind = {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFIFO: "a FIFO (named pipe)",
                stat.S_IFSOCK: "a socket"}.get(stat.S_IFMT(found.st_mode), "not a file")
        raise InputFileError(f"{path}: {kind}, not a regular file or directory (it could be read forever, or "
                             "wait forever for a writer): save the data to a file and submit that")
    return found
