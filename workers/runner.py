"""What a worker process does: load its model once, then turn queue messages into stored results.

A message is a job id and request ids. run_batch claims the takeable ones under a lease (renewed by
a heartbeat thread while the engine runs), generates, and stores results and request states in one
transaction; it repeats until nothing in the message is left to take. Requests that were started
before and did not finish are generated one at a time, so that a request that kills its worker takes
no other request with it, and it ends failed once it has been started max_attempts times.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, TypeVar

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from models.db import check_schema, make_engine, session_factory, utcnow
from models.store import Claim, Outcome, claim_requests, record_outcomes, release_requests, renew_leases
from workers import metrics, registry
from workers.settings import Settings, get_settings
from workers.types import GenerationRequest, GenerationResult, resolve_params

if TYPE_CHECKING:
    from workers.engine import Engine
    from workers.standin import StandInEngine

log = logging.getLogger("bulkgen.worker")
T = TypeVar("T")


class TransientError(Exception):
    """The store stayed unreachable for the whole retry window; the batch is handed back, never failed."""


@dataclass
class WorkerState:
    engine: "Engine | StandInEngine"
    sessions: sessionmaker[Session]
    model: str
    device: str
    worker: str
    settings: Settings


_state: WorkerState | None = None


def init_process() -> WorkerState:
    """Load the model and connect to the store; runs once per worker process, after fork.

    The store's engine is created here, in the pool child, never inherited from the parent.
    """
    global _state
    if _state is not None:
        return _state
    settings = get_settings()
    db = make_engine(settings.database_url)
    with_db_retry(lambda: check_schema(db), within_s=min(settings.db_retry_s, 120))
    spec = registry.resolve(settings.model)
    started = time.perf_counter()
    engine = _load_engine(spec, settings)
    load_s = time.perf_counter() - started
    log.info("loaded model %s on %s (%s) in %.1fs", spec.name, settings.device, settings.dtype, load_s)
    metrics.MODEL_LOAD.labels(spec.name, settings.device).set(load_s)
    metrics.serve(settings.metrics_port, _metrics_offset(settings.device))
    _state = WorkerState(
        engine=engine,
        sessions=session_factory(db),
        model=spec.name,
        device=settings.device,
        worker=f"{socket.gethostname()}:{os.getpid()}",
        settings=settings,
    )
    return _state


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
    return Engine.load(spec, settings.device, settings.dtype, settings.quantize, settings.batch_size)


def is_transient(exc: BaseException) -> bool:
    """The store is unreachable or busy (down, restarting, a deadlock, a lock timeout), not wrong."""
    if isinstance(exc, (OperationalError, InterfaceError)):
        return True
    return isinstance(exc, DBAPIError) and bool(getattr(exc, "connection_invalidated", False))


def with_db_retry(action: Callable[[], T], *, within_s: float | None = None, first_wait_s: float = 0.5, max_wait_s: float = 10.0) -> T:
    """Run a store operation, waiting out a store that is unreachable, with exponential backoff.

    Gives up with TransientError once within_s (the db_retry_s setting) has passed.
    """
    deadline = time.monotonic() + (get_settings().db_retry_s if within_s is None else within_s)
    attempt = 0
    while True:
        try:
            return action()
        except (OperationalError, DBAPIError) as exc:
            if not is_transient(exc):
                raise
            wait = min(max_wait_s, first_wait_s * 2**attempt)
            if time.monotonic() + wait > deadline:
                raise TransientError(f"store unreachable: {type(exc.orig).__name__ if exc.orig else exc}") from exc
            log.warning("store error (%s); retrying in %.1fs", type(exc.orig or exc).__name__, wait)
            time.sleep(wait)
            attempt += 1


class LeaseKeeper:
    """Renews the leases of the requests a worker holds, from a thread, while the engine runs."""

    def __init__(self, state: WorkerState, request_ids: list[int]) -> None:
        self.state = state
        self.request_ids = request_ids
        self.every_s = max(0.5, state.settings.lease_s / 4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bulkgen-lease", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=max(5.0, self.every_s))  # a renewal stuck on a dead store does not hold the batch up

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                with self.state.sessions() as session:
                    renew_leases(session, self.request_ids, self.state.worker, self.state.settings.lease_s)
            except Exception as exc:  # the store is down: the lease may lapse, and the work is then redone
                log.warning("cannot renew the lease of %d requests (%s)", len(self.request_ids), type(exc).__name__)


def run_batch(job_id: int, request_ids: list[int]) -> int:
    """Generate and store the results of one message's requests; returns how many were generated."""
    state = init_process()
    settings = state.settings
    generated = 0
    while True:
        def claim() -> Claim | None:
            with state.sessions() as session:
                return claim_requests(
                    session, job_id, request_ids, state.worker, lease_s=settings.lease_s, max_attempts=settings.max_attempts
                )

        claimed = with_db_retry(claim)
        if claimed is None or not claimed.requests:
            return generated
        if claimed.gave_up:
            log.warning("job %d: gave up on requests %s after %d attempts", job_id, claimed.gave_up, settings.max_attempts)
        stored = _generate_claim(state, job_id, claimed)
        generated += stored
        if stored and not claimed.one_by_one and len(claimed.requests) + len(claimed.gave_up) >= len(set(request_ids)):
            return generated  # every id was claimed at once and stored: nothing is left to claim


