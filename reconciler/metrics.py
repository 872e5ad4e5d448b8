"""The reconciler's Prometheus metrics: what its sweeps did, and the depth of each open job's model queue.

Served by the process that runs the reconciler: a worker's main process (workers.reconcile, on
BULKGEN_RECONCILER_METRICS_PORT + the GPU index) or `producer reconcile --loop` (on BULKGEN_RECONCILER_METRICS_PORT).
A registry of its own: pool children inherit it at fork and never serve it, so no series is exported twice with
stale values. Torch-free and worker-free (reconciler/), since the producer's `reconcile --loop` serves it too.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from sqlalchemy import Engine

from contract.messages import queue_name
from contract.settings import Settings
from models.db import session_factory
from models.store import open_jobs
from reconciler.sweep import broker

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger("bulkgen.reconcile")

RECONCILER_REGISTRY = CollectorRegistry()
QUEUE_DEPTH = Gauge(
    "bulkgen_queue_depth",
    "Messages waiting in a model's queue (every priority list; each carries up to ids_per_message requests), "
    "at the reconciler's last look.",
    ["model"], registry=RECONCILER_REGISTRY,
)
RECONCILER_SWEEPS = Counter(
    "bulkgen_reconciler_sweeps", "Reconciler sweeps this process ran, by outcome (done, or skipped: Redis or the store down).",
    ["outcome"], registry=RECONCILER_REGISTRY,
)
RECONCILER_LAPSED = Counter(
    "bulkgen_reconciler_lapsed_leases", "Running requests whose lease had passed (their worker is gone), put back to queued.",
    registry=RECONCILER_REGISTRY,
)
RECONCILER_GAVE_UP = Counter(
    "bulkgen_reconciler_gave_up", "Requests the reconciler ended failed: started max_attempts times, their worker lost each time.",
    registry=RECONCILER_REGISTRY,
)
RECONCILER_RESENT = Counter(
    "bulkgen_reconciler_resent_requests", "Queued requests that no message in Redis carried, sent again.",
    registry=RECONCILER_REGISTRY,
)


def observe_sweep(report: Any) -> None:
    """Count what one reconciler.sweep.sweep did (its SweepReport)."""
    RECONCILER_SWEEPS.labels("done").inc()
    RECONCILER_LAPSED.inc(report.expired)
    RECONCILER_GAVE_UP.inc(report.gave_up)
    RECONCILER_RESENT.inc(report.resent)


class QueueDepth:
    """Sets QUEUE_DEPTH: the messages waiting in the queue of each open job's model (and of every model
    seen before, so that a drained queue reads 0)."""

    def __init__(self) -> None:
        self.models: set[str] = set()

    def measure(self, db: Engine, app: Celery) -> dict[str, int]:
        with session_factory(db)() as session:
            self.models |= {job.model for job in open_jobs(session)}
        if not self.models:
            return {}
        depths = {}
        with broker(app) as link:
            for model in sorted(self.models):
                depths[model] = sum(int(link.client.llen(key)) for key in link.priority_keys(queue_name(model)))
                QUEUE_DEPTH.labels(model).set(depths[model])
        return depths


def serve_metrics(settings: Settings, offset: int = 0) -> int | None:
    """The reconciler's metrics endpoint on reconciler_metrics_port + offset; None when off (0) or the port is taken."""
    if settings.reconciler_metrics_port <= 0:
        return None
    port = settings.reconciler_metrics_port + offset
    try:
        start_http_server(port, addr="0.0.0.0", registry=RECONCILER_REGISTRY)
    except OSError as exc:  # a busy port must not stop the reconciler
        log.warning("reconciler metrics endpoint not started on port %d: %s", port, exc)
        return None
    return port
