"""The broker side of the contract: the Celery app factory, connecting (one place, the password hidden),
and the one sender of task messages.

No app is built when this module is imported, and importing it connects no signal handler: the worker's
app and its worker-only hooks live in workers.app (`celery -A workers.app worker|flower`). Celery itself is
imported only when an app is made, so a producer command that never talks to Redis never loads it.

Delivery is at-least-once by construction (docs/reliability.md): messages are acknowledged late, requeued
when a worker process dies, prefetched one at a time, JSON only; every task time limit stays below the
broker's visibility timeout (workers.app.delivery_problems refuses to start a worker that breaks one).
"""
from __future__ import annotations

import ssl
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from contract.errors import BrokerUnreachable
from contract.messages import GENERATE_TASK, argsrepr, encode
from contract.settings import Settings, get_settings, redact, scrub

if TYPE_CHECKING:
    from celery import Celery

SEND_BATCH = 1_000
"""Messages buffered in one Redis pipeline before it is sent."""


def make_app(broker_url: str | None = None, settings: Settings | None = None, include: Iterable[str] = ()) -> Celery:
    """A Celery app with the delivery settings both sides rely on; `include` names the task modules (the
    worker's: workers.tasks). Building one connects nothing."""
    from celery import Celery

    settings = settings or get_settings()
    url = password_in_user_part(broker_url or settings.broker_url)
    app = Celery("bulkgen", broker=url, include=list(include), set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],  # a pickled message is refused, never unpickled
        result_serializer="json",
        task_ignore_result=True,  # results live in the SQL store, not in a result backend
        task_acks_late=True,  # ack once the requests are claimed under a lease (workers.worker): a worker dying before is redelivered
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # the next message only when there is room for it: never hoard
        task_soft_time_limit=settings.task_soft_time_limit_s,
        task_time_limit=settings.task_time_limit_s,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        broker_connection_retry=True,
        broker_connection_max_retries=None,  # a worker waits out a Redis restart however long it takes
        worker_cancel_long_running_tasks_on_connection_loss=False,  # a batch being generated finishes
        worker_proc_alive_timeout=600,  # the child loads the model before it reports alive (celery#1715)
        worker_send_task_events=True,  # Flower works out of the box
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
    )
    if url.startswith("rediss://") and "ssl_" not in urlsplit(url).query:
        # kombu alone would accept any certificate on a bare rediss:// URL; verify it instead
        # (the URL may say otherwise: ?ssl_cert_reqs=none, ?ssl_ca_certs=/path/ca.pem, ...).
        app.conf.broker_use_ssl = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    return app


def password_in_user_part(url: str) -> str:
    """The broker URL with a `?password=` parameter moved to the user part (`redis://:PASSWORD@host`), where
    kombu reads it (it refuses a URL holding both with "dict() got multiple values for keyword argument
    'password'"). Raises BrokerUnreachable when the URL gives a password in both places."""
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    given = [value for key, value in pairs if key.lower() == "password"]
    if not given:
        return url
    if len(given) > 1 or parts.password is not None:
        raise BrokerUnreachable(f"the broker URL {redact(url)} gives its password twice: keep only one")
    user, _, host = parts.netloc.rpartition("@")
    netloc = f"{user}:{quote(given[0], safe='')}@{host}"
    query = urlencode([(key, value) for key, value in pairs if key.lower() != "password"])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def connect(settings: Settings | None = None, broker_url: str | None = None) -> Celery:
    """An app whose broker answered; raises BrokerUnreachable (the URL redacted, no password in the reason)."""
    settings = settings or get_settings()
    url = broker_url or settings.broker_url
    app = make_app(url, settings)
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=2, interval_start=0.2, interval_step=0.5)
    except Exception as exc:
        raise BrokerUnreachable(f"cannot reach the broker {redact(url)}: {scrub(str(exc), settings)}") from None
    return app


class Sender:
    """The one sender of task messages: `send(queue, job_id, ids)` sends one envelope (contract.messages).

    Used as a context manager it takes a producer from the app's pool and pipelines its Redis commands
    `batch` messages at a time (one round trip per ~1,000 messages); `flush()` sends what is buffered, and
    leaving the block with an exception discards what was not yet flushed. Given a `producer` (the
    reconciler's), it sends through that one, at once.
    """

    def __init__(self, app: Celery, *, producer: Any = None, batch: int = SEND_BATCH) -> None:
        self.app = app
        self.batch = batch
        self.sent = 0
        self.producer = producer
        self._declared: set[str] = set()
        self._producer_context: Any = None
        self._batch: Any = None

    def __enter__(self) -> Self:
        if self.producer is None:
            self._producer_context = self.app.producer_or_acquire()
            self.producer = self._producer_context.__enter__()
        if self.batch > 1:
            self._batch = self.producer.batch(max_size=self.batch)
            self._batch.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._batch is not None:
                self._batch.__exit__(*exc)
                self._batch = None
        finally:
            if self._producer_context is not None:
                self._producer_context.__exit__(*exc)
                self._producer_context = None
                self.producer = None

    def __call__(self, queue: str, job_id: int, ids: list[int]) -> None:
        options: dict[str, Any] = {}
        if queue in self._declared:
            options["declare"] = []  # declared with this producer's first message to the queue
        self.app.send_task(
            GENERATE_TASK,
            args=encode(job_id, ids),
            queue=queue,
            producer=self.producer,
            argsrepr=argsrepr(job_id, ids),
            kwargsrepr="{}",
            **options,
        )
        self._declared.add(queue)
        self.sent += 1

    send = __call__

    def flush(self) -> None:
        """Send what is buffered now: close the current batch (which flushes it) and open the next."""
        if self._batch is not None:
            self._batch.__exit__(None, None, None)
            self._batch = self.producer.batch(max_size=self.batch)
            self._batch.__enter__()
