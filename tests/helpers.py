"""Real services for the tests: fresh databases, a redis-server of their own, real worker processes."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from sqlalchemy import create_engine, text

# One home for the database and environment plumbing, shared with the benchmarks (tests may import bench, not the reverse);
# env_for and free_port are imported from here by the tests.
from bench.scale.services import create_database, drop_database, env_for, free_port  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from torch import Tensor

    from workers.decoder import DecoderRunner
    from workers.kv_cache import KVCache

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("BULKGEN_TEST_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
TINY = "tiny-random-llama"


def create_pg_database() -> str:
    return create_database("bulkgen_test_", PG_ADMIN_URL)


def drop_pg_database(url: str) -> None:
    drop_database(url, PG_ADMIN_URL)


def run_cli(module: str, args: list[str], env: dict[str, str], timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run `producer ...` (module producer.cli) as a real process."""
    done = subprocess.run(
        [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())", *args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"{module} {args} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def producer(args: list[str], env: dict[str, str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return run_cli("producer.cli", args, env, **kw)


class WorkerProcess:
    """`workers start` as a real process group (the Celery main process and its pool children)."""

    def __init__(self, env: dict[str, str], model: str = TINY, concurrency: int = 1, log_path: Path | None = None, extra: Iterable[str] = ()):
        self.log_path = log_path or Path(f"/tmp/bulkgen-worker-{uuid.uuid4().hex[:8]}.log")
        self.log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-c", "import sys; from workers.cli import main; sys.exit(main())",
             "start", "--model", model, "--concurrency", str(concurrency), *extra],
            env=env, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def output(self) -> str:
        return self.log_path.read_text()

    def stop(self, timeout: float = 30) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(10)
        self.log.close()


def wait_for_job(database_url: str, job_id: int, timeout: float = 300) -> str:
    engine = create_engine(database_url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            with engine.connect() as connection:
                status = connection.execute(text("SELECT status FROM jobs WHERE id = :id"), {"id": job_id}).scalar_one()
            if status in ("completed", "failed", "cancelled"):
                return status
            time.sleep(0.5)
    finally:
        engine.dispose()
    raise AssertionError(f"job {job_id} did not finish within {timeout}s (status {status})")


def submit_and_complete(source: Path, env: dict[str, str], database_url: str, model: str = TINY) -> int:
    """`producer submit` source, run a real worker until the job completes, stop it; the job's id."""
    submitted = producer(["submit", str(source), "--model", model], env, check=True)
    job_id = int(submitted.stdout.strip().splitlines()[-1])
    worker = WorkerProcess(env)
    try:
        assert wait_for_job(database_url, job_id, timeout=300) == "completed"
    finally:
        worker.stop()
    return job_id


def table_columns(database_url: str, table: str) -> set[str]:
    """The names of a table's columns in the store, as the database reports them."""
    from sqlalchemy import inspect

    engine = create_engine(database_url)
    try:
        return {column["name"] for column in inspect(engine).get_columns(table)}
    finally:
        engine.dispose()


def write_jsonl(path: Path, rows: Iterable[dict[str, Any] | str]) -> Path:
    with path.open("w") as out:
        for row in rows:
            out.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def accepted_and_peak(path: Path, context_length: int) -> tuple[int, int]:
    """How many lines of path the producer's reader accepts (no defaults), and the peak of the memory
    Python allocated while it read them (tracemalloc): what the tests of streamed reading measure."""
    from producer.reader import read_requests

    tracemalloc.start()
    try:
        count = sum(o.ok for o in read_requests(path, {}, context_length))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return count, peak


def wait_until(condition: Callable[[], Any], timeout: float, what: str | Callable[[], str], every: float = 0.2) -> Any:
    """Poll condition until it returns something truthy; fail the test (never hang) after timeout.
    what: says what was awaited; a callable is asked at the timeout (a state seen then, not at the start)."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # e.g. the database is down on purpose right now
            last_error = exc
        time.sleep(every)
    said = what() if callable(what) else what
    raise AssertionError(f"timed out after {timeout}s waiting for {said}" + (f" (last error: {last_error})" if last_error else ""))


class RedisServer:
    """A redis-server of the test's own on a free port; `kill()` crashes it, `start()` brings it back.
    With a username, the password is that ACL user's (its users come from an --aclfile in extra), not requirepass."""

    def __init__(self, directory: Path, *, aof: bool, password: str | None = None, extra: Iterable[str] = (),
                 username: str | None = None) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.aof = aof
        self.password = password
        self.username = username
        self.extra = list(extra)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f"{self.username or ''}:{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [
            shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.dir), "--save", "", "--appendonly", "yes" if self.aof else "no",
            "--appendfsync", "everysec", *self.extra,
        ]
        if self.password and not self.username:
            command += ["--requirepass", self.password]
        log = (self.dir / "redis.log").open("ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        client = self.client()
        wait_until(lambda: client.ping(), 20, f"redis on port {self.port}")
        client.close()

    def kill(self) -> None:
        """SIGKILL: what a crash or an OOM kill does (no final save)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, username=self.username, password=self.password)


def prefill(runner: DecoderRunner, cache: KVCache, prompts: list[list[int]]) -> Tensor:
    """Admit the prompts into the cache's next free slots and return each one's next-token logits (rows, vocab):
    DecoderRunner.extend from position 0, as the scheduler admits rows without a cached prefix."""
    first = cache.admit([0] * len(prompts))
    return runner.extend(cache, first, prompts)
