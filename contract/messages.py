"""The one message the producer (and the reconciler) send and the workers take: a job id and a group of its
request ids, never prompts. Its task name and queue naming, ONE encode and ONE decode.

On the wire it is a Celery task message (protocol 2, JSON only): the task `bulkgen.generate`, positional
arguments `[job_id, [request_id, ...]]`, no keyword arguments, on the queue `gen.<model>`. `encode` makes the
arguments, `decode` reads them back (in the task, and from a raw message the reconciler finds in Redis:
`decode_kombu`). Torch-free, Celery-free: importing this module costs nothing.
"""
from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from typing import Any

from contract.errors import BulkgenError

GENERATE_TASK = "bulkgen.generate"
"""The name of the one task; only the name travels, so both sides must run the same code."""


def queue_name(model: str) -> str:
    """Celery queue for a model: one queue per model so a worker only gets work for the model it holds."""
    return "gen." + re.sub(r"[^A-Za-z0-9_.-]+", "_", model.strip("/"))


class BadMessage(BulkgenError, ValueError):
    """A message that is not a well-formed bulkgen.generate envelope."""


@dataclass(frozen=True)
class Envelope:
    job_id: int
    request_ids: list[int]
    """In the order sent, duplicates dropped."""


def encode(job_id: int, request_ids: list[int]) -> list[Any]:
    """The task's positional arguments for one group of a job's request ids."""
    return [int(job_id), [int(i) for i in request_ids]]


def decode(args: Any) -> Envelope:
    """The envelope in a message's positional arguments; raises BadMessage on anything else."""
    try:
        job_id, request_ids = args
        if isinstance(job_id, bool) or not isinstance(job_id, int) or not isinstance(request_ids, list):
            raise TypeError
        if any(isinstance(i, bool) or not isinstance(i, int) for i in request_ids):
            raise TypeError
    except (TypeError, ValueError):
        raise BadMessage(f"not a {GENERATE_TASK} message: arguments {str(args)[:200]}") from None
    return Envelope(job_id, list(dict.fromkeys(request_ids)))


def decode_kombu(payload: Any) -> Envelope | None:
    """The envelope of a message as kombu keeps it in Redis (a dict: headers, properties, body; the body
    base64-encoded JSON `[args, kwargs, embed]`), or None when it is not a message of our task."""
    try:
        if payload.get("headers", {}).get("task") != GENERATE_TASK:
            return None
        body = payload["body"]
        if payload.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        return decode(json.loads(body)[0])
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        return None


def argsrepr(job_id: int, request_ids: list[int]) -> str:
    """What Celery logs and shows for the arguments (its own saferepr of every id is a fifth of a send)."""
    if not request_ids:
        return f"[{job_id}, []]"
    return f"[{job_id}, <{len(request_ids)} ids {request_ids[0]}..{request_ids[-1]}>]"
