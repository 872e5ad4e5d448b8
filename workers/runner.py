"""A worker process's part of the worker, one WorkerProcess per process (`this_process()`): in a pool child, its
one Worker (workers.worker), made after fork: load the model once, connect to the store; in the main process,
the fleet's reconciler thread (workers.reconcile). What is retried and for how long is contract.policy's."""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import TYPE_CHECKING

from contract.policy import TransientError, with_store_retry
from migrations.schema import check_schema
from models.db import make_engine, session_factory
from contract import registry
from contract.devices import device_index
from models.store import record_outcomes
from workers import faults, metrics
from contract.settings import Settings, get_settings
from workers.reconcile import FleetReconciler
from workers.worker import Worker

if TYPE_CHECKING:
    from celery import Celery

    from workers.engine import Engine
    from workers.standin import StandInEngine

log = logging.getLogger("bulkgen.worker")
__all__ = ["TransientError", "WorkerProcess", "this_process"]


class WorkerProcess:
    """What one process of a worker holds: its Worker (a pool child's, or a solo pool's) and its fleet reconciler
    (the main process's). Made once per process by this_process(); workers.tasks' hooks drive it."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        """The process it belongs to: a child forked later inherits the object, and makes its own."""
        self.worker: Worker | None = None
        """None until start_worker has loaded the model (and always in a prefork pool's main process)."""
        self.reconciler: FleetReconciler | None = None
        """The fleet reconciler thread, once start_reconciler has started it."""

    @property
    def model(self) -> str:
        """The model this process's Worker holds; "unknown" before it has one (the start found the store down)."""
        return self.worker.model if self.worker is not None else "unknown"

    def start_worker(self) -> Worker:
        """Load the model and connect to the store, once; runs in each pool child, after fork.

        The store's engine is created here, in the pool child, never inherited from the parent.
        """
        if self.worker is not None:
            return self.worker
        settings = get_settings()
        db = make_engine(settings.database_url)
        with_store_retry(lambda: check_schema(db), within_s=min(settings.db_retry_s, 120))
        spec = registry.resolve(settings.model)
        started = time.perf_counter()
        hooks = {}
        if faults.wanted():  # tests/faults/ only: the production path holds no test code
            hooks = {"wrap_engine": faults.FaultyEngine, "record": faults.crashing_after_commit(record_outcomes)}
        worker = Worker(
            engine=None,
            sessions=session_factory(db),
            model=spec.name,
            device=settings.device,
            worker=f"{socket.gethostname()}:{os.getpid()}",
            settings=settings,
            load=lambda: _load_engine(spec, settings),
            **hooks,
        )
        worker.wait_loaded()  # the model is loaded before the process takes a task
        load_s = time.perf_counter() - started
        log.info("loaded model %s on %s (%s) in %.1fs", spec.name, settings.device, settings.dtype, load_s)
        metrics.MODEL_LOAD.labels(spec.name, settings.device).set(load_s)
        metrics.serve(settings.metrics_port, _metrics_offset(settings.device))
        self.worker = worker
        return worker

    def run_batch(self, job_id: int, request_ids: list[int]) -> int:
        """The task's body: hand one message's requests to this process's Worker; how many it claimed."""
        return self.start_worker().handle(job_id, request_ids)

    def shutdown_worker(self) -> None:
        """The pool process is exiting: finish and record what its Worker holds."""
        if self.worker is not None:
            self.worker.shutdown()

    def start_reconciler(self, app: Celery) -> None:
        """Start the fleet reconciler thread, once; none when reconcile_interval_s is 0."""
        settings = get_settings()
        if settings.reconcile_interval_s <= 0 or self.reconciler is not None:
            return
        self.reconciler = FleetReconciler(app, settings)
        self.reconciler.start()

    def stop_reconciler(self) -> None:
        if self.reconciler is not None:
            self.reconciler.stopping.set()


def this_process() -> WorkerProcess:
    """This process's WorkerProcess, held by the worker's Celery app; made on first use in each process."""
    from workers.app import app

    held: WorkerProcess | None = getattr(app, "worker_process", None)
    if held is None or held.pid != os.getpid():
        held = app.worker_process = WorkerProcess()  # type: ignore[attr-defined]
    return held


def _metrics_offset(device: str) -> int:
    """Port offset of this process's metrics: the GPU index plus the pool child's index."""
    from billiard.process import current_process

    child = getattr(current_process(), "index", None) or 0
    return device_index(device) + int(child)


def _load_engine(spec: registry.ModelSpec, settings: Settings) -> "Engine | StandInEngine":
    if spec.kind == "stand-in":
        from workers.standin import StandInEngine

        return StandInEngine(spec.name)
    import torch

    from workers.engine import Engine

    children = int(os.environ.get("BULKGEN_POOL_SIZE", "1"))
    graphed = None if settings.cuda_graphs else False  # None: on CUDA (Engine's default); False: eager steps
    if settings.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, children)))
    return Engine.load(
        spec, settings.device, settings.dtype, settings.quantize, settings.batch_size, settings.kv_cache_tokens,
        prefix_cache_tokens=settings.prefix_cache_tokens,
        speculative_tokens=settings.speculative_tokens,
        cuda_graphs=graphed, overlap=graphed, compile_decode=settings.compile_decode,
        draft_spec=registry.resolve(settings.draft_model) if settings.draft_model else None,
    )
