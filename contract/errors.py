"""Every error the project raises on purpose: what the library raises and the CLI prints as one clean message.

Each is a BulkgenError. `producer`'s commands turn any of them into an error message and exit status 1
(no traceback); code that uses the Python API catches them by type. A message names the value, the limit
and what to do, and never holds a password (URLs are redacted before they reach one).
"""
from __future__ import annotations

from dataclasses import dataclass


class BulkgenError(Exception):
    """Base of the project's errors: a user-facing message in str(error)."""

    def details(self) -> list[str]:
        """Lines to show before the message (for InvalidInput: each bad row); none for most errors."""
        return []


@dataclass(frozen=True)
class BadRow:
    """One reason a row of an input is invalid."""

    position: int
    """The row's number: the line number in a JSONL file, the row number (from 1) in a table or an iterable."""
    reason: str


class InvalidInput(BulkgenError):
    """Rows of an input are invalid, and nothing was written. Carries every bad row (the first `len(rows)` of
    `error_count` reasons when there are very many) with its position and reason."""

    def __init__(self, source: str, rows: list[BadRow], *, error_count: int | None = None, rejected: int | None = None,
                 unit: str = "row", hint: str = "nothing was submitted (fix them, or use --skip-invalid)") -> None:
        self.source = source
        self.rows = rows
        self.error_count = len(rows) if error_count is None else error_count
        self.rejected = len({r.position for r in rows}) if rejected is None else rejected
        super().__init__(f"{self.rejected} invalid {unit}{'' if self.rejected == 1 else 's'} in {source}; {hint}")

    def details(self) -> list[str]:
        lines = [f"{self.source}:{row.position}: {row.reason}" for row in self.rows]
        if self.error_count > len(self.rows):
            lines.append(f"... and {self.error_count - len(self.rows)} more errors")
        return lines


class InvalidDefaults(BulkgenError):
    """A job default (a flag of `producer submit`, a keyword of `submit()`) is out of range or unknown."""


class InputFileError(BulkgenError):
    """An input cannot be read: it does not exist, is of no format we read, or is not readable."""


class EmptyInput(InputFileError):
    """The input holds no request at all (an empty file, only blank lines, no rows)."""


class ModelNotFound(BulkgenError):
    """The named model is not available on this machine."""


class BrokerUnreachable(BulkgenError):
    """The broker (Redis) could not be reached."""


class StoreUnreachable(BulkgenError):
    """The store (the SQL database) could not be reached."""


class SchemaBehind(BulkgenError):
    """The database has not been migrated to the revision this code needs."""


class JobNotFound(BulkgenError, LookupError):
    """No job has this id."""

    def __init__(self, job_id: int) -> None:
        self.job_id = job_id
        super().__init__(f"no job {job_id}")


class ResumeRefused(BulkgenError):
    """`submit --resume JOB` was given another input than the job's, or the job cannot be resumed."""


class WrongModel(BulkgenError, RuntimeError):
    """A message's job wants another model than the one this worker holds (its requests are handed back)."""


class EnqueueInterrupted(BulkgenError):
    """The job is stored but sending its messages stopped; `producer submit FILE --resume JOB` finishes it."""

    def __init__(self, job_id: int, message: str) -> None:
        self.job_id = job_id
        super().__init__(message)
