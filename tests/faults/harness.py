"""Real processes to break: our own Redis and PostgreSQL servers on free ports, worker fleets, SQL counts.

Never the shared servers: each server here lives in a temporary directory and is stopped and removed
by its fixture, whatever the test did to it.
"""
from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from tests.helpers import WorkerProcess, env_for, free_port, producer, wait_until, write_jsonl

FAULT_SETTINGS = {
    # short enough that a lost holder is noticed in seconds, long enough for a busy 2-core box
    "BULKGEN_LEASE_S": "6",
    "BULKGEN_RECONCILE_INTERVAL_S": "1",
    "BULKGEN_RECONCILE_GRACE_S": "3",
    "BULKGEN_MAX_ATTEMPTS": "3",
    "BULKGEN_IDS_PER_MESSAGE": "8",
    "BULKGEN_DB_RETRY_S": "120",
}


class Store:
    """SQL counts straight from the store."""

    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, sql: str, **params: Any) -> list[Any]:
        engine = create_engine(self.url)
        try:
            with engine.connect() as connection:
                return list(connection.execute(text(sql), params).mappings())
        finally:
            engine.dispose()

    def scalar(self, sql: str, **params: Any) -> Any:
        rows = self.query(sql, **params)
        return next(iter(rows[0].values())) if rows else None

    def job(self, job_id: int) -> dict[str, Any]:
        return dict(self.query("SELECT * FROM jobs WHERE id = :j", j=job_id)[0])

    def results(self, job_id: int) -> int:
        return self.scalar("SELECT count(*) FROM results WHERE job_id = :j", j=job_id)

    def states(self, job_id: int) -> dict[str, int]:
        rows = self.query("SELECT status, count(*) AS c FROM requests WHERE job_id = :j GROUP BY status", j=job_id)
        return {row["status"]: row["c"] for row in rows}

    def running_holders(self, job_id: int) -> list[tuple[int, str]]:
        rows = self.query("SELECT id, worker FROM requests WHERE job_id = :j AND status = 'running' ORDER BY id", j=job_id)
        return [(row["id"], row["worker"]) for row in rows]

    def progress(self, job_id: int) -> str:
        """Request states, attempts and holders of a job: what a timed-out test reports."""
        rows = self.query(
            "SELECT status, attempts, worker IS NOT NULL AS held, count(*) AS c FROM requests WHERE job_id = :j "
            "GROUP BY status, attempts, worker IS NOT NULL ORDER BY status, attempts", j=job_id)
        job = self.job(job_id)
        counts = ", ".join(f"{r['status']}/attempts {r['attempts']}{'/held' if r['held'] else ''}: {r['c']}" for r in rows)
        return f"job {job['status']}, done {job['done_count']}, failed {job['failed_count']}; requests {counts}"

    def wait_status(self, job_id: int, timeout: float, statuses: Iterable[str] = ("completed", "failed", "cancelled")) -> str:
        wanted = tuple(statuses)
        return wait_until(
            lambda: (s := self.scalar("SELECT status FROM jobs WHERE id = :j", j=job_id)) in wanted and s,
            timeout,
            lambda: f"job {job_id} to reach {wanted} (at the timeout: {self.progress(job_id)})",
        )

    def assert_exactly_once(self, job_id: int, requests: int, samples_per_request: int = 1) -> None:
        """Every request done, each with exactly its samples, no (request, sample) twice, counters exact."""
        job = self.job(job_id)
        assert job["status"] == "completed", job
        assert job["done_count"] == requests and job["failed_count"] == 0, job
        assert self.states(job_id) == {"done": requests}
        rows = self.scalar("SELECT count(*) FROM results WHERE job_id = :j", j=job_id)
        distinct = self.scalar(
            "SELECT count(*) FROM (SELECT DISTINCT request_id, sample_index FROM results WHERE job_id = :j) AS d", j=job_id
        )
        assert rows == distinct == requests * samples_per_request
        per_request = self.query(
            "SELECT q.id, count(r.id) AS c FROM requests q LEFT JOIN results r ON r.request_id = q.id "
            "WHERE q.job_id = :j GROUP BY q.id HAVING count(r.id) <> :n",
            j=job_id, n=samples_per_request,
        )
        assert per_request == [], per_request[:5]
        tokens = self.scalar("SELECT coalesce(sum(completion_tokens), 0) FROM results WHERE job_id = :j", j=job_id)
        assert job["completion_tokens"] == tokens  # each request counted once


