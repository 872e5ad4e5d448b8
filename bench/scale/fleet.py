"""The fleet's ceiling: real producer, Redis, PostgreSQL and N real worker processes with the stand-in engine.

    .venv/bin/python -m bench.scale.fleet --workers 1,2,4,8,16 --out bench/scale/results/fleet.json

For each N: a fresh PostgreSQL database (dropped afterwards) and an empty Redis of our own; N workers
(`workers start --model stand-in`, one Celery worker with one pool process each, as one per GPU) are
started and awaited; then `producer submit` enqueues a generated file and the benchmark samples the
job's counters until it completes. The stand-in engine (workers/standin.py) returns fixed text at once,
so only the queue and the store are measured.

Reported per N: completed requests/s and committed result rows/s over the middle of the run (10% to 90%
of the job, so worker start-up and the tail are left out), transactions/s and rows written/s from
pg_stat_database, CPU seconds per request of the workers, Redis and PostgreSQL, how busy the machine was,
and what the database sessions were waiting on (pg_stat_activity, sampled).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import create_engine, text

from bench.scale.generate import write_chat_file
from contract.settings import Settings
from bench.scale.services import (
    ROOT,
    OwnRedis,
    cli,
    cpu_by_group,
    create_database,
    drop_database,
    env_for,
    machine_cpu,
)
from migrations.schema import upgrade_schema

WINDOW = (0.10, 0.90)


class Workers:
    """N `workers start` processes, each in its own process group, logging to files."""

    def __init__(self, n: int, env: dict[str, str], log_dir: Path, extra: list[str]) -> None:
        self.logs = [log_dir / f"worker-{i}.log" for i in range(n)]
        self.processes = []
        for path in self.logs:
            with path.open("w") as log:
                self.processes.append(
                    subprocess.Popen(
                        [*cli("workers.cli"), "start", "--model", "stand-in", "--concurrency", "1", *extra],
                        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                    )
                )

    @property
    def groups(self) -> list[int]:
        return [p.pid for p in self.processes]

    def wait_ready(self, timeout: float = 300) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            ready = sum(" ready." in path.read_text(errors="replace") for path in self.logs)
            dead = [p for p in self.processes if p.poll() is not None]
            if dead:
                raise RuntimeError(f"a worker exited: {dead[0].args}; see {self.logs[self.processes.index(dead[0])]}")
            if ready == len(self.logs):
                return time.monotonic() - started
            time.sleep(0.2)
        raise RuntimeError(f"workers not ready after {timeout}s")

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(10)


def db_counters(connection: Any) -> dict[str, int]:
    row = connection.execute(
        text(
            "SELECT xact_commit, xact_rollback, tup_inserted, tup_updated, blks_read, blks_hit, "
            "pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint AS wal_bytes "
            "FROM pg_stat_database WHERE datname = current_database()"
        )
    ).mappings().one()
    return dict(row)


def run_one(n: int, requests: int, file: Path, redis_server: OwnRedis, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    url = create_database()
    try:
        upgrade_schema(url)
        redis.Redis.from_url(redis_server.url).flushdb()
        extra_env = {"BULKGEN_IDS_PER_MESSAGE": str(args.ids_per_message)}
        env = env_for(url, redis_server.url, **extra_env)
        workers = Workers(n, env, log_dir, ["--loglevel", args.loglevel])
        try:
            ready_s = workers.wait_ready()
            submit_started = time.monotonic()
            submit = subprocess.Popen(
                [*cli("producer.cli"), "submit", str(file), "--model", "stand-in", "--name", f"fleet-{n}"],
                env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
            )
            return measure(url, n, requests, workers, submit, submit_started, redis_server, ready_s, args)
        finally:
            workers.stop()
    finally:
        drop_database(url)


def measure(url: str, n: int, requests: int, workers: Workers, submit: subprocess.Popen[str], submit_started: float,
            redis_server: OwnRedis, ready_s: float, args: argparse.Namespace) -> dict[str, Any]:
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    low, high = int(requests * WINDOW[0]), int(requests * WINDOW[1])
    marks: dict[str, dict[str, Any]] = {}
    waits: Counter[str] = Counter()
    lock_queries: Counter[str] = Counter()
    wait_samples = 0
    max_sessions = 0
    submit_s = None
    deadline = time.monotonic() + args.timeout
    with engine.connect() as connection:
        while True:
            if time.monotonic() > deadline:
                raise RuntimeError(f"N={n}: the job did not finish in {args.timeout}s")
            if submit_s is None and submit.poll() is not None:
                submit_s = time.monotonic() - submit_started
                _, err = submit.communicate()
                if submit.returncode != 0:
                    raise RuntimeError(f"submit failed: {err}")
            row = connection.execute(text("SELECT done_count, failed_count, status FROM jobs ORDER BY id DESC LIMIT 1")).first()
            settled = 0 if row is None else row[0] + row[1]
            now = time.monotonic()
            for name, threshold in (("start", low), ("end", high)):
                if name not in marks and settled >= threshold and row is not None:
                    marks[name] = {
                        "t": now, "settled": settled, "db": db_counters(connection),
                        "cpu": cpu_by_group(workers.groups, redis_server.process.pid),
                        "machine": machine_cpu(),
                    }
            if "start" in marks and "end" not in marks:
                sessions = 0
                for state, wait, query in connection.execute(
                    text(
                        "SELECT state, coalesce(wait_event_type || ':' || wait_event, 'CPU'), left(query, 60) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
                    )
                ):
                    waits[f"{state} / {wait}"] += 1
                    sessions += 1
                    if wait.startswith("Lock:"):
                        lock_queries[query] += 1
                max_sessions = max(max_sessions, sessions)
                wait_samples += 1
            if row is not None and row[2] in ("completed", "failed", "cancelled") and submit_s is not None:
                break
            time.sleep(args.poll)
        failed = connection.execute(text("SELECT failed_count FROM jobs ORDER BY id DESC LIMIT 1")).scalar_one()
        results = connection.execute(text("SELECT count(*) FROM results")).scalar_one()
        duplicates = connection.execute(
            text("SELECT count(*) FROM (SELECT request_id FROM results GROUP BY request_id, sample_index HAVING count(*) > 1) d")
        ).scalar_one()
    engine.dispose()
    start, end = marks["start"], marks["end"]
    seconds = end["t"] - start["t"]
    settled = end["settled"] - start["settled"]
    db = {k: end["db"][k] - start["db"][k] for k in start["db"]}
    cpu = {k: end["cpu"][k] - start["cpu"][k] for k in start["cpu"]}
    busy = end["machine"][0] - start["machine"][0]
    total = end["machine"][1] - start["machine"][1]
    return {
        "workers": n,
        "requests": requests,
        "ids_per_message": args.ids_per_message,
        "workers_ready_s": round(ready_s, 1),
        "submit_s": round(submit_s or 0.0, 1),
        "window_s": round(seconds, 2),
        "completed_per_s": round(settled / seconds, 1),
        "result_rows_per_s": round(settled / seconds, 1),  # one sample per request in the generated file
        "messages_per_s": round(settled / seconds / args.ids_per_message, 1),
        "commits_per_s": round(db["xact_commit"] / seconds, 1),
        "rows_written_per_s": round((db["tup_inserted"] + db["tup_updated"]) / seconds, 1),
        "wal_bytes_per_request": round(db["wal_bytes"] / settled),  # the whole server's WAL: an upper bound
        "cpu_ms_per_request": {k: round(1000 * v / settled, 3) for k, v in cpu.items()},
        "machine_busy": round(busy / total, 3) if total else None,
        "other_cpu_ms_per_request": round(1000 * (busy - sum(cpu.values())) / settled, 3),
        "pg_sessions_max": max_sessions,
        "pg_waits": {k: round(v / max(1, wait_samples), 2) for k, v in waits.most_common(8)},
        "pg_lock_waits_by_query": {k: round(v / max(1, wait_samples), 2) for k, v in lock_queries.most_common(3)},
        "failed": failed,
        "result_rows": results,
        "duplicate_results": duplicates,
        "loadavg_end": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2,4,8,16", help="comma-separated worker counts")
    parser.add_argument("--requests", type=int, default=0, help="requests per run (default: 20,000 x N, between 40k and 80k)")
    parser.add_argument("--ids-per-message", type=int, default=Settings().ids_per_message,
                        help="BULKGEN_IDS_PER_MESSAGE for the producer and the workers (default: the settings' default)")
    parser.add_argument("--loglevel", default="INFO", help="the workers' log level")
    parser.add_argument("--poll", type=float, default=0.2)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    counts = [int(v) for v in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="bulkgen-fleet-") as tmp:
        tmpdir = Path(tmp)
        redis_server = OwnRedis()
        rows = []
        try:
            for n in counts:
                requests = args.requests or min(80_000, max(40_000, 20_000 * n))
                file = tmpdir / f"fleet-{requests}.jsonl"
                if not file.exists():
                    write_chat_file(file, requests)
                log_dir = tmpdir / f"logs-{n}"
                log_dir.mkdir()
                row = run_one(n, requests, file, redis_server, args, log_dir)
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            redis_server.close()
    report = {"cpu": cpu_model(), "python": platform.python_version(), "runs": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(rows))


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip() + f" x {os.cpu_count()}"
    return platform.processor()


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| N | completed req/s | result rows/s | commits/s | rows written/s | CPU ms/req workers · redis · postgres | machine busy | top PG waits (sessions) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = r["cpu_ms_per_request"]
        waits = ", ".join(f"{k} {v}" for k, v in list(r["pg_waits"].items())[:3])
        lines.append(
            f"| {r['workers']} | {r['completed_per_s']:,.0f} | {r['result_rows_per_s']:,.0f} | {r['commits_per_s']:,.0f} | "
            f"{r['rows_written_per_s']:,.0f} | {c['workers']:.2f} · {c['redis']:.2f} · {c['postgres']:.2f} | "
            f"{100 * (r['machine_busy'] or 0):.0f}% | {waits} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
