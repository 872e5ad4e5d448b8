"""One log format for workers and the producer: text for people, or JSON lines when asked (BULKGEN_LOG_FORMAT=json)
for a log pipeline. A line that concerns a job carries `job_id`, and `request_ids` when it concerns requests:
pass them with `about(job_id, ids)` as a log call's `extra` (workers) or to producer.context.say (the producer).

    {"ts": "2026-12-03T09:58:12.031Z", "level": "warning", "logger": "bulkgen.worker", "pid": 4211,
     "message": "job 7: gave up on requests [12] after 3 attempts", "job_id": 7, "request_ids": [12]}
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

FIELDS = ("job_id", "request_ids")
"""What `about` puts on a record, and what the JSON formatter copies from it."""


def about(job_id: int | None, request_ids: Iterable[int] | None = None) -> dict[str, Any]:
    """The `extra` of a log call about a job (and some of its requests)."""
    fields: dict[str, Any] = {"job_id": job_id}
    if request_ids is not None:
        fields["request_ids"] = [int(i) for i in request_ids]
    return fields


def json_line(level: str, logger: str, message: str, created: float | None = None, **fields: Any) -> str:
    """One log line as JSON: ts (UTC, milliseconds), level, logger, pid, message, then the given fields."""
    moment = datetime.fromtimestamp(created, timezone.utc) if created is not None else datetime.now(timezone.utc)
    line = {"ts": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"), "level": level.lower(),
            "logger": logger, "pid": os.getpid(), "message": message}
    line.update({k: v for k, v in fields.items() if v is not None})
    return json.dumps(line, ensure_ascii=False, default=str)


class JsonFormatter(logging.Formatter):
    """A record as one JSON line (json_line), with job_id / request_ids when the call gave them, the Celery
    task's name and id when a task logged it, and the traceback (as text, already scrubbed of secrets)."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {name: getattr(record, name, None) for name in FIELDS}
        for name in ("task_name", "task_id"):  # set by Celery's task logger
            value = getattr(record, name, None)
            if value not in (None, "???"):
                fields[name] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            fields["exception"] = record.exc_text
        return json_line(record.levelname, record.name, record.getMessage(), record.created, **fields)


def use_json(handlers: Iterable[logging.Handler]) -> None:
    for handler in handlers:
        if not isinstance(handler.formatter, JsonFormatter):
            handler.setFormatter(JsonFormatter())