def _generate_claim(state: WorkerState, job_id: int, claimed: Claim) -> int:
    ids = [r.id for r in claimed.requests]
    if claimed.model != state.model:
        _release(state, ids, f"this worker holds model {state.model!r}")
        raise RuntimeError(f"job {job_id} wants model {claimed.model!r}, this worker holds {state.model!r}")
    if claimed.one_by_one:
        log.info("job %d: request %d was started before without finishing; generating it alone", job_id, ids[0])
    generation = []
    with LeaseKeeper(state, ids):
        try:
            generation = [
                GenerationRequest(params=resolve_params(claimed.defaults, r.params or {}), prompt=r.prompt, messages=r.messages)
                for r in claimed.requests
            ]
            _test_faults_before_generation(claimed)
            started_at, t0 = utcnow(), time.perf_counter()
            _observe_queue_wait(state.model, claimed, started_at)
            results = state.engine.generate(generation)
            seconds, finished_at = time.perf_counter() - t0, utcnow()
            metrics.BATCH_SIZE.labels(state.model).observe(len(generation))
            metrics.GENERATION.labels(state.model).observe(seconds)
        except SoftTimeLimitExceeded:
            _release(state, ids, f"the batch outlived the soft time limit ({state.settings.task_soft_time_limit_s} s)")
            raise
        except Exception as exc:  # the engine failed on the batch: each request is tried again, alone
            log.exception("job %d: generating %d requests failed; they are handed back", job_id, len(ids))
            _release(state, ids, f"{type(exc).__name__}: {exc}"[:2000])
            return 0
    outcomes = [
        _outcome(request.id, job_id, gen, result, state, started_at, finished_at, seconds)
        for request, gen, result in zip(claimed.requests, generation, results)
    ]

    def record() -> None:
        with state.sessions() as session:
            record_outcomes(session, job_id, outcomes)

    with_db_retry(record)
    _count_outcomes(state.model, outcomes)
    _test_crash_after_commit(outcomes)
    return len(ids)


def _observe_queue_wait(model: str, claimed: Claim, now: datetime) -> None:
    for request in claimed.requests:
        since = _as_utc(request.enqueued_at or claimed.job_created_at)
        if since is not None:
            metrics.QUEUE_WAIT.labels(model).observe(max(0.0, (now - since).total_seconds()))


def _as_utc(moment: datetime | None) -> datetime | None:
    if moment is not None and moment.tzinfo is None:  # SQLite gives naive UTC datetimes back
        return moment.replace(tzinfo=timezone.utc)
    return moment


def _count_outcomes(model: str, outcomes: list[Outcome]) -> None:
    for outcome in outcomes:
        if outcome.error is not None:
            metrics.REQUESTS.labels(model, "failed").inc()
            continue
        metrics.REQUESTS.labels(model, "done").inc()
        metrics.PROMPT_TOKENS.labels(model).inc(outcome.prompt_tokens)
        metrics.TOKENS.labels(model).inc(sum(row["completion_tokens"] for row in outcome.results))


def _release(state: WorkerState, ids: list[int], reason: str) -> None:
    def release() -> None:
        with state.sessions() as session:
            release_requests(session, ids, state.worker, reason)

    try:
        with_db_retry(release, within_s=60)
    except TransientError:  # their leases lapse and the reconciler takes them back instead
        log.warning("could not hand back requests %s; their leases will lapse", ids)


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
                "logprobs": sample.logprobs,
            }
        )
    return Outcome(request_id=request_id, prompt_tokens=result.prompt_tokens, results=rows)


# --- test-only fault hooks (tests/faults/, docs/reliability.md) ----------------------------------
# Each is inert unless its BULKGEN_TEST_* environment variable is set; none is set in production.

def _test_faults_before_generation(claimed: Claim) -> None:
    """BULKGEN_TEST_POISON=TEXT: a request whose prompt holds TEXT kills its worker process (SIGKILL),
    as a request that crashes the runtime or runs it out of memory would.
    BULKGEN_TEST_DELAY_PER_REQUEST_S=S: each request takes S seconds longer (the stand-in engine is instant).
    """
    poison = os.environ.get("BULKGEN_TEST_POISON")
    if poison and any(poison in (r.prompt or "") for r in claimed.requests):
        log.error("BULKGEN_TEST_POISON: request in %s kills this worker process", [r.id for r in claimed.requests])
        os.kill(os.getpid(), signal.SIGKILL)
    delay = float(os.environ.get("BULKGEN_TEST_DELAY_PER_REQUEST_S") or 0)
    if delay:
        time.sleep(delay * len(claimed.requests))


def _test_crash_after_commit(outcomes: list[Outcome]) -> None:
    """BULKGEN_TEST_CRASH_AFTER_COMMIT=PATH: the first worker (fleet-wide) to commit a batch writes
    the rows it committed to PATH and kills its own process before the message is acknowledged."""
    path = os.environ.get("BULKGEN_TEST_CRASH_AFTER_COMMIT")
    if not path:
        return
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    rows = [
        {"request_id": row["request_id"], "sample_index": row["sample_index"], "text": row["text"], "seed": row["seed"]}
        for outcome in outcomes
        for row in outcome.results
    ]
    with os.fdopen(fd, "w") as out:
        json.dump({"pid": os.getpid(), "rows": rows}, out)
    log.error("BULKGEN_TEST_CRASH_AFTER_COMMIT: killing this worker process after its commit, before its ack")
    os.kill(os.getpid(), signal.SIGKILL)
