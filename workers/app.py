"""The Celery app and its settings. Torch-free: the producer imports it to send tasks."""
from __future__ import annotations

from celery import Celery

from workers.settings import get_settings

GENERATE_TASK = "bulkgen.generate"

# Generation of one message's batch may take minutes; the broker redelivers a message that is
# unacked for longer than the visibility timeout, so every time limit stays well below it.
VISIBILITY_TIMEOUT_S = 3 * 3600
TASK_SOFT_TIME_LIMIT_S = 2 * 3600
TASK_TIME_LIMIT_S = 2 * 3600 + 600


def make_app(broker_url: str | None = None) -> Celery:
    app = Celery("bulkgen", broker=broker_url or get_settings().broker_url, include=["workers.tasks"])
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],  # a pickled message is refused
        result_serializer="json",
        task_ignore_result=True,  # results live in the SQL store, not in a result backend
        task_acks_late=True,  # ack after the results are committed: a dead worker's batch is redelivered
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # long tasks: don't hoard messages another worker could run
        task_soft_time_limit=TASK_SOFT_TIME_LIMIT_S,
        task_time_limit=TASK_TIME_LIMIT_S,
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
        broker_connection_retry_on_startup=True,
        worker_proc_alive_timeout=600,  # the child loads the model before it reports alive (celery#1715)
        worker_send_task_events=True,  # Flower works out of the box
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
    )
    return app


app = make_app()
