"""The failure policy, whole: what is retried, after how long, how often, and what ends `failed` with which reason.
Every worker, the reconciler and the store take their rule from here; the settings named are contract.settings'.

1. The store is unreachable or busy (`is_transient`: down, restarting, a dropped connection, a deadlock, a lock
   timeout). Every store operation of a worker (claim, record, release) is retried in place by `with_store_retry`,
   waiting 0.5 s, then twice as long each time up to 10 s, for `db_retry_s` (600 s). A store outage is never a
   request's fault: nothing is failed and no attempt is counted for it.
   a. A claim that still cannot reach the store raises TransientError: Celery sends its message again after
      `message_retry_countdown` (10 s, doubling, at most 5 minutes), as many times as it takes.
   b. Results that cannot be written stay in the worker's memory and are retried until they are written
      (the first write of a (request, sample) wins, so a retry never duplicates one).
   c. Handing requests back (`release`) is tried for RELEASE_WITHIN_S; after that their leases lapse instead (4).
   Any other store error (a constraint, a bug) is not retried: it propagates.
2. A request the engine refuses (a prompt longer than the context, parameters the model cannot honour) ends
   `failed` at once with the engine's reason; retrying would give the same answer.
3. Out of memory is the engine's to handle, in process (workers.batch: `is_out_of_memory`, `halved`,
   `out_of_memory_alone`): the scheduler drops what it was decoding and starts those rows again, from their
   prompts, with at most half as many rows at once (`halved`; the lower limit holds for the scheduler's life);
   static batches run the two halves of the batch on their own. A row out of memory alone ends its request
   `failed` with "out of memory with a batch of one row: <error>". No request is handed back and no attempt is
   counted for it. Any other error the engine raises while generating (a runtime error, a bug) hands back every
   request it held (its attempt counted, the error kept as its last error), and each is claimed again alone (4),
   so that one bad request cannot take a batch down twice.
4. A request that was started and did not finish (its worker was killed, froze past its lease, or handed it back)
   is only ever started again alone (`one_by_one`), and at most `max_attempts` (3) starts in all; at the next
   start after that it ends `failed` with `gave_up_reason`: "gave up after N attempts; last: <its last error, or
   'its worker (host:pid) was lost while generating it'>".
5. A worker is presumed lost when a request's lease (`lease_s`, 120 s, renewed every lease_s / 4) has passed
   (`models.store.lease_lapsed`). Its requests are taken by the next claim that names them, or by the
   reconciler's sweep (every `reconcile_interval_s`, 30 s, one worker of the fleet at a time), which puts them
   back to queued (or ends them failed, as in 4) and sends again every queued request that no Redis message has
   carried for `reconcile_grace_s` (120 s).
6. A cancelled job's queued requests are dropped (cancelled, not failed); running ones finish. `producer retry`
   reopens failed and cancelled requests with their attempts reset to 0.
7. The store refuses a result (not an outage: a value it cannot hold, a constraint): the worker writes the batch's
   requests one by one, and the one still refused ends `failed` with "the store refused its result: <error>";
   the others are recorded. Generated text is made storable first (`storable`: PostgreSQL's text cannot hold
   NUL, which a model may emit as a byte token; it becomes U+FFFD in the stored text, on every store alike).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar, overload

from contract.errors import BulkgenError

if TYPE_CHECKING:
    from sqlalchemy import ColumnElement
    from sqlalchemy.orm import InstrumentedAttribute

log = logging.getLogger("bulkgen.policy")
T = TypeVar("T")

STORE_FIRST_WAIT_S = 0.5
STORE_MAX_WAIT_S = 10.0
RELEASE_WITHIN_S = 60.0
MESSAGE_RETRY_FIRST_S = 10
MESSAGE_RETRY_MAX_S = 300


STORE_REFUSED = "the store refused its result: "


def storable(text: str) -> str:
    """Generated text as every store can hold it (7): NUL becomes U+FFFD, the replacement character."""
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


class TransientError(BulkgenError):
    """The store stayed unreachable for the whole retry window (1): the work is handed back, never failed."""


def is_transient(exc: BaseException) -> bool:
    """The store is unreachable or busy, not wrong (1)."""
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

    if isinstance(exc, (OperationalError, InterfaceError)):
        return True
    return isinstance(exc, DBAPIError) and bool(getattr(exc, "connection_invalidated", False))


def store_wait_s(attempt: int, first_wait_s: float = STORE_FIRST_WAIT_S, max_wait_s: float = STORE_MAX_WAIT_S) -> float:
    """How long to wait before retry number attempt + 1 of a store operation (1)."""
    return min(max_wait_s, first_wait_s * 2**attempt)


def with_store_retry(action: Callable[[], T], *, within_s: float, first_wait_s: float = STORE_FIRST_WAIT_S,
                     max_wait_s: float = STORE_MAX_WAIT_S) -> T:
    """Run a store operation, waiting out a store that is unreachable (1); TransientError once within_s (the
    db_retry_s setting, or RELEASE_WITHIN_S for a release) has passed. A store error that is not transient
    propagates at once."""
    from sqlalchemy.exc import DBAPIError

    deadline = time.monotonic() + within_s
    attempt = 0
    while True:
        try:
            return action()
        except DBAPIError as exc:
            if not is_transient(exc):
                raise
            wait = store_wait_s(attempt, first_wait_s, max_wait_s)
            if time.monotonic() + wait > deadline:
                raise TransientError(f"store unreachable: {type(exc.orig).__name__ if exc.orig else exc}") from exc
            log.warning("store error (%s); retrying in %.1fs", type(exc.orig or exc).__name__, wait)
            time.sleep(wait)
            attempt += 1


def message_retry_countdown(retries: int) -> int:
    """Seconds before Celery sends again a message whose claim could not reach the store (1a)."""
    return min(MESSAGE_RETRY_MAX_S, MESSAGE_RETRY_FIRST_S * 2 ** min(retries, 5))


@overload
def gives_up(attempts: int, max_attempts: int) -> bool: ...
@overload
def gives_up(attempts: InstrumentedAttribute[int], max_attempts: int) -> ColumnElement[bool]: ...
def gives_up(attempts: int | InstrumentedAttribute[int], max_attempts: int) -> bool | ColumnElement[bool]:
    """A request started this many times is not started again (4). Given the attempts column
    (models.tables.Request.attempts), the same rule as a SQL condition; its negation (~) is "may start again"."""
    return attempts >= max_attempts


def gave_up_reason(attempts: int, last_error: str | None, worker: str | None) -> str:
    """The error of a request that ended failed after max_attempts starts (4)."""
    why = last_error or f"its worker ({worker or 'unknown'}) was lost while generating it"
    return f"gave up after {attempts} attempts; last: {why}"
