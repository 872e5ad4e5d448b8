"""Submitting a million prompts, and tracking the job: time, peak memory, and the status queries.

    .venv/bin/python -m bench.scale.submit --lines 1000000 --out bench/scale/results/submit.json

Generates a file of chat requests in a temporary directory (never committed), then for SQLite (a file
in that directory) and PostgreSQL (a database of its own on the local server, dropped at the end), with a
redis-server of its own:

1. runs the real `producer submit FILE --model stand-in` as a process: wall time from start to exit
   ("all enqueued"), requests/s, and its peak RSS; then checks every request is stored and every
   message is on the queue;
2. times the phases in-process (validate+spool, store, enqueue), to show where the time goes;
3. times `producer status JOB` and `producer jobs` as processes (interpreter start included) and the
   queries alone in-process, right after the submit and again with half the requests marked done;
4. times one reconciler sweep (`producer reconcile --job JOB`, grace 0) over the job while Redis holds
   all its messages: the sweep reads every queued id from the store and every message from Redis.

With --tables, only step 1, for the same rows (a prompt column and two metadata columns) as Parquet and
as JSONL, one after the other, into the same store:

    .venv/bin/python -m bench.scale.submit --tables --repeat 3 --lines 1000000 --stores sqlite --out bench/scale/results/submit-tables.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import create_engine, text

from bench.scale.fleet import cpu_model
from bench.scale.generate import write_chat_file, write_table_files
from bench.scale.services import (
    OwnRedis,
    cli,
    create_database,
    drop_database,
    env_for,
    run_measured,
)
from migrations.schema import upgrade_schema
from models.db import make_engine
from contract.messages import queue_name
from contract.settings import Settings

MODEL = "stand-in"


def run_process(argv: list[str], env: dict[str, str]) -> tuple[float, int, subprocess.CompletedProcess[str]]:
    """(wall seconds, its own peak RSS in KiB, the finished process) of one command."""
    return run_measured(argv, env)


def submit_once(url: str, broker: str, file: Path, lines: int) -> dict[str, Any]:
    env = env_for(url, broker)
    redis.Redis.from_url(broker).flushdb()
    seconds, rss_kib, done = run_process([*cli("producer.cli"), "submit", str(file), "--model", MODEL, "--name", "scale"], env)
    if done.returncode != 0:
        raise RuntimeError(f"submit failed:\n{done.stderr}")
    job_id = int(done.stdout.strip().splitlines()[-1])
    engine = create_engine(url)
    with engine.connect() as connection:
        stored = connection.execute(text("SELECT count(*) FROM requests WHERE job_id = :j"), {"j": job_id}).scalar_one()
        job = connection.execute(text("SELECT status, total_requests, enqueued_at FROM jobs WHERE id = :j"), {"j": job_id}).one()
    engine.dispose()
    messages = redis.Redis.from_url(broker).llen(queue_name(MODEL))
    expected = math.ceil(lines / Settings().ids_per_message)
    if stored != lines or job.total_requests != lines or job.enqueued_at is None or messages != expected:
        raise RuntimeError(f"wrong submit: {stored} stored, job {tuple(job)}, {messages} messages (expected {expected})")
    return {
        "job_id": job_id,
        "seconds": round(seconds, 2),
        "requests_per_s": round(lines / seconds),
        "peak_rss_mib": round(rss_kib / 1024, 1),
        "messages": messages,
    }


def phases(url: str, broker: str, file: Path) -> dict[str, float]:
    """The three steps of `producer submit`, timed in this process."""
    from contract.broker import Sender, make_app
    from producer.inputs import open_input
    from producer.submit import enqueue_job, store_job, validate_file

    redis.Redis.from_url(broker).flushdb()
    db = make_engine(url)
    t0 = time.perf_counter()
    data = open_input(file)
    validation = validate_file(data, {}, 2048)
    t1 = time.perf_counter()
    spool_mib = validation.spool.bytes_written / 2**20 if validation.spool else 0.0
    job_id = store_job(db, data, model=MODEL, name="phases", defaults={}, context_length=2048, validation=validation)
    t2 = time.perf_counter()
    app = make_app(broker)
    with Sender(app) as send:
        enqueue_job(db, job_id, MODEL, Settings().ids_per_message, send)
    t3 = time.perf_counter()
    db.dispose()
    return {
        "validate_and_spool_s": round(t1 - t0, 2),
        "store_s": round(t2 - t1, 2),
        "enqueue_s": round(t3 - t2, 2),
        "spool_mib": round(spool_mib, 1),
    }


def tracking(url: str, job_id: int) -> dict[str, Any]:
    """`producer status JOB` and `producer jobs`: as processes, and the queries alone (best of 3)."""
    from producer.views import job_rows, job_status

    env = env_for(url, "redis://127.0.0.1:1/0")
    timings: dict[str, Any] = {}
    for label, argv in (("status_cli_s", ["status", str(job_id)]), ("jobs_cli_s", ["jobs"])):
        best = math.inf
        for _ in range(3):
            seconds, _, done = run_process([*cli("producer.cli"), *argv], env)
            if done.returncode != 0:
                raise RuntimeError(done.stderr)
            best = min(best, seconds)
        timings[label] = round(best, 3)
    db = make_engine(url)
    for label, call in (("status_query_s", lambda: job_status(db, job_id)), ("jobs_query_s", lambda: job_rows(db, 20))):
        best = math.inf
        for _ in range(3):
            t0 = time.perf_counter()
            call()
            best = min(best, time.perf_counter() - t0)
        timings[label] = round(best, 3)
    db.dispose()
    started = time.perf_counter()
    run_process([sys.executable, "-c", "import producer.cli"], env)
    timings["interpreter_and_imports_s"] = round(time.perf_counter() - started, 3)
    return timings


def reconcile_sweep(url: str, broker: str, job_id: int) -> dict[str, Any]:
    """One reconciler sweep over the job, every request queued and carried by Redis (grace 0: all are examined)."""
    env = env_for(url, broker, BULKGEN_RECONCILE_GRACE_S="0")
    seconds, rss_kib, done = run_process([*cli("producer.cli"), "reconcile", "--job", str(job_id)], env)
    if done.returncode != 0 or " 0 requests re-enqueued" not in done.stdout:
        raise RuntimeError(f"reconcile: {done.stdout} {done.stderr}")
    return {"seconds": round(seconds, 2), "peak_rss_mib": round(rss_kib / 1024, 1), "report": done.stdout.strip()}


def mark_half_done(url: str, job_id: int) -> None:
    engine = create_engine(url)
    with engine.begin() as connection:
        done = connection.execute(
            text("UPDATE requests SET status = 'done' WHERE job_id = :j AND id % 2 = 0"), {"j": job_id}
        ).rowcount
        connection.execute(text("UPDATE jobs SET done_count = :d, status = 'running' WHERE id = :j"), {"d": done, "j": job_id})
    engine.dispose()


def bench_store(kind: str, url: str, broker: str, file: Path, lines: int, args: argparse.Namespace) -> dict[str, Any]:
    upgrade_schema(url)
    row: dict[str, Any] = {"store": kind, "lines": lines}
    row["submit"] = submit_once(url, broker, file, lines)
    print(kind, "submit", row["submit"], flush=True)
    if args.only_submit:
        return row
    row["tracking_after_submit"] = tracking(url, row["submit"]["job_id"])
    print(kind, "tracking", row["tracking_after_submit"], flush=True)
    row["reconcile_sweep"] = reconcile_sweep(url, broker, row["submit"]["job_id"])
    print(kind, "reconcile sweep", row["reconcile_sweep"], flush=True)
    mark_half_done(url, row["submit"]["job_id"])
    row["tracking_half_done"] = tracking(url, row["submit"]["job_id"])
    print(kind, "tracking (half done)", row["tracking_half_done"], flush=True)
    if args.phases:
        row["phases"] = phases(url, broker, file)
        print(kind, "phases", row["phases"], flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--stores", default="sqlite,postgresql")
    parser.add_argument("--no-phases", dest="phases", action="store_false", help="skip the in-process phase timings")
    parser.add_argument("--only-submit", action="store_true", help="only step 1 (e.g. to time an older checkout's submit)")
    parser.add_argument("--tables", action="store_true", help="submit the same rows as Parquet and as JSONL (step 1 only)")
    parser.add_argument("--repeat", type=int, default=1, help="with --tables: submit each input this many times, alternating")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.tables:
        return tables_main(args)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bulkgen-submit-bench-") as tmp:
        file = write_chat_file(Path(tmp) / "prompts.jsonl", args.lines)
        file_mib = round(os.path.getsize(file) / 2**20, 1)
        own_redis = OwnRedis()
        try:
            for kind in args.stores.split(","):
                if kind == "sqlite":
                    rows.append(bench_store(kind, f"sqlite:///{tmp}/store.db", own_redis.url, file, args.lines, args))
                else:
                    url = create_database()
                    try:
                        rows.append(bench_store(kind, url, own_redis.url, file, args.lines, args))
                    finally:
                        drop_database(url)
        finally:
            own_redis.close()
    report = {
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "file_mib": file_mib,
        "loadavg": os.getloadavg(),
        "runs": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


def tables_main(args: argparse.Namespace) -> None:
    """Parquet (prompt + 2 metadata columns) against the same rows as JSONL, submitted by the real CLI."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="bulkgen-submit-bench-") as tmp:
        parquet, jsonl = write_table_files(Path(tmp), args.lines)
        sizes = {"parquet_mib": round(os.path.getsize(parquet) / 2**20, 1), "jsonl_mib": round(os.path.getsize(jsonl) / 2**20, 1)}
        own_redis = OwnRedis()
        try:
            for kind in args.stores.split(","):
                url = f"sqlite:///{tmp}/store.db" if kind == "sqlite" else create_database()
                try:
                    upgrade_schema(url)
                    for attempt in range(1, args.repeat + 1):  # alternated, so a busy spell on a shared machine hits both
                        for label, file in (("parquet", parquet), ("jsonl", jsonl)):
                            row = {"store": kind, "input": label, "lines": args.lines, "attempt": attempt,
                                   "loadavg_1min": round(os.getloadavg()[0], 2),
                                   "submit": submit_once(url, own_redis.url, file, args.lines)}
                            print(kind, label, row["submit"], flush=True)
                            rows.append(row)
                finally:
                    if kind != "sqlite":
                        drop_database(url)
        finally:
            own_redis.close()
    best = {f"{r['store']} {r['input']}": max(x["submit"]["requests_per_s"] for x in rows if (x["store"], x["input"]) == (r["store"], r["input"]))
            for r in rows}
    report = {"cpu": cpu_model(), "python": platform.python_version(), **sizes, "loadavg": os.getloadavg(),
              "best_requests_per_s": best, "runs": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
