"""The Celery task: thin. Claim the message's requests and hand them to the process's Worker (workers.worker).

Also the worker's life-cycle hooks, each on its process's workers.runner.WorkerProcess: each pool child loads
the model after fork; the main process runs the fleet's reconciler thread (workers.reconcile) while it consumes.
"""
from __future__ import annotations

from typing import Any

from celery.signals import worker_process_init, worker_process_shutdown, worker_ready, worker_shutdown

from contract.messages import GENERATE_TASK, decode
from contract.policy import TransientError, message_retry_countdown
from workers.app import app


@app.task(name=GENERATE_TASK, bind=True, max_retries=None)
def generate(self, *envelope: Any) -> int:  # type: ignore[no-untyped-def]
    """The arguments are one contract.messages envelope: [job_id, request_ids]."""
    from workers import runner

    message = decode(envelope)
    try:
        return runner.this_process().run_batch(message.job_id, message.request_ids)
    except TransientError as exc:
        # contract.policy, 1a: the store stayed unreachable; the message comes again later, never failed.
        # (Should this send fail too, the requests' leases lapse and the reconciler sends them again.)
        _count_retry(len(message.request_ids))
        raise self.retry(exc=exc, countdown=message_retry_countdown(self.request.retries)) from exc


@worker_process_init.connect
def _load_model_in_child(**_: Any) -> None:
    """Each pool child loads the model once, after fork, before it takes a task."""
    from workers import runner

    runner.this_process().start_worker()


@worker_process_shutdown.connect
def _finish_what_the_child_holds(**_: Any) -> None:
    """A pool child about to exit (warm shutdown) finishes and records the requests it holds: their messages
    were acknowledged when they were claimed (workers.worker)."""
    from workers import runner

    runner.this_process().shutdown_worker()


@worker_ready.connect
def _start_reconciler(**_: Any) -> None:
    from workers import runner

    runner.this_process().start_reconciler(app)


@worker_shutdown.connect
def _stop_reconciler(**_: Any) -> None:
    from workers import runner

    runner.this_process().stop_reconciler()


def _count_retry(requests: int) -> None:
    """A message is retried by Celery: its requests count as retries (reason store_unreachable)."""
    from workers import metrics, runner

    metrics.RETRIES.labels(runner.this_process().model, "store_unreachable").inc(requests)
