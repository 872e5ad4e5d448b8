"""Following a job until it ends (`submit --wait`, `Job.wait()`): one cheap row read per poll, and, when asked,
a live progress bar fed by the job's counters."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from contract.errors import JobNotFound
from models.tables import Job, JobStatus


def follow(db: Engine, job_id: int, poll_s: float = 0.5, timeout: float | None = None, show: bool = True) -> str:
    """Poll the job until it ends and return its final status; with `show`, draw done/total, tokens/s and ETA
    on stderr (so that stdout keeps only what scripts read). Raises TimeoutError after `timeout` seconds and
    JobNotFound for a job that is not in the store. The bar's refresh thread ends with the call."""
    started = time.monotonic()
    with _bar(job_id, show) as update:
        while True:
            with Session(db) as session:
                job = session.get(Job, job_id)
                if job is None:
                    raise JobNotFound(job_id)
                rate = job.completion_tokens / max(1e-9, time.monotonic() - started)
                update(job.total_requests, job.done_count + job.failed_count, rate)
                if job.status in JobStatus.FINAL:
                    return job.status
                status = job.status
            if timeout is not None and time.monotonic() - started + poll_s > timeout:
                raise TimeoutError(f"job {job_id} is still {status} after {timeout:g} s")
            time.sleep(poll_s)


def watch(db: Engine, job_id: int, poll_s: float = 0.5) -> str:
    """`submit --wait`: the bar until the job ends; its final status."""
    return follow(db, job_id, poll_s, show=True)


@contextlib.contextmanager
def _bar(job_id: int, show: bool) -> Iterator:  # type: ignore[type-arg]
    if not show:
        yield lambda total, settled, rate: None
        return
    columns = (
        TextColumn("job {task.fields[job]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:.1f} tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task("generating", total=None, job=job_id, rate=0.0)
        yield lambda total, settled, rate: progress.update(task, total=total, completed=settled, rate=rate)
