"""The worker's Celery app (`celery -A workers.app worker`, and Flower) and its worker-only hooks: a worker
whose delivery settings would lose or duplicate work refuses to start, and no log line carries a password.

The app is made by contract.broker.make_app, the factory the producer uses too (docs/reliability.md:
at-least-once by construction); only the worker imports this module. The producer never does.
"""
from __future__ import annotations

import logging
from typing import Any

from celery.signals import after_setup_logger, after_setup_task_logger, celeryd_init

from contract.broker import make_app
from contract.logs import use_json
from contract.messages import GENERATE_TASK  # noqa: F401 (the task's name, for workers.tasks and old imports)
from contract.settings import Settings, configured_secrets, get_settings, url_secrets  # noqa: F401 (url_secrets: old imports)


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
    """Scrub secrets from every handler's records and, with BULKGEN_LOG_FORMAT=json, write them as JSON lines."""
    settings = get_settings()
    secret_filter = SecretFilter(configured_secrets(settings))
    for handler in logger.handlers:
        if not any(isinstance(f, SecretFilter) for f in handler.filters):
            handler.addFilter(secret_filter)
    if settings.log_format == "json":
        use_json(logger.handlers)


@after_setup_logger.connect
@after_setup_task_logger.connect
def _guard_log_handlers(logger: logging.Logger | None = None, **_: Any) -> None:
    for target in {logger, logging.getLogger()} - {None}:
        guard_handlers(target)  # type: ignore[arg-type]


app = make_app(include=["workers.tasks"])
app.set_current()
