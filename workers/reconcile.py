"""The reconciler in the workers: one sweep (contract.reconcile) per interval across the fleet.

Each worker's main process runs a FleetReconciler thread; per interval, the worker that takes the Redis
lock sweeps. The sweep itself, and what `producer reconcile` runs, is contract.reconcile.
"""
from __future__ import annotations

import logging
import os
import threading
import uuid
from typing import TYPE_CHECKING

from contract.reconcile import sweep, take_lock
from contract.settings import Settings, get_settings
from models.db import make_engine

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger("bulkgen.reconcile")


class FleetReconciler(threading.Thread):
    """Runs in each worker's main process; per interval, the worker that takes the Redis lock sweeps."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        super().__init__(name="bulkgen-reconciler", daemon=True)
        self.app = app
        self.settings = settings
        self.token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.stopping = threading.Event()

    def run(self) -> None:
        interval = self.settings.reconcile_interval_s
        db = make_engine(self.settings.database_url)
        os.register_at_fork(after_in_child=lambda: db.dispose(close=False))
        while not self.stopping.wait(interval):
            try:
                if self._take_lock(interval):
                    report = sweep(db, self.app, self.settings)
                    if report.expired or report.gave_up or report.resent or report.completed:
                        log.warning("reconciler: %s", report)
            except Exception as exc:  # Redis or the store is down: try again next interval
                log.warning("reconciler: sweep skipped (%s: %s)", type(exc).__name__, str(exc)[:300])
            finally:
                db.dispose()  # no connection stays open across a fork of a new pool child

    def _take_lock(self, interval: float) -> bool:
        return take_lock(self.app, self.token, interval * 0.9)


_fleet: FleetReconciler | None = None


def start_fleet_reconciler(app: Celery) -> None:
    global _fleet
    settings = get_settings()
    if settings.reconcile_interval_s <= 0 or _fleet is not None:
        return
    _fleet = FleetReconciler(app, settings)
    _fleet.start()


def stop_fleet_reconciler() -> None:
    if _fleet is not None:
        _fleet.stopping.set()
