"""The reconciler: the store says what work is owed; whatever Redis no longer carries is sent again.

Redis only carries work. A message can vanish between a worker's fetch and kombu's unacked set
(celery/celery#5935), a Redis without persistence loses all it held, a worker can die holding a batch.
A sweep, for every job whose submit finished and that is not final:

1. a running request whose lease has passed (its worker is gone) goes back to queued, or ends failed
   if it has been started max_attempts times;
2. a queued request last enqueued more than reconcile_grace_s ago that no message in Redis carries
   (not in its model's queue, not taken by a worker within the grace) is sent again.

Duplicates are harmless (a claim skips finished and leased requests; result writes are idempotent),
but sweeps avoid them: only what is missing from Redis is sent, and at most one worker of a fleet
sweeps per interval (a Redis lock: take_lock). Torch-free and worker-free: `producer reconcile`, `retry` and
`submit --resume` run it; each worker's main process runs it every reconcile_interval_s (workers.reconcile.FleetReconciler).
"""
from __future__ import annotations

import json
import logging
import time
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, select

from contract.broker import Sender
from contract.errors import JobNotFound
from contract.messages import decode_kombu, queue_name
from contract.redis_acl import LOCK_KEY
from contract.streams import batched
from contract.settings import Settings, get_settings
from models.db import session_factory, utcnow
from models.intake import mark_enqueued
from models.store import (
    OpenJob,
    close_cancelled_leases,
    complete_job_if_finished,
    expire_leases,
    iter_stale_queued,
    mark_requests_enqueued,
    open_jobs,
)
from models.tables import Job, JobStatus

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger("bulkgen.reconcile")

PAGE = 1000
"""Messages read from a Redis list per LRANGE."""
MARK_CHUNK = 5000
"""Request ids per UPDATE (SQLite accepts at most 32,766 bound parameters)."""


# --- what Redis still carries ---------------------------------------------------------------------

class CarriedIds:
    """Request ids that messages in Redis carry, per job: sorted arrays of 8-byte ints (1M ids = 8 MB)."""

    def __init__(self) -> None:
        self._ids: dict[int, array[int]] = {}
        self._sorted = False
        self.messages = 0

    def add(self, job_id: int, ids: Iterable[int]) -> None:
        self._ids.setdefault(job_id, array("q")).extend(ids)
        self._sorted = False
        self.messages += 1

    def __contains__(self, key: tuple[int, int]) -> bool:
        if not self._sorted:
            self._ids = {job: array("q", sorted(set(ids))) for job, ids in self._ids.items()}
            self._sorted = True
        job_id, request_id = key
        ids = self._ids.get(job_id)
        if not ids:
            return False
        at = bisect_left(ids, request_id)
        return at < len(ids) and ids[at] == request_id


def carried_ids(link: BrokerLink, queues: Iterable[str], taken_within_s: float) -> CarriedIds:
    """The request ids of the messages waiting in these queues (every priority list), plus those of
    messages a worker took less than taken_within_s ago and has not acknowledged (kombu's unacked
    hash). A message taken longer ago than that and still unacknowledged has lost its worker (or
    its worker lost the connection): Redis gives it back only after the visibility timeout, so it
    does not count as carried.
    """
    client = link.client
    carried = CarriedIds()
    for queue in queues:
        for key in link.priority_keys(queue):
            start = 0
            while True:
                # New messages are pushed at the head and taken from the tail: paging from the head
                # may read one twice, never skips one.
                page = client.lrange(key, start, start + PAGE - 1)
                for raw in page:
                    _add(carried, raw)
                if len(page) < PAGE:
                    break
                start += PAGE
    cutoff = time.time() - taken_within_s
    tags = list(client.zrangebyscore(link.unacked_index_key, cutoff, "+inf"))
    for chunk in batched(tags, PAGE):
        for raw in client.hmget(link.unacked_key, chunk):
            if raw is not None:
                try:
                    _add_payload(carried, json.loads(raw)[0])
                except (ValueError, IndexError, TypeError):
                    pass
    return carried


def _add(carried: CarriedIds, raw: bytes | str) -> None:
    try:
        _add_payload(carried, json.loads(raw))
    except ValueError:
        pass


def _add_payload(carried: CarriedIds, payload: Any) -> None:
    envelope = decode_kombu(payload)
    if envelope is not None:
        carried.add(envelope.job_id, envelope.request_ids)


# --- sending --------------------------------------------------------------------------------------

@dataclass
class BrokerLink:
    """One connection to the broker: its Redis client (to read queues) and a producer (to send)."""

    app: Celery
    channel: Any
    producer: Any
    sender: Sender = field(init=False)

    def __post_init__(self) -> None:
        self.sender = Sender(self.app, producer=self.producer, batch=1)

    @property
    def client(self) -> Any:
        return self.channel.client

    @property
    def unacked_key(self) -> str:
        return self.channel.unacked_key

    @property
    def unacked_index_key(self) -> str:
        return self.channel.unacked_index_key

    def priority_keys(self, queue: str) -> list[str]:
        """The Redis lists kombu keeps for one queue, one per priority step."""
        return sorted({self.channel._q_for_pri(queue, pri) for pri in self.channel.priority_steps})

    def send(self, queue: str, job_id: int, ids: list[int]) -> None:
        self.sender(queue, job_id, ids)


