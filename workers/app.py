"""The Celery app and its settings. Torch-free: the producer imports it to send tasks.

Delivery is at-least-once by construction (docs/reliability.md): messages are acknowledged late,
requeued when a worker process dies, prefetched one at a time, JSON only; every task time limit stays
below the broker's visibility timeout, and a worker whose settings break one of these refuses to start.
"""
from __future__ import annotations

import logging
import ssl
from typing import Any
from urllib.parse import unquote, urlsplit

from celery import Celery
from celery.signals import after_setup_logger, after_setup_task_logger, celeryd_init

from workers.settings import Settings, get_settings

GENERATE_TASK = "bulkgen.generate"


def make_app(broker_url: str | None = None, settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    url = broker_url or settings.broker_url
    app = Celery("bulkgen", broker=url, include=["workers.tasks"])
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


def delivery_problems(conf: Any, settings: Settings) -> list[str]:
    """What in these settings would lose or duplicate work; empty when a worker may start."""
    problems = []
    if not conf.task_acks_late:
        problems.append(
            "task_acks_late is off: a message would be acknowledged before its requests are claimed, so a worker "
            "dying in between would leave them to the reconciler instead of the broker's redelivery"
        )
    if not conf.task_reject_on_worker_lost:
        problems.append("task_reject_on_worker_lost is off: a batch whose worker process dies would be dropped")
    if conf.worker_prefetch_multiplier != 1:
        problems.append(
            f"worker_prefetch_multiplier is {conf.worker_prefetch_multiplier}, not 1: a worker would reserve "
            "messages before it has room for them, beyond the reach of idle workers"
        )
    if list(conf.accept_content) != ["json"]:
        problems.append(f"accept_content is {list(conf.accept_content)}: only JSON may be accepted (a pickle runs code)")
    soft, hard = conf.task_soft_time_limit, conf.task_time_limit
    visibility = (conf.broker_transport_options or {}).get("visibility_timeout")
    if not soft or not hard or soft >= hard:
        problems.append(f"the soft time limit ({soft} s) must be set and below the hard one ({hard} s)")
    if visibility is None or (hard and hard >= visibility):
        problems.append(
            f"the hard time limit ({hard} s) must be below the broker's visibility timeout ({visibility} s): "
            "Redis hands a message unacknowledged for that long to a second worker while the first still "
            "generates it (celery/kombu#337)"
        )
    if settings.lease_s < 2:
        problems.append(f"lease_s is {settings.lease_s}: a lease must last at least 2 s to be renewed in time")
    if settings.max_attempts < 1:
        problems.append(f"max_attempts is {settings.max_attempts}: a request needs at least one attempt")
    if settings.reconcile_interval_s < 0 or settings.reconcile_grace_s < 0:
        problems.append("reconcile_interval_s and reconcile_grace_s cannot be negative")
    return problems


@celeryd_init.connect
def _refuse_unsafe_settings(conf: Any = None, **_: Any) -> None:
    """The worker's main process checks its delivery settings before it consumes anything."""
    settings = get_settings()
    problems = delivery_problems(conf if conf is not None else app.conf, settings)
    if problems:
        raise SystemExit("bulkgen worker refuses to start:\n  - " + "\n  - ".join(problems))


# --- credentials never reach a log line ----------------------------------------------------------

def url_secrets(*urls: str) -> list[str]:
    """The passwords in these URLs, raw and URL-quoted."""
    found: list[str] = []
    for url in urls:
        try:
            password = urlsplit(url).password
        except ValueError:
            password = None
        if password:
            found += [password, unquote(password)]
    return sorted({s for s in found if len(s) >= 3}, key=len, reverse=True)


class SecretFilter(logging.Filter):
    """Replaces the configured passwords with *** in every record that passes the handler."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__("bulkgen-secrets")
        self.secrets = secrets

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            record.msg, record.args = self.scrub(record.getMessage()), ()
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = self.scrub(record.exc_text)
        return True


def guard_handlers(logger: logging.Logger) -> None:
    settings = get_settings()
    secret_filter = SecretFilter(url_secrets(settings.database_url, settings.broker_url))
    for handler in logger.handlers:
        if not any(isinstance(f, SecretFilter) for f in handler.filters):
            handler.addFilter(secret_filter)


@after_setup_logger.connect
@after_setup_task_logger.connect
def _guard_log_handlers(logger: logging.Logger | None = None, **_: Any) -> None:
    for target in {logger, logging.getLogger()} - {None}:
        guard_handlers(target)  # type: ignore[arg-type]


app = make_app()
