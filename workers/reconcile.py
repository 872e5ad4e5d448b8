"""The reconciler in the workers: one sweep (reconciler.sweep) per interval across the fleet.

Each worker's main process runs a FleetReconciler thread (its workers.runner.WorkerProcess starts it); per
interval, the worker that takes the Redis lock sweeps. The sweep itself, and what `producer reconcile` runs, is reconciler.sweep.

Every reconciler (each worker's, and `producer reconcile --loop`) serves its metrics (workers.metrics'
reconciler.metrics) on BULKGEN_RECONCILER_METRICS_PORT (+ N for a worker on cuda:N): what its sweeps did,
and, every interval whether it swept or not, the depth of each open job's model queue (Redis LLEN).
"""
from __future__ import annotations

import logging
import os
import threading
import uuid
from typing import TYPE_CHECKING

from contract.devices import device_index
from reconciler import metrics as reconcile_metrics
from reconciler.sweep import sweep, take_lock
from contract.settings import Settings
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
        self.queues = reconcile_metrics.QueueDepth()

    def run(self) -> None:
        interval = self.settings.reconcile_interval_s
        db = make_engine(self.settings.database_url)
        os.register_at_fork(after_in_child=lambda: db.dispose(close=False))
        reconcile_metrics.serve_metrics(self.settings, device_index(self.settings.device))
        while not self.stopping.wait(interval):
            try:
                if self._take_lock(interval):
                    report = sweep(db, self.app, self.settings)
                    reconcile_metrics.observe_sweep(report)
                    if report.expired or report.gave_up or report.resent or report.completed:
                        log.warning("reconciler: %s", report)
            except Exception as exc:  # Redis or the store is down: try again next interval
                reconcile_metrics.RECONCILER_SWEEPS.labels("skipped").inc()
                log.warning("reconciler: sweep skipped (%s: %s)", type(exc).__name__, str(exc)[:300])
            try:
                self.queues.measure(db, self.app)
            except Exception as exc:  # the gauge keeps its last value
                log.warning("reconciler: queue depth not measured (%s: %s)", type(exc).__name__, str(exc)[:300])
            finally:
                db.dispose()  # no connection stays open across a fork of a new pool child

    def _take_lock(self, interval: float) -> bool:
        return take_lock(self.app, self.token, interval * 0.9)
