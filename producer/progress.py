"""`submit --wait`: a live progress bar fed by the job's counters (one cheap row read per poll)."""
from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from models.tables import Job, JobStatus


def watch(db: Engine, job_id: int, poll_s: float = 0.5) -> str:
    """Show done/total, tokens/s and ETA until the job ends; return its final status."""
    columns = (
        TextColumn("job {task.fields[job]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:.1f} tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    started = time.monotonic()
    # stderr, so that stdout keeps only the job id for scripts
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task("generating", total=None, job=job_id, rate=0.0)
        while True:
            with Session(db) as session:
                job = session.get(Job, job_id)
                assert job is not None
                settled = job.done_count + job.failed_count
                rate = job.completion_tokens / max(1e-9, time.monotonic() - started)
                progress.update(task, total=job.total_requests, completed=settled, rate=rate)
                if job.status in JobStatus.FINAL:
                    return job.status
            time.sleep(poll_s)
