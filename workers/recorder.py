"""The recorder: a worker's thread that writes finished requests to the store, one transaction per job (the
idempotent writes and job counters of models.store.record_outcomes), and only then lets the worker go of them.

A write the store refuses (not an outage: a value it cannot hold, a constraint) is isolated: the job's outcomes
are written one by one, and the one still refused ends its request failed with the store's reason
(contract.policy, 7). The recorder never dies of a write: what it cannot record keeps its lease until it lapses.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from contract.logs import about
from contract.policy import STORE_REFUSED, TransientError, storable, with_store_retry
from models.store import Outcome, ResultRow
from workers import metrics
from workers.held import Held
from workers.types import GenerationResult

if TYPE_CHECKING:
    from workers.worker import SteppedEngine

log = logging.getLogger("bulkgen.worker")
Record = Callable[[Session, int, list[Outcome]], Any]


@dataclass(frozen=True)
class Finished:
    """A request whose last row finished, as the recorder takes it from the worker."""

    held: Held
    result: GenerationResult
    finished_at: datetime
    seconds: float
    """From entering the engine to its last row finishing."""
    occupancy: float | None
    """The batch's mean occupancy while it ran (None: no decode steps)."""


class Outbox(Protocol):
    """What the recorder asks of its worker (workers.worker.Worker)."""

    engine: SteppedEngine

    def take_finished(self) -> list[Finished] | None: ...
    def let_go(self, batch: list[Finished]) -> None: ...


class Recorder:
    """Writes what outbox finished, as `worker` with `model` on `device`; record is the store write (a test wraps
    it: workers.faults); retry_s: how long one write waits out a store that is down (the db_retry_s setting)."""

    def __init__(self, outbox: Outbox, sessions: sessionmaker[Session], model: str, device: str, worker: str,
                 record: Record, retry_s: float) -> None:
        self.outbox = outbox
        self.sessions = sessions
        self.model = model
        self.device = device
        self.worker = worker
        self.record = record
        self.retry_s = retry_s

    def run(self) -> None:
        """The thread's body: until the worker stops with nothing left to record."""
        while (batch := self.outbox.take_finished()) is not None:
            by_job: dict[int, list[Outcome]] = {}
            for finished in batch:
                by_job.setdefault(finished.held.job_id, []).append(self.outcome(finished))
            for job_id, outcomes in by_job.items():
                try:
                    written = self.write(job_id, outcomes)
                except Exception:  # never let the recorder die: the requests' leases lapse and they are redone
                    log.exception("job %d: %d results could not be recorded", job_id, len(outcomes),
                                  extra=about(job_id, [o.request_id for o in outcomes]))
                    continue
                count_outcomes(self.model, written)
                log.info("job %d: recorded %d requests", job_id, len(written), extra=about(job_id, [o.request_id for o in written]))
            self.outbox.let_go(batch)

    def write(self, job_id: int, outcomes: list[Outcome]) -> list[Outcome]:
        """Record outcomes in one transaction, waiting out a store that is down (contract.policy, 1b); when the
        store refuses the write itself, each outcome alone, and one it still refuses ends its request failed with
        the store's reason (contract.policy, 7). Returns what was recorded."""

        def record() -> None:
            with metrics.STORE_WRITE.labels(self.model).time(), self.sessions() as session:
                self.record(session, job_id, outcomes)

        while True:
            try:
                with_store_retry(record, within_s=self.retry_s)
                return outcomes
            except TransientError:  # keep the results and keep trying: the first write still wins
                log.warning("job %d: the store is still unreachable; %d results wait to be written", job_id,
                            len(outcomes), extra=about(job_id, [o.request_id for o in outcomes]))
            except DBAPIError as exc:
                if len(outcomes) > 1:
                    return [written for outcome in outcomes for written in self.write(job_id, [outcome])]
                (outcome,) = outcomes
                if outcome.error is not None and outcome.error.startswith(STORE_REFUSED):
                    raise
                reason = f"{STORE_REFUSED}{type(exc.orig or exc).__name__}: {str(exc.orig or exc).splitlines()[0]}"[:2000]
                log.error("job %d: request %d failed: %s", job_id, outcome.request_id, reason, extra=about(job_id, [outcome.request_id]))
                return self.write(job_id, [Outcome(outcome.request_id, outcome.prompt_tokens, error=reason)])

    def outcome(self, finished: Finished) -> Outcome:
        """A finished request's result rows, or the engine's reason it failed."""
        h, result = finished.held, finished.result
        if result.error is not None:
            return Outcome(request_id=h.request.id, prompt_tokens=result.prompt_tokens, error=result.error)
        engine = self.outbox.engine
        per_request = dict(  # the same for every sample of the request
            request_id=h.request.id, job_id=h.job_id, prompt_tokens=result.prompt_tokens, model=self.model,
            dtype=engine.dtype, quantization=engine.quantize, worker_host=self.worker, device=self.device,
            started_at=h.started_at or h.claimed_at, finished_at=finished.finished_at,
            generation_seconds=finished.seconds, batch_occupancy=finished.occupancy,
        )
        params = h.generation.params.to_dict()
        rows = [
            ResultRow(
                **per_request, sample_index=index, text=storable(sample.text), finish_reason=sample.finish_reason,
                completion_tokens=sample.completion_tokens, params=params | {"seed": sample.seed}, seed=sample.seed,
                logprobs=sample.logprobs, cached_prompt_tokens=sample.cached_tokens, draft_tokens=sample.draft_tokens,
                accepted_draft_tokens=sample.accepted_tokens, constrained=h.generation.params.constraint is not None,
                reasoning_content=None if sample.reasoning is None else storable(sample.reasoning),
            )
            for index, sample in enumerate(result.samples)
        ]
        metrics.GENERATION.labels(self.model).observe(finished.seconds)
        return Outcome(request_id=h.request.id, prompt_tokens=result.prompt_tokens, results=rows)


def count_outcomes(model: str, outcomes: list[Outcome]) -> None:
    """The request and token counters of what was recorded."""
    for outcome in outcomes:
        if outcome.error is not None:
            metrics.REQUESTS.labels(model, "failed").inc()
            continue
        metrics.REQUESTS.labels(model, "done").inc()
        metrics.PROMPT_TOKENS.labels(model).inc(outcome.prompt_tokens)
        if outcome.results:  # the request's prompt once, as prompt_tokens: its first sample's share from the cache
            metrics.CACHED_PROMPT_TOKENS.labels(model).inc(outcome.results[0]["cached_prompt_tokens"] or 0)
        # every sample's own, as completion tokens: each sample decodes (and drafts) on its own
        metrics.DRAFT_TOKENS.labels(model).inc(sum(row["draft_tokens"] or 0 for row in outcome.results))
        metrics.ACCEPTED_DRAFT_TOKENS.labels(model).inc(sum(row["accepted_draft_tokens"] or 0 for row in outcome.results))
        metrics.TOKENS.labels(model).inc(sum(row["completion_tokens"] for row in outcome.results))
