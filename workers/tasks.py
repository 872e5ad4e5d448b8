"""The Celery task: thin. Load by id, skip finished rows, generate, store (see workers.runner).

Also the worker's life-cycle hooks: each pool child loads the model after fork; the main process runs
the fleet's reconciler thread (workers.reconcile) while it consumes.
"""
from __future__ import annotations

from typing import Any

from celery.signals import worker_process_init, worker_ready, worker_shutdown

from workers.app import GENERATE_TASK, app


@app.task(name=GENERATE_TASK, bind=True, max_retries=None)
def generate(self, job_id: int, request_ids: list[int]) -> int:  # type: ignore[no-untyped-def]
    from workers import runner

    try:
        return runner.run_batch(job_id, request_ids)
    except runner.TransientError as exc:
        # The store stayed unreachable for db_retry_s: try the message again later, never fail it.
        # (Should this send fail too, the requests' leases lapse and the reconciler sends them again.)
        raise self.retry(exc=exc, countdown=min(300, 10 * 2 ** min(self.request.retries, 5))) from exc


@worker_process_init.connect
def _load_model_in_child(**_: Any) -> None:
    """Each pool child loads the model once, after fork, before it takes a task."""
    from workers import runner

    runner.init_process()


@worker_ready.connect
def _start_reconciler(**_: Any) -> None:
    from workers import reconcile

    reconcile.start_fleet_reconciler(app)


@worker_shutdown.connect
def _stop_reconciler(**_: Any) -> None:
    from workers import reconcile

    reconcile.stop_fleet_reconciler()