def submit(env: dict[str, str], path: Path, *args: str) -> int:
    done = producer(["submit", str(path), *args], env, check=True)
    return int(done.stdout.split()[-1])


@contextmanager
def running_job(env: dict[str, str], lines: list[dict[str, Any]], directory: Path, model: str, *args: str) -> Iterator[tuple[int, Store, Fleet]]:
    """lines submitted as a job (`--model model`, then args) to the store of env, and two workers started on it:
    (job id, the store, the fleet); the fleet is stopped on leaving, whatever happened."""
    job_id = submit(env, write_jsonl(directory / "p.jsonl", lines), "--model", model, *args)
    store = Store(env["BULKGEN_DATABASE_URL"])
    fleet = Fleet(env, model, count=2, log_dir=directory)
    try:
        yield job_id, store, fleet
    finally:
        fleet.stop()


class Fleet:
    """Worker processes (`workers start`, each a Celery main process with its pool); stopped at exit."""

    def __init__(self, env: dict[str, str], model: str, count: int = 2, log_dir: Path | None = None) -> None:
        self.env = env
        self.model = model
        self.log_dir = log_dir
        self.workers = [self.add() for _ in range(count)]

    def add(self) -> WorkerProcess:
        log = (self.log_dir / f"worker-{time.monotonic_ns()}.log") if self.log_dir else None
        return WorkerProcess(self.env, model=self.model, log_path=log)

    def alive(self) -> bool:
        return all(worker.process.poll() is None for worker in self.workers)

    def owner_of(self, child_pid: int) -> WorkerProcess:
        parent = ppid(child_pid)
        return next(w for w in self.workers if w.process.pid in (parent, child_pid))

    def logs(self, tail: int | None = 4000) -> str:
        return "\n".join(worker.output()[-tail if tail else 0:] for worker in self.workers)

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()


def ppid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("PPid:"):
                return int(line.split()[1])
    raise LookupError(pid)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def freeze_holding(store: Store, job_id: int, timeout: float) -> tuple[int, list[int]]:
    """Stop (SIGSTOP) a pool process at a moment it holds a batch of the job; return its pid and the
    ids it holds. Frozen, it cannot finish the batch between our look and what the test does next."""
    def frozen_holding() -> tuple[int, list[int]] | None:
        held = store.running_holders(job_id)
        if not held:
            return None
        pid = holder_pid(held[0][1])
        os.kill(pid, signal.SIGSTOP)
        worker = held[0][1]
        ids = [r["id"] for r in store.query(
            "SELECT id FROM requests WHERE job_id = :j AND status = 'running' AND worker = :w", j=job_id, w=worker)]
        if ids:
            return pid, ids
        os.kill(pid, signal.SIGCONT)  # it finished in between: let it go and look again
        return None

    return wait_until(frozen_holding, timeout, f"a worker holding a batch of job {job_id}")


def in_list(ids: Iterable[int]) -> str:
    """Integer ids for an SQL IN (...) list (ints only: nothing to inject)."""
    return ",".join(str(int(i)) for i in ids)


def holder_pid(worker: str) -> int:
    return int(worker.rsplit(":", 1)[1])


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


class PostgresServer:
    """A PostgreSQL cluster of the test's own, in a temporary directory, on a free port."""

    def __init__(self) -> None:
        bin_dir = postgres_bin()
        if bin_dir is None:
            raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql")
        self.bin = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="bulkgen-pg-", dir="/tmp"))
        self.data = self.root / "data"
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            shutil.chown(self.root, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([*self.as_user, str(self.bin / tool), *args], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "pg.log"), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def remove(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass  # not running
        shutil.rmtree(self.root, ignore_errors=True)


def fault_env(database_url: str, broker_url: str, **extra: str) -> dict[str, str]:
    return env_for(database_url, broker_url, **(FAULT_SETTINGS | extra))


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    os.kill(pid, sig)
