"""Services for the scale benchmarks: a Redis of their own, a PostgreSQL database of their own, process CPU accounting.

Nothing here stops or reconfigures a shared server: the benchmarks start their own redis-server on a
free port and create (and drop) their own database on the local PostgreSQL.
"""
from __future__ import annotations

import os
import signal
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import redis
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN_URL = os.environ.get("BULKGEN_BENCH_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OwnRedis:
    """A redis-server of our own on a free port (no persistence), stopped on close."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.dir = tempfile.mkdtemp(prefix="bulkgen-bench-redis-")
        self.port = free_port()
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        client = redis.Redis.from_url(self.url)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        else:
            raise RuntimeError("redis-server did not start")
        client.close()

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def create_database(prefix: str = "bulkgen_bench_", admin_url: str = PG_ADMIN_URL) -> str:
    """A fresh, empty database on the server of admin_url (an AUTOCOMMIT superuser connection); its URL."""
    name = prefix + uuid.uuid4().hex[:12]
    _admin_execute(admin_url, f'CREATE DATABASE "{name}"')
    return admin_url.rsplit("/", 1)[0] + "/" + name


def drop_database(url: str, admin_url: str = PG_ADMIN_URL) -> None:
    _admin_execute(admin_url, f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


def _admin_execute(admin_url: str, statement: str) -> None:
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(statement))
    admin.dispose()


def env_for(database_url: str, broker_url: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"BULKGEN_DATABASE_URL": database_url, "BULKGEN_BROKER_URL": broker_url, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


_MEASURE = (
    "import os, subprocess, sys\n"
    "child = subprocess.Popen(sys.argv[2:])\n"
    "_, status, usage = os.wait4(child.pid, 0)\n"
    "open(sys.argv[1], 'w').write(str(usage.ru_maxrss))\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def run_measured(
    argv: list[str], env: dict[str, str], cwd: Path = ROOT, timeout: float | None = None
) -> tuple[float, int, subprocess.CompletedProcess[str]]:
    """Run argv; return (wall seconds, its own peak RSS in KiB, the finished process).

    A forked child's ru_maxrss starts at its parent's RSS (the pages it shares until exec): a test
    process that loaded a model would make any child look 1 GiB big. So argv is started by a bare
    interpreter of its own (`python -I -S`, ~10 MiB), which reports its child's peak.
    """
    import sys

    with tempfile.NamedTemporaryFile("r", prefix="bulkgen-rss-", suffix=".txt") as report:
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _MEASURE, report.name, *argv],
            env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.communicate()
            raise
        seconds = time.perf_counter() - started
        rss_kib = int(report.read() or 0)
    return seconds, rss_kib, subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


def cli(module: str) -> list[str]:
    """The argv prefix that runs `producer` / `workers` from this checkout with this interpreter."""
    import sys

    return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]


# --- CPU accounting from /proc ----------------------------------------------------------------

def _stat(pid: int) -> tuple[str, int, float] | None:
    """(command name, process group, CPU seconds) of a live process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name = raw[raw.index("(") + 1 : raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2 :].split()
    return name, int(fields[2]), (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_by_group(worker_groups: Iterable[int], redis_pid: int | None) -> dict[str, float]:
    """CPU seconds used so far by the workers (their process groups), our redis-server, and all postgres processes.

    (A process that exits between two readings takes its CPU time with it: only long-lived ones are counted.)
    """
    workers = set(worker_groups)
    totals = {"workers": 0.0, "redis": 0.0, "postgres": 0.0}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _stat(int(entry))
        if stat is None:
            continue
        name, group, seconds = stat
        if group in workers:
            totals["workers"] += seconds
        elif int(entry) == redis_pid:
            totals["redis"] += seconds
        elif name == "postgres":
            totals["postgres"] += seconds
    return totals


def machine_cpu() -> tuple[float, float]:
    """(busy CPU seconds, total CPU seconds) of the whole machine, all cores, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    total = sum(fields[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


def stop_group(process: subprocess.Popen, grace_s: float) -> None:  # type: ignore[type-arg]
    """Stop a process started in a session of its own, and everything it started: SIGTERM to the group, then
    SIGKILL to whatever has not exited after grace_s."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
