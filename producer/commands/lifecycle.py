"""A job's life after its submit: `producer cancel`, `producer retry`, `producer reconcile` (thin: the work is
producer.api's; `submit --resume` is producer.commands.submit's)."""
from __future__ import annotations

import time
import uuid

import click

from contract.settings import scrub
from producer.context import broker_option, database_option, say, settings_with


@click.command()
@click.argument("job_id", type=int)
@database_option
def cancel(job_id: int, database_url: str | None) -> None:
    """Cancel JOB: its queued requests are dropped (workers skip their messages) and it ends 'cancelled'.

    Requests being generated right now finish; results already written stay.
    `producer retry JOB` queues the cancelled requests again.
    """
    from producer import api

    info = api.cancel(job_id, settings=settings_with(database_url))
    if not info["changed"]:
        click.echo(f"job {job_id} is already {info['status']}; nothing to cancel")
        return
    click.echo(
        f"job {job_id} cancelled: {info['cancelled']} queued requests dropped, "
        f"{info['running']} being generated will finish"
    )


@click.command()
@click.argument("job_id", type=int)
@database_option
@broker_option
def retry(job_id: int, database_url: str | None, broker_url: str | None) -> None:
    """Enqueue again the failed and the missing requests of JOB, and only those.

    Failed requests start over with a fresh attempt count; cancelled ones, queued ones that no
    message in Redis carries, and running ones whose worker is gone (lapsed lease) are sent again.
    Requests done, or queued and still on the queue, are left alone. A finished job is open again.
    """
    from producer import api

    info: dict[str, int] = {}
    sent = api.retry(job_id, settings=settings_with(database_url, broker_url), report=info)
    click.echo(
        f"job {job_id}: {info['failed']} failed and {info['cancelled']} cancelled requests reopened; "
        f"{sent} requests enqueued"
    )


@click.command()
@click.option("--loop", "loop_s", type=float, default=None, metavar="SECONDS",
              help="Sweep every SECONDS until interrupted (one --loop sweeps per interval; for fleets whose workers do not sweep).")
@click.option("--job", "job_ids", type=int, multiple=True, help="Only this job (repeatable).")
@database_option
@broker_option
def reconcile(loop_s: float | None, job_ids: tuple[int, ...], database_url: str | None, broker_url: str | None) -> None:
    """Re-enqueue the requests the store says are owed and Redis no longer carries.

    Running requests whose lease has passed go back to the queue (or end failed after the
    max_attempts setting); queued requests enqueued more than reconcile_grace_s ago that no message
    carries are sent again. Workers run this sweep themselves every reconcile_interval_s; run it by
    hand after losing Redis, or with --loop where workers run with BULKGEN_RECONCILE_INTERVAL_S=0.
    With --loop it serves the reconciler's Prometheus metrics (queue depth per model, lapsed leases,
    re-sends) on BULKGEN_RECONCILER_METRICS_PORT (9500; 0 = off).
    """
    from contract.broker import connect
    from contract.redis_acl import PRODUCER_LOCK_KEY
    from reconciler.sweep import sweep, take_lock
    from migrations.schema import open_store

    settings = settings_with(database_url, broker_url)
    db = open_store(settings.database_url)
    app = connect(settings)
    only = job_ids or None
    if loop_s is None:
        click.echo(str(sweep(db, app, settings, only)))
        return
    if loop_s <= 0:
        raise click.BadParameter("must be > 0", param_hint="--loop")
    from reconciler.metrics import RECONCILER_SWEEPS, QueueDepth, observe_sweep, serve_metrics

    port = serve_metrics(settings)  # BULKGEN_RECONCILER_METRICS_PORT: queue depth, lapsed leases, re-sends
    if port is not None:
        say(f"reconciler metrics on :{port}/metrics", port=port)
    queues = QueueDepth()
    token = f"producer-{uuid.uuid4().hex[:8]}"
    try:
        while True:
            try:
                if take_lock(app, token, loop_s * 0.9, PRODUCER_LOCK_KEY):
                    report = sweep(db, app, settings, only)
                    observe_sweep(report)
                    click.echo(f"{time.strftime('%H:%M:%S')} {report}")
            except Exception as exc:  # Redis or the store is down: try again next time
                RECONCILER_SWEEPS.labels("skipped").inc()
                say(f"{time.strftime('%H:%M:%S')} sweep skipped: {type(exc).__name__}: {scrub(str(exc), settings)}", level="warning")
            try:
                queues.measure(db, app)
            except Exception as exc:  # the gauge keeps its last value
                say(f"{time.strftime('%H:%M:%S')} queue depth not measured: {type(exc).__name__}: {scrub(str(exc), settings)}", level="warning")
            time.sleep(loop_s)
    except KeyboardInterrupt:
        pass
