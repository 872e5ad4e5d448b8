"""A worker process's start: load the model once, connect to the store, make its one Worker (workers.worker).
What is retried and for how long is contract.policy's."""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import TYPE_CHECKING

from contract.policy import TransientError, with_store_retry
from models.db import check_schema, make_engine, session_factory
from contract import registry
from models.store import record_outcomes
from workers import faults, metrics
from contract.settings import Settings, get_settings
from workers.worker import Worker

if TYPE_CHECKING:
    from workers.engine import Engine
    from workers.standin import StandInEngine

log = logging.getLogger("bulkgen.worker")
__all__ = ["TransientError", "init_process", "run_batch", "shutdown_process"]

_worker: Worker | None = None


def init_process() -> Worker:
    """Load the model and connect to the store; runs once per worker process, after fork.

    The store's engine is created here, in the pool child, never inherited from the parent.
    """
    global _worker
    if _worker is not None:
        return _worker
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
    _worker = worker
    return _worker


def _metrics_offset(device: str) -> int:
    """Port offset of this process's metrics: the GPU index plus the pool child's index."""
    from billiard.process import current_process

    gpu = int(device.split(":")[1]) if device.startswith("cuda:") else 0
    child = getattr(current_process(), "index", None) or 0
    return gpu + int(child)


def _load_engine(spec: registry.ModelSpec, settings: Settings) -> "Engine | StandInEngine":
    if spec.kind == "stand-in":
        from workers.standin import StandInEngine

        return StandInEngine(spec.name)
    import torch

    from workers.engine import Engine

    children = int(os.environ.get("BULKGEN_POOL_SIZE", "1"))
    if settings.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, children)))
    return Engine.load(
        spec, settings.device, settings.dtype, settings.quantize, settings.batch_size, settings.kv_cache_tokens,
        prefix_cache_tokens=settings.prefix_cache_tokens,
        speculative_tokens=settings.speculative_tokens,
        draft_spec=registry.resolve(settings.draft_model) if settings.draft_model else None,
    )


def run_batch(job_id: int, request_ids: list[int]) -> int:
    """The task's body: hand one message's requests to this process's Worker; how many it claimed."""
    return init_process().handle(job_id, request_ids)


def shutdown_process() -> None:
    """The pool process is exiting: finish and record what its Worker holds."""
    if _worker is not None:
        _worker.shutdown()
