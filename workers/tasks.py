"""The Celery task: thin. Load by id, skip finished rows, generate, store (see workers.runner)."""
from __future__ import annotations

from workers.app import GENERATE_TASK, app


@app.task(name=GENERATE_TASK, bind=True, max_retries=3)
def generate(self, job_id: int, request_ids: list[int]) -> int:  # type: ignore[no-untyped-def]
    from workers import runner

    try:
        return runner.run_batch(job_id, request_ids)
    except runner.TransientError as exc:
        raise self.retry(exc=exc, countdown=min(60, 5 * 2**self.request.retries)) from exc


from celery.signals import worker_process_init  # noqa: E402


@worker_process_init.connect
def _load_model_in_child(**_: object) -> None:
    """Each pool child loads the model once, after fork, before it takes a task."""
    from workers import runner

    runner.init_process()