@contextmanager
def broker(app: Celery) -> Iterator[BrokerLink]:
    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=3, interval_start=0.2, interval_step=0.5)
        with app.producer_or_acquire() as producer:
            yield BrokerLink(app, connection.default_channel, producer)


def send_requests(db: Engine, link: BrokerLink, job_id: int, model: str, ids: list[int], ids_per_message: int) -> int:
    """Record the enqueue and send the ids still queued, in groups; returns how many were sent."""
    sessions = session_factory(db)
    queue = queue_name(model)
    sent = 0
    for chunk in batched(ids, MARK_CHUNK):
        with sessions() as session:
            still_queued = mark_requests_enqueued(session, chunk)
        for group in batched(still_queued, ids_per_message):
            link.send(queue, job_id, group)
            sent += len(group)
    return sent


# --- the sweep ------------------------------------------------------------------------------------

@dataclass
class SweepReport:
    jobs: int = 0
    expired: int = 0
    """Running requests whose lease had passed, put back to queued."""
    gave_up: int = 0
    """Requests that ended failed: started max_attempts times, their worker lost each time."""
    resent: int = 0
    """Queued requests that no message in Redis carried, sent again."""
    completed: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def __str__(self) -> str:
        return (
            f"{self.jobs} open jobs: {self.expired} lapsed leases, {self.gave_up} given up, "
            f"{self.resent} requests re-enqueued, {len(self.completed)} jobs completed ({self.seconds:.2f}s)"
        )


def sweep(db: Engine, app: Celery, settings: Settings | None = None, job_ids: Iterable[int] | None = None) -> SweepReport:
    """One pass of the reconciler over every open job (or only job_ids); see the module's docstring."""
    settings = settings or get_settings()
    started = time.monotonic()
    sessions = session_factory(db)
    report = SweepReport()
    with sessions() as session:
        jobs = open_jobs(session)
    if job_ids is not None:
        wanted = set(job_ids)
        jobs = [job for job in jobs if job.id in wanted]
    report.jobs = len(jobs)
    now = utcnow()
    if job_ids is None:
        with sessions() as session:
            close_cancelled_leases(session, now)
    for job in jobs:
        with sessions() as session:
            requeued, failed = expire_leases(session, job.id, settings.max_attempts, now)
        report.expired += len(requeued)
        report.gave_up += len(failed)
    before = now - timedelta(seconds=settings.reconcile_grace_s)
    owing = [job for job in jobs if _first(iter_stale_queued(db, job, before, chunk=1)) is not None]
    if owing:
        with broker(app) as link:
            report.resent = _resend_missing(db, link, owing, before, settings)
    for job in jobs:
        with sessions() as session:
            complete_job_if_finished(session, job.id)
            session.commit()
            if session.scalar(select(Job.status).where(Job.id == job.id)) == JobStatus.COMPLETED:
                report.completed.append(job.id)
    report.seconds = time.monotonic() - started
    return report


def _first(items: Iterator[Any]) -> Any:
    return next(items, None)


def _resend_missing(db: Engine, link: BrokerLink, jobs: list[OpenJob], before: Any, settings: Settings) -> int:
    carried = carried_ids(link, sorted({queue_name(job.model) for job in jobs}), settings.reconcile_grace_s)
    resent = 0
    for job in jobs:
        for chunk in iter_stale_queued(db, job, before):
            missing = [i for i in chunk if (job.id, i) not in carried]
            if missing:
                resent += send_requests(db, link, job.id, job.model, missing, settings.ids_per_message)
    return resent


def enqueue_missing(db: Engine, app: Celery, job_id: int, settings: Settings | None = None) -> int:
    """For `submit --resume` and `retry`: send every queued request of the job that no message in
    Redis carries, whenever it was last enqueued; lapsed leases are taken back first. A job whose
    submit was interrupted is then marked enqueued. Returns how many requests were sent.
    """
    settings = settings or get_settings()
    sessions = session_factory(db)
    with sessions() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise JobNotFound(job_id)
        target = OpenJob(job.id, job.model, job.status, job.enqueued_at)
    with sessions() as session:
        expire_leases(session, job_id, settings.max_attempts)
    now = utcnow()
    with broker(app) as link:
        resent = _resend_missing(db, link, [target], now, settings)
    if target.enqueued_at is None:
        with db.begin() as connection:
            mark_enqueued(connection, job_id)
    return resent


def take_lock(app: Celery, token: str, ttl_s: float, key: str = LOCK_KEY) -> bool:
    """The reconcile turn for the next ttl_s seconds, if nobody holds it (SET NX PX): the workers' fleet lock,
    or `producer reconcile --loop`'s own (PRODUCER_LOCK_KEY: the submitter may not set the fleet's)."""
    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1)
        client = connection.default_channel.client
        return bool(client.set(key, token, nx=True, px=max(1, int(ttl_s * 1000))))
