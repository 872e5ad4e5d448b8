"""A worker process's one Worker: it keeps the engine's batch full across queue messages.

Three threads share it:
- the task (Celery's, one message at a time) claims the message's requests in the store under a lease and
  puts them in the inbox; it returns, and the message is acknowledged, once the worker has less than a
  quarter of a batch waiting, so that the next message arrives before the batch has room for it;
- the engine thread moves claims from the inbox into the engine (engine.submit) and steps it; each
  request's result goes to the outbox as soon as its last row finishes;
- the recorder thread (workers.recorder) writes the outbox in one transaction per job (the same idempotent
  writes and job counters as ever) and only then lets go of the requests.
A lease keeper (workers.leases) renews the lease of every request the worker holds (claimed, not yet recorded).

When a message is acknowledged (docs/reliability.md): once each of its requests is settled in the store or
held by this worker under a lease it renews. From then on the lease, not the broker, carries the work: a
worker killed at any moment leaves its requests running under a lease that lapses, and the reconciler puts
them back on the queue; nothing is lost, and the first write of a result wins, so nothing is written twice.

A request started before (its claim says one_by_one) runs alone: the worker finishes and records everything
it holds, takes nothing else meanwhile, and only then admits it; the next such request is claimed only once
this one is recorded. So a request that kills its worker takes no other request, and no other attempt, with it.
When the engine raises (out of memory it handles itself: contract.policy, 3), every request it holds is handed back and each is claimed again, alone; the one that
keeps failing ends failed after max_attempts.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy.orm import Session, sessionmaker

from contract.errors import WrongModel
from contract.logs import about
from contract.policy import RELEASE_WITHIN_S, TransientError, with_store_retry
from contract.settings import Settings
from contract.structured import Constraint
from models.db import as_utc, utcnow
from models.store import Claim, claim_requests, record_outcomes, release_requests
from workers import metrics
from workers.held import Held, Work
from workers.leases import LeaseKeeper
from workers.recorder import Finished, Record, Recorder
from workers.standin import WholeBatches
from workers.types import GenerationRequest, GenerationResult, SamplingParams, resolve_params

log = logging.getLogger("bulkgen.worker")


class SteppedEngine(Protocol):
    """What the worker drives: workers.engine.Engine, or WholeBatches around an engine with generate() only."""

    dtype: str
    quantize: str

    def submit(self, key: Hashable, request: GenerationRequest) -> None: ...
    def step(self) -> list[tuple[Hashable, GenerationResult]]: ...
    def clear(self) -> list[Hashable]: ...
    @property
    def idle(self) -> bool: ...
    @property
    def waiting_rows(self) -> int: ...
    @property
    def running_rows(self) -> int: ...


class Worker:
    """Claims, generates and records for one worker process (see the module's docstring)."""

    def __init__(
        self,
        engine: Any,
        sessions: sessionmaker[Session],
        model: str,
        device: str,
        worker: str,
        settings: Settings,
        load: Callable[[], Any] | None = None,
        wrap_engine: Callable[[SteppedEngine], SteppedEngine] | None = None,
        record: Record = record_outcomes,
    ) -> None:
        """engine: a loaded engine; or None and load, which the engine thread calls first. On a CPU, every torch
        operation must run in the thread that loaded the model: a second OpenMP thread pool in the same process
        (the engine thread's, beside the loading thread's) measured 1.6x slower, using 1.25 of 2 cores.
        wrap_engine and record: what a test puts around the engine and the store write (workers.faults)."""
        assert (engine is None) != (load is None), "give a loaded engine or a way to load one"
        self._load = load
        self._wrap_engine = wrap_engine
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self.engine: SteppedEngine = WholeBatches(None) if engine is None else self._wrap(engine)
        self.sessions = sessions
        self.model = model
        self.device = device
        self.worker = worker
        self.settings = settings
        self.room_below = max(1, settings.batch_size // 4)
        """The task returns (its message is acknowledged) once fewer rows than this wait."""
        self._lock = threading.Condition()
        self._inbox: deque[Work] = deque()
        self._held: dict[int, Held] = {}
        self._outbox: list[tuple[Held, GenerationResult, datetime, float]] = []
        self._alone_running = False
        self._recording = False
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._occupancy = (0.0, 0)
        self._recorder = Recorder(self, sessions, model, device, worker, record, settings.db_retry_s)
        self._lease_keeper = LeaseKeeper(self, sessions, worker, settings.lease_s)
        if engine is not None:
            self.engine.on_step(self._observe_step)  # type: ignore[attr-defined]
            self._loaded.set()
        else:
            self._start()

    def _wrap(self, engine: Any) -> SteppedEngine:
        stepped = engine if hasattr(engine, "submit") else WholeBatches(engine)
        return self._wrap_engine(stepped) if self._wrap_engine is not None else stepped

    def wait_loaded(self) -> None:
        """Until the engine thread has loaded the model; raises what the load raised."""
        self._loaded.wait()
        if self._load_error is not None:
            raise self._load_error

    # --- the task's side ---------------------------------------------------------------------------

    def handle(self, job_id: int, request_ids: list[int]) -> int:
        """Claim a message's requests and hand them to the engine; returns how many were claimed, once the
        worker has room for the next message."""
        self._start()
        self.wait_loaded()
        claimed_count = 0
        wanted = list(dict.fromkeys(request_ids))
        while True:
            with self._lock:
                todo = [i for i in wanted if i not in self._held]  # a duplicate message: what we hold stays ours

            claimed = self._claim(job_id, todo) if todo else None
            if claimed is None or not claimed.requests:
                break
            if claimed.gave_up:
                log.warning("job %d: gave up on requests %s after %d attempts", job_id, claimed.gave_up,
                            self.settings.max_attempts, extra=about(job_id, claimed.gave_up))
            if claimed.model != self.model:
                self._release([r.id for r in claimed.requests], f"this worker holds model {self.model!r}")
                raise WrongModel(f"job {job_id} wants model {claimed.model!r}, this worker holds {self.model!r}")
            self._accept(claimed)
            claimed_count += len(claimed.requests)
            log.info("job %d: claimed %d requests", job_id, len(claimed.requests),
                     extra=about(job_id, [r.id for r in claimed.requests]))
            if claimed.one_by_one:  # claim the next one only once this one is recorded: a request waiting
                self._wait_recorded([r.id for r in claimed.requests])  # behind a poison would lose attempts to it
            if not claimed.one_by_one and len(claimed.requests) + len(claimed.gave_up) >= len(todo):
                break  # every id was claimed at once: nothing is left to claim
        self._wait_for_room()
        return claimed_count

    def _claim(self, job_id: int, ids: list[int]) -> Claim | None:
        """claim_requests under this worker's lease, waiting out a store that is down."""
        def claim() -> Claim | None:
            with self.sessions() as session:
                return claim_requests(
                    session, job_id, ids, self.worker, lease_s=self.settings.lease_s, max_attempts=self.settings.max_attempts
                )

        return with_store_retry(claim, within_s=self.settings.db_retry_s)

    def _accept(self, claimed: Claim) -> None:
        if claimed.one_by_one:
            log.info("job %d: request %d was started before without finishing; generating it alone", claimed.job_id,
                     claimed.requests[0].id, extra=about(claimed.job_id, [claimed.requests[0].id]))
            metrics.RETRIES.labels(self.model, "restarted").inc(len(claimed.requests))
        now = utcnow()
        held = self._held_of(claimed, now)
        _observe_queue_wait(self.model, claimed, now)
        metrics.BATCH_SIZE.labels(self.model).observe(len(held))
        with self._lock:
            for h in held:
                self._held[h.request.id] = h
            self._inbox.append(Work(claimed.job_id, held, alone=claimed.one_by_one))
            self._lock.notify_all()

    @staticmethod
    def _held_of(claimed: Claim, now: datetime) -> list[Held]:
        return [
            Held(claimed.job_id, r, GenerationRequest(params=_params(claimed, r), prompt=r.prompt, messages=r.messages), now)
            for r in claimed.requests
        ]

    def _wait_recorded(self, ids: list[int]) -> None:
        with self._lock:
            while not self._stopping and any(i in self._held for i in ids):
                self._lock.wait(timeout=1.0)

    def _wait_for_room(self) -> None:
        with self._lock:
            while not self._stopping and self._backlog() >= self.room_below:
                self._lock.wait(timeout=1.0)

    def _backlog(self) -> int:
        """Requests claimed and not running yet (in the inbox or waiting in the engine)."""
        return self.engine.waiting_rows + sum(len(w.held) + len(w.reclaim) for w in self._inbox)

    # --- the whole worker ------------------------------------------------------------------------

    def _start(self) -> None:
        with self._lock:
            if self._threads:
                return
            threads = ((self._engine_loop, "bulkgen-engine"), (self._recorder.run, "bulkgen-recorder"), (self._lease_keeper.run, "bulkgen-lease"))
            for target, name in threads:
                thread = threading.Thread(target=target, name=name, daemon=True)
                self._threads.append(thread)
                thread.start()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Until everything claimed is recorded (or handed back); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._held or self._inbox:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._lock.wait(timeout=1.0 if left is None else min(1.0, left))
        return True

    def shutdown(self, timeout: float | None = None) -> None:
        """Finish and record everything held, then stop the threads (the process is about to exit)."""
        if self._threads:
            held = len(self._held)
            if held:
                log.info("finishing the %d requests this worker holds before it exits", held)
            self.wait_idle(timeout)
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads = []

    # --- the engine thread -----------------------------------------------------------------------

    def _engine_loop(self) -> None:
        if self._load is not None:
            try:
                self.engine = self._wrap(self._load())
                self.engine.on_step(self._observe_step)  # type: ignore[attr-defined]
            except BaseException as exc:  # the process cannot work without its model: wait_loaded re-raises it
                self._load_error = exc
                return
            finally:
                self._loaded.set()
        while True:
            try:
                if not self._engine_turn():
                    return
            except Exception as exc:  # the engine failed on its batch: each request is tried again, alone
                self._hand_back_all(exc)

    def _engine_turn(self) -> bool:
        """Admit what the inbox allows, run one engine step, pass on what finished; False when stopping."""
        with self._lock:
            while not self._stopping and not self._admissible() and self.engine.idle:
                self._lock.wait(timeout=1.0)
            if self._stopping:
                return False
            work = self._take_admissible()
        for item in work:
            if item.reclaim:
                self._reclaim(item)
                continue
            mark, now = self._occupancy, utcnow()
            for h in item.held:
                h.occupancy_mark, h.started_at = mark, now
                self.engine.submit(h.request.id, h.generation)
        if not self.engine.idle:
            self._step()
        return True

    def _step(self) -> None:
        results = self.engine.step()
        finished_at = utcnow()
        if results:
            metrics.observe_gpu_memory(self.model, self.device)
        with self._lock:
            for key, result in results:
                h = self._held.get(int(key))  # type: ignore[call-overload]
                if h is not None:
                    self._outbox.append((h, result, finished_at, self._seconds(h, finished_at)))
            if self._alone_running and self.engine.idle:
                self._alone_running = False
            self._lock.notify_all()  # results for the recorder, and room for the task perhaps

    def _admissible(self) -> bool:
        if not self._inbox or self._alone_running:
            return False
        head = self._inbox[0]
        return not (head.alone or head.reclaim) or self._settled()

    def _settled(self) -> bool:
        """Nothing generating and nothing waiting to be recorded: what runs alone now can take nothing with it."""
        return self.engine.idle and not self._outbox and not self._recording

    def _take_admissible(self) -> list[Work]:
        """Inbox items the engine may take now: claims until one that must run alone (taken only when everything
        else is generated and recorded, and then by itself)."""
        taken: list[Work] = []
        while self._inbox and not self._alone_running:
            head = self._inbox[0]
            if head.alone or head.reclaim:
                if taken or not self._settled():
                    break
                if head.reclaim:  # stays in the inbox until _reclaim replaces it: the worker is never seen idle
                    taken.append(head)
                    break
                taken.append(self._inbox.popleft())
                self._alone_running = True
                break
            taken.append(self._inbox.popleft())
        return taken

    def _reclaim(self, item: Work) -> None:
        """Claim the first of the handed-back ids again, to run alone; the rest wait behind it."""
        first, rest = item.reclaim[0], item.reclaim[1:]
        claimed = self._claim(item.job_id, [first])
        if claimed is not None and claimed.gave_up:
            log.warning("job %d: gave up on request %s after %d attempts", item.job_id, claimed.gave_up,
                        self.settings.max_attempts, extra=about(item.job_id, claimed.gave_up))
        with self._lock:
            self._inbox.remove(item)
            if rest:
                self._inbox.appendleft(Work(item.job_id, reclaim=rest))
            if claimed is not None and claimed.requests:
                metrics.RETRIES.labels(self.model, "engine_error").inc(len(claimed.requests))
                held = self._held_of(claimed, utcnow())
                for h in held:
                    self._held[h.request.id] = h
                self._inbox.appendleft(Work(claimed.job_id, held, alone=True))
            self._lock.notify_all()

    def _hand_back_all(self, exc: Exception) -> None:
        """The engine raised: every request it holds goes back to queued (attempts counted), to be claimed again
        one by one by this worker."""
        keys = set(self.engine.clear())
        reason = f"{type(exc).__name__}: {exc}"[:2000]
        by_job: dict[int, list[int]] = {}
        with self._lock:
            back = [self._held.pop(int(k)) for k in keys if int(k) in self._held]  # type: ignore[call-overload]
            self._alone_running = False
            for h in back:
                by_job.setdefault(h.job_id, []).append(h.request.id)
            for job_id, ids in by_job.items():  # claimed again only after the release below (this thread does both)
                self._inbox.appendleft(Work(job_id, reclaim=sorted(ids)))
            self._lock.notify_all()
        log.error("generating %d requests failed (%s); they are handed back and tried again one by one", len(back), reason, exc_info=exc)
        for job_id, ids in by_job.items():
            log.warning("job %d: %d requests handed back after an engine error", job_id, len(ids), extra=about(job_id, ids))
            self._release(ids, reason)

    def _release(self, ids: list[int], reason: str) -> None:
        def release() -> None:
            with self.sessions() as session:
                release_requests(session, ids, self.worker, reason)

        try:
            with_store_retry(release, within_s=RELEASE_WITHIN_S)
        except TransientError:  # their leases lapse and the reconciler takes them back instead
            log.warning("could not hand back requests %s; their leases will lapse", ids, extra=about(None, ids))

    # --- occupancy -----------------------------------------------------------------------------------

    def _observe_step(self, running: int, slots: int) -> None:
        occupancy = running / max(1, slots)
        total, steps = self._occupancy
        self._occupancy = (total + occupancy, steps + 1)
        metrics.RUNNING_ROWS.labels(self.model).set(running)
        metrics.OCCUPANCY.labels(self.model).observe(occupancy)

    @staticmethod
    def _seconds(h: Held, finished_at: datetime) -> float:
        """From entering the engine to its last row finishing."""
        started = as_utc(h.started_at or h.claimed_at)
        return max(0.0, (finished_at - started).total_seconds()) if started is not None else 0.0

    def _mean_occupancy(self, h: Held) -> float | None:
        total, steps = self._occupancy
        then_total, then_steps = h.occupancy_mark
        return round((total - then_total) / (steps - then_steps), 4) if steps > then_steps else None

    # --- what the recorder and the lease keeper take ----------------------------------------------

    def take_finished(self) -> list[Finished] | None:
        """The requests finished since the last call, once there are any; None once stopping with none left.
        Until let_go, nothing runs alone: they are being recorded."""
        with self._lock:
            while not self._stopping and not self._outbox:
                self._lock.wait(timeout=1.0)
            if self._stopping and not self._outbox:
                return None
            batch, self._outbox = self._outbox, []
            self._recording = True
        return [Finished(h, result, finished_at, seconds, self._mean_occupancy(h)) for h, result, finished_at, seconds in batch]

    def let_go(self, batch: list[Finished]) -> None:
        """The recorder is done with batch (recorded, or left to lapse): this worker no longer holds it."""
        with self._lock:
            for finished in batch:
                self._held.pop(finished.held.request.id, None)
            self._recording = False
            self._lock.notify_all()

    def wait_held(self, timeout: float) -> list[int] | None:
        """After timeout seconds, the ids this worker holds; None as soon as it stops."""
        with self._lock:
            self._lock.wait_for(lambda: self._stopping, timeout=timeout)
            return None if self._stopping else list(self._held)


def _observe_queue_wait(model: str, claimed: Claim, now: datetime) -> None:
    for request in claimed.requests:
        since = as_utc(request.enqueued_at or claimed.job_created_at)
        if since is not None:
            metrics.QUEUE_WAIT.labels(model).observe(max(0.0, (now - since).total_seconds()))


def _params(claimed: Claim, request: Any) -> SamplingParams:
    """A claimed request's sampling parameters: the job's defaults, its own values, its structured-output constraint."""
    params = resolve_params(claimed.defaults, request.params or {})
    key = request.constraint_key
    if key is not None:
        kind, spec = claimed.constraints.get(key, (f"missing (the job stores no constraint {key[:12]})", ""))
        params.constraint = Constraint(kind, spec)
    return params
