"""The lease keeper: a worker's thread that renews the lease of every request the worker holds (claimed, not yet
recorded) every lease_s / 4, so that no other worker and no reconciler takes them while it lives."""
from __future__ import annotations

import logging
from typing import Protocol

from sqlalchemy.orm import Session, sessionmaker

from models.store import renew_leases

log = logging.getLogger("bulkgen.worker")
RENEW_CHUNK = 5000
"""Request ids per lease-renewing UPDATE (SQLite takes at most 32,766 bound parameters)."""


class Holder(Protocol):
    """What the lease keeper asks of its worker (workers.worker.Worker)."""

    def wait_held(self, timeout: float) -> list[int] | None: ...


class LeaseKeeper:
    """Renews the leases of what holder holds, as `worker`, until the holder stops."""

    def __init__(self, holder: Holder, sessions: sessionmaker[Session], worker: str, lease_s: float) -> None:
        self.holder = holder
        self.sessions = sessions
        self.worker = worker
        self.lease_s = lease_s

    def run(self) -> None:
        """The thread's body."""
        every_s = max(0.5, self.lease_s / 4)
        while (ids := self.holder.wait_held(every_s)) is not None:
            self.renew(ids)

    def renew(self, ids: list[int]) -> None:
        for start in range(0, len(ids), RENEW_CHUNK):
            chunk = ids[start : start + RENEW_CHUNK]
            try:
                with self.sessions() as session:
                    renew_leases(session, chunk, self.worker, self.lease_s)
            except Exception as exc:  # the store is down: the lease may lapse, and the work is then redone
                log.warning("cannot renew the lease of %d requests (%s)", len(chunk), type(exc).__name__)
