"""Test-only faults (tests/faults/, docs/reliability.md), put in by wrapping a Worker's parts: the production
path holds no test code. workers.runner wraps the engine and the store write with these only when one of
their BULKGEN_TEST_* environment variables is set (`wanted()`); none is set in production.

- BULKGEN_TEST_POISON=TEXT: a request whose prompt holds TEXT kills its worker process (SIGKILL) when it enters
  the engine, as a request that crashes the runtime or runs it out of memory would.
- BULKGEN_TEST_DELAY_PER_REQUEST_S=S: each request takes S seconds longer to enter the engine (the stand-in
  engine is instant; the tests need work in flight when they strike).
- BULKGEN_TEST_CRASH_AFTER_COMMIT=PATH: the first worker (fleet-wide) to commit results writes the rows it
  committed to PATH and kills its own process (with its messages, acknowledged or not, in flight).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Callable, Hashable
from typing import Any

from sqlalchemy.orm import Session

from models.store import Outcome
from workers.types import GenerationRequest

log = logging.getLogger("bulkgen.worker")
VARIABLES = ("BULKGEN_TEST_POISON", "BULKGEN_TEST_DELAY_PER_REQUEST_S", "BULKGEN_TEST_CRASH_AFTER_COMMIT")
Record = Callable[[Session, int, list[Outcome]], Any]


def wanted() -> bool:
    return any(os.environ.get(name) for name in VARIABLES)


class FaultyEngine:
    """A stepped engine whose submit() first does what BULKGEN_TEST_POISON and _DELAY_PER_REQUEST_S ask."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self._poison = os.environ.get("BULKGEN_TEST_POISON") or None
        self._delay = float(os.environ.get("BULKGEN_TEST_DELAY_PER_REQUEST_S") or 0)

    def submit(self, key: Hashable, request: GenerationRequest) -> None:
        if self._poison and self._poison in (request.prompt or ""):
            log.error("BULKGEN_TEST_POISON: request %s kills this worker process", key)
            os.kill(os.getpid(), signal.SIGKILL)
        if self._delay:
            time.sleep(self._delay)
        self._engine.submit(key, request)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


def crashing_after_commit(record: Record) -> Record:
    """record, then, under BULKGEN_TEST_CRASH_AFTER_COMMIT=PATH, the first worker's crash after its commit."""
    path = os.environ.get("BULKGEN_TEST_CRASH_AFTER_COMMIT")
    if not path:
        return record

    def record_then_crash(session: Session, job_id: int, outcomes: list[Outcome]) -> Any:
        done = record(session, job_id, outcomes)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return done
        rows = [
            {"request_id": row["request_id"], "sample_index": row["sample_index"], "text": row["text"], "seed": row["seed"]}
            for outcome in outcomes
            for row in outcome.results
        ]
        with os.fdopen(fd, "w") as out:
            json.dump({"pid": os.getpid(), "rows": rows}, out)
        log.error("BULKGEN_TEST_CRASH_AFTER_COMMIT: killing this worker process after its commit")
        os.kill(os.getpid(), signal.SIGKILL)
        return done

    return record_then_crash
