"""Real services for the tests: fresh databases, a Redis db of their own, real worker processes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("BULKGEN_TEST_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_HOST_URL = os.environ.get("BULKGEN_TEST_REDIS", "redis://127.0.0.1:6379")
TINY = "tiny-random-llama"


def create_pg_database() -> str:
    name = "bulkgen_test_" + uuid.uuid4().hex[:12]
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name


def drop_pg_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def env_for(database_url: str, broker_url: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "BULKGEN_DATABASE_URL": database_url,
            "BULKGEN_BROKER_URL": broker_url,
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


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


def write_jsonl(path: Path, rows: Iterable[dict[str, Any] | str]) -> Path:
    with path.open("w") as out:
        for row in rows:
            out.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path
