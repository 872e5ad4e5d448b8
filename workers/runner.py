"""What a worker process does: load its model once, then turn queue messages into stored results."""
from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from models.db import check_schema, make_engine, session_factory, utcnow
from models.store import Outcome, claim_requests, record_outcomes
from workers import registry
from workers.settings import Settings, get_settings
from workers.types import GenerationRequest, GenerationResult, resolve_params

if TYPE_CHECKING:
    from workers.engine import Engine
    from workers.standin import StandInEngine

log = logging.getLogger("bulkgen.worker")
T = TypeVar("T")


class TransientError(Exception):
    """The store or the broker is unreachable for now; the work is retried, never failed."""


@dataclass
class WorkerState:
    engine: "Engine | StandInEngine"
    sessions: sessionmaker[Session]
    model: str
    device: str
    worker: str


_state: WorkerState | None = None


def init_process() -> WorkerState:
    """Load the model and connect to the store; runs once per worker process, after fork."""
    global _state
    if _state is not None:
        return _state
    settings = get_settings()
    db = make_engine(settings.database_url)
    check_schema(db)
    spec = registry.resolve(settings.model)
    started = time.perf_counter()
    engine = _load_engine(spec, settings)
    log.info("loaded model %s on %s (%s) in %.1fs", spec.name, settings.device, settings.dtype, time.perf_counter() - started)
    _state = WorkerState(
        engine=engine,
        sessions=session_factory(db),
        model=spec.name,
        device=settings.device,
        worker=f"{socket.gethostname()}:{os.getpid()}",
    )
    return _state


def _load_engine(spec: registry.ModelSpec, settings: Settings) -> "Engine | StandInEngine":
    if spec.kind == "stand-in":
        from workers.standin import StandInEngine

        return StandInEngine(spec.name)
    import torch

    from workers.engine import Engine

    children = int(os.environ.get("BULKGEN_POOL_SIZE", "1"))
    if settings.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, children)))
    return Engine.load(spec, settings.device, settings.dtype, settings.quantize, settings.batch_size)


def with_db_retry(action: Callable[[], T], *, attempts: int = 8, first_wait_s: float = 0.5) -> T:
    """Run a store operation, waiting out a database that is briefly unreachable."""
    for attempt in range(attempts):
        try:
            return action()
        except (OperationalError, DBAPIError) as exc:
            if not getattr(exc, "connection_invalidated", False) and not isinstance(exc, OperationalError):
                raise
            if attempt == attempts - 1:
                raise TransientError(f"store unreachable: {exc}") from exc
            wait = min(30.0, first_wait_s * 2**attempt)
            log.warning("store error (%s); retrying in %.1fs", exc.__class__.__name__, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def run_batch(job_id: int, request_ids: list[int]) -> int:
    """Generate and store the results of one message's requests; returns how many were generated."""
    state = init_process()

    def claim():  # type: ignore[no-untyped-def]
        with state.sessions() as session:
            return claim_requests(session, job_id, request_ids, state.worker)

    claimed = with_db_retry(claim)
    if claimed is None or not claimed.requests:
        return 0
    if claimed.model != state.model:
        raise RuntimeError(f"job {job_id} wants model {claimed.model!r}, this worker holds {state.model!r}")
    requests = claimed.requests
    generation = [
        GenerationRequest(params=resolve_params(claimed.defaults, r.params or {}), prompt=r.prompt, messages=r.messages)
        for r in requests
    ]
    started_at, t0 = utcnow(), time.perf_counter()
    results = state.engine.generate(generation)
    seconds, finished_at = time.perf_counter() - t0, utcnow()
    outcomes = [
        _outcome(request.id, job_id, gen, result, state, started_at, finished_at, seconds)
        for request, gen, result in zip(requests, generation, results)
    ]

    def record() -> None:
        with state.sessions() as session:
            record_outcomes(session, job_id, outcomes)

    with_db_retry(record)
    return len(requests)


def _outcome(
    request_id: int,
    job_id: int,
    request: GenerationRequest,
    result: GenerationResult,
    state: WorkerState,
    started_at,  # type: ignore[no-untyped-def]
    finished_at,
    seconds: float,
) -> Outcome:
    if result.error is not None:
        return Outcome(request_id=request_id, prompt_tokens=result.prompt_tokens, error=result.error)
    engine = state.engine
    rows = []
    for index, sample in enumerate(result.samples):
        params = request.params.to_dict() | {"seed": sample.seed}
        rows.append(
            {
                "request_id": request_id,
                "job_id": job_id,
                "sample_index": index,
                "text": sample.text,
                "finish_reason": sample.finish_reason,
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": sample.completion_tokens,
                "params": params,
                "seed": sample.seed,
                "model": state.model,
                "dtype": engine.dtype,
                "quantization": engine.quantize,
                "worker_host": state.worker,
                "device": state.device,
                "started_at": started_at,
                "finished_at": finished_at,
                "generation_seconds": seconds,
            }
        )
    return Outcome(request_id=request_id, prompt_tokens=result.prompt_tokens, results=rows)
