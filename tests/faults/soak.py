"""The chaos soak (`make soak`): real workers on the tiny model generate two jobs while every few seconds a fault
strikes, chosen by a seeded random generator; at the end the store must hold every result exactly once.

    python -m tests.faults.soak --minutes 30 [--seed S] [--requests 10000] [--workers 3]

Private servers on free ports (never the shared ones): a Redis with AOF and a PostgreSQL cluster. Faults: SIGKILL a
worker (and start a new one), freeze a worker that holds requests past its lease (SIGSTOP, then SIGCONT), kill and
restart Redis, stop PostgreSQL for a few seconds, cancel the second job and retry it, resubmit the first with
--resume. After the last fault the soak waits for both jobs, then checks from SQL: every request done, exactly n
results for each, no (request, sample) twice, no result of a request that is not done, job counters and token
totals equal to the rows. It prints the faults, the figures and every violation; the exit status is 1 on any.
A failing run is replayed with the seed it printed (the faults' order and the input are the seed's; the timing
of processes is not).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from migrations.schema import upgrade_schema
from tests.faults.harness import FAULT_SETTINGS, Fleet, PostgresServer, Store, holder_pid, kill, pid_alive
from tests.helpers import TINY, RedisServer, env_for, producer

SOAK_SETTINGS = FAULT_SETTINGS | {
    # A request may be unlucky several times (killed, then frozen, ...): the soak checks that nothing is lost or
    # doubled, not that the give-up rule fires (tests/faults/test_workers_die.py does).
    "BULKGEN_MAX_ATTEMPTS": "50",
    "BULKGEN_IDS_PER_MESSAGE": "16",
    "BULKGEN_BATCH_SIZE": "32",
}
FAULTS = ("kill_worker", "freeze_worker", "restart_redis", "stop_postgres", "cancel_and_retry", "resume")


@dataclass
class Soak:
    seed: int
    minutes: float
    requests: int
    workers: int
    every_s: tuple[float, float] = (3.0, 8.0)
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="bulkgen-soak-", dir="/tmp")))
    injected: Counter[str] = field(default_factory=Counter)
    samples: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per input file: custom_id -> n."""

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    # --- the input -------------------------------------------------------------------------------------

    def write_input(self, name: str, count: int, rng: random.Random) -> Path:
        path = self.root / name
        wanted: dict[str, int] = {}
        with path.open("w") as out:
            for i in range(count):
                line: dict[str, Any] = {"custom_id": f"{name}-{i}", "max_new_tokens": rng.randint(2, 24)}
                if rng.random() < 0.5:
                    line["prompt"] = f"Item {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))
                else:
                    line["messages"] = [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))}]
                if rng.random() < 0.5:
                    line["temperature"] = round(rng.uniform(0.3, 1.2), 2)
                    line["seed"] = rng.randint(0, 10**6)
                    line["top_p"] = rng.choice([1.0, 0.9])
                else:
                    line["temperature"] = 0
                n = rng.choice([1, 1, 1, 2, 3]) if line["temperature"] else 1
                if n > 1:
                    line["n"] = n
                wanted[line["custom_id"]] = n
                out.write(json.dumps(line) + "\n")
        self.samples[name] = wanted
        return path

    # --- running -------------------------------------------------------------------------------------------

    def run(self) -> int:
        rng = random.Random(self.seed)
        self.log(f"soak: seed {self.seed}, {self.minutes:g} minutes, {self.requests} + {self.requests // 10} requests, "
                 f"{self.workers} workers; files under {self.root}")
        postgres = PostgresServer()
        postgres.start()
        redis = RedisServer(self.root / "redis", aof=True)
        redis.start()
        upgrade_schema(postgres.url)
        env = env_for(postgres.url, redis.url, BULKGEN_MODEL=TINY, **SOAK_SETTINGS)
        store = Store(postgres.url)
        main_file = self.write_input("main.jsonl", self.requests, rng)
        side_file = self.write_input("side.jsonl", max(10, self.requests // 10), rng)
        fleet = Fleet(env, TINY, count=self.workers, log_dir=self.root)
        started = time.monotonic()
        try:
            main_job = self.cli(env, "submit", str(main_file))
            side_job = self.cli(env, "submit", str(side_file))
            self.log(f"jobs {main_job} ({main_file.name}) and {side_job} ({side_file.name}) submitted")
            deadline = started + self.minutes * 60
            while time.monotonic() < deadline:
                time.sleep(rng.uniform(*self.every_s))
                fault = rng.choice(FAULTS)
                self.strike(fault, rng, fleet, redis, postgres, store, env, main_job, side_job, main_file)
                self.keep_fleet(fleet)
            self.log(f"faults over after {time.monotonic() - started:.0f} s: {dict(self.injected)}; waiting for the jobs")
            self.cli(env, "retry", str(side_job))  # a cancel may have been the last fault: finish the job anyway
            self.wait_settled(store, (main_job, side_job))
            elapsed = time.monotonic() - started
            problems = self.check(store, main_job, "main.jsonl") + self.check(store, side_job, "side.jsonl")
            self.report(store, (main_job, side_job), elapsed)
        except BaseException as exc:
            self.log(f"soak stopped: {type(exc).__name__}: {exc}")
            self.log("worker logs (tails):\n" + fleet.logs(3000))
            raise
        finally:
            fleet.stop()
            redis.kill()
            postgres.remove()
        for problem in problems:
            self.log(f"VIOLATION: {problem}")
        self.log(("FAILED" if problems else "PASSED") + f" (seed {self.seed})")
        return 1 if problems else 0

    def cli(self, env: dict[str, str], *args: str) -> int:
        """A producer command, tried again while a fault makes it fail (the store or Redis may be down right now)."""
        for attempt in range(60):
            done = producer(list(args), env)
            if done.returncode == 0:
                out = done.stdout.split()
                return int(out[-1]) if out and out[-1].isdigit() else 0
            time.sleep(2)
        raise RuntimeError(f"producer {' '.join(args)} kept failing: {done.stderr[-2000:]}")

    def keep_fleet(self, fleet: Fleet) -> None:
        """A worker that died (of a fault, or on its own) is replaced, so that the fleet keeps its size."""
        for worker in list(fleet.workers):
            if worker.process.poll() is not None:
                fleet.workers.remove(worker)
                fleet.workers.append(fleet.add())

    def strike(self, fault: str, rng: random.Random, fleet: Fleet, redis: RedisServer, postgres: PostgresServer,
               store: Store, env: dict[str, str], main_job: int, side_job: int, main_file: Path) -> None:
        if fault == "kill_worker":
            victim = rng.choice(fleet.workers)
            try:
                os.killpg(victim.process.pid, signal.SIGKILL)  # the main process and its pool: an OOM kill, no warning
            except ProcessLookupError:
                pass
            victim.stop()
            fleet.workers.remove(victim)
            fleet.workers.append(fleet.add())
            self.log(f"killed worker {victim.process.pid} (SIGKILL) and started another")
        elif fault == "freeze_worker":
            held = self.held(store, (main_job, side_job))
            if not held:
                return
            pid = holder_pid(rng.choice(held))
            if not pid_alive(pid):
                return
            kill(pid, signal.SIGSTOP)
            pause = float(SOAK_SETTINGS["BULKGEN_LEASE_S"]) + rng.uniform(2, 5)
            self.log(f"froze pool process {pid} for {pause:.1f} s (past its lease)")
            time.sleep(pause)
            if pid_alive(pid):
                kill(pid, signal.SIGCONT)
        elif fault == "restart_redis":
            redis.kill()
            time.sleep(rng.uniform(0.5, 3))
            redis.start()
            self.log("killed Redis (SIGKILL; AOF) and started it again")
        elif fault == "stop_postgres":
            postgres.stop("immediate" if rng.random() < 0.5 else "fast")
            down = rng.uniform(2, 6)
            time.sleep(down)
            postgres.start()
            self.log(f"stopped PostgreSQL for {down:.1f} s")
        elif fault == "cancel_and_retry":
            self.cli(env, "cancel", str(side_job))
            time.sleep(rng.uniform(0.5, 3))
            self.cli(env, "retry", str(side_job))
            self.log(f"cancelled job {side_job} and retried it")
        elif fault == "resume":
            self.cli(env, "submit", str(main_file), "--resume", str(main_job))
            self.log(f"resubmitted job {main_job} with --resume")
        self.injected[fault] += 1

    def wait_settled(self, store: Store, jobs: tuple[int, ...], stall_s: float = 300) -> None:
        """Until every job is settled; a fleet that settles nothing for stall_s is stuck (a lost or held request
        nobody takes back), and the soak fails with the state of the requests rather than waiting on."""
        last, since = -1, time.monotonic()
        while True:
            rows = store.query(f"SELECT id, status, done_count + failed_count AS settled FROM jobs WHERE id IN ({','.join(map(str, jobs))})")
            if all(row["status"] in ("completed", "failed") for row in rows):
                return
            settled = sum(row["settled"] for row in rows)
            if settled != last:
                last, since = settled, time.monotonic()
            elif time.monotonic() - since > stall_s:
                raise RuntimeError(f"nothing settled for {stall_s:.0f} s: " + "; ".join(store.progress(j) for j in jobs))
            time.sleep(2)

    @staticmethod
    def held(store: Store, jobs: tuple[int, int]) -> list[str]:
        try:
            rows = store.query(f"SELECT DISTINCT worker FROM requests WHERE job_id IN ({jobs[0]}, {jobs[1]}) "
                               "AND status = 'running' AND worker IS NOT NULL")
        except Exception:  # the store may be down right now
            return []
        return [row["worker"] for row in rows]

    # --- the verdict -----------------------------------------------------------------------------------------

    def check(self, store: Store, job_id: int, name: str) -> list[str]:
        """Every way the store could show a lost or doubled result, for one job."""
        problems: list[str] = []
        wanted = self.samples[name]
        job = store.job(job_id)
        if job["status"] != "completed":
            problems.append(f"job {job_id} ended {job['status']}")
        if job["done_count"] != len(wanted) or job["failed_count"] != 0 or job["total_requests"] != len(wanted):
            problems.append(f"job {job_id}: done {job['done_count']}, failed {job['failed_count']}, "
                            f"total {job['total_requests']}, input {len(wanted)}")
        states = store.states(job_id)
        if states != {"done": len(wanted)}:
            problems.append(f"job {job_id}: requests by state {states}")
        counts = {row["custom_id"]: (row["status"], row["c"]) for row in store.query(
            "SELECT q.custom_id, q.status, count(r.id) AS c FROM requests q LEFT JOIN results r ON r.request_id = q.id "
            "WHERE q.job_id = :j GROUP BY q.custom_id, q.status", j=job_id)}
        wrong = [(cid, n, counts.get(cid)) for cid, n in wanted.items() if counts.get(cid, (None, 0))[1] != n]
        if wrong:
            problems.append(f"job {job_id}: {len(wrong)} requests without exactly n results, e.g. {wrong[:3]}")
        early = [cid for cid, (status, c) in counts.items() if status != "done" and c]
        if early:
            problems.append(f"job {job_id}: results for requests not done: {early[:5]}")
        doubled = store.scalar("SELECT count(*) FROM (SELECT request_id, sample_index FROM results WHERE job_id = :j "
                               "GROUP BY request_id, sample_index HAVING count(*) > 1) AS d", j=job_id)
        if doubled:
            problems.append(f"job {job_id}: {doubled} (request, sample) pairs written twice")
        rows = store.query("SELECT count(*) AS n, coalesce(sum(completion_tokens), 0) AS tokens FROM results WHERE job_id = :j", j=job_id)[0]
        if rows["n"] != sum(wanted.values()) or job["result_count"] != rows["n"]:
            problems.append(f"job {job_id}: {rows['n']} result rows, counter {job['result_count']}, expected {sum(wanted.values())}")
        if job["completion_tokens"] != rows["tokens"]:
            problems.append(f"job {job_id}: completion_tokens counter {job['completion_tokens']} != {rows['tokens']} in results")
        prompt = store.scalar("SELECT coalesce(sum(p), 0) FROM (SELECT max(prompt_tokens) AS p FROM results WHERE job_id = :j "
                              "GROUP BY request_id) AS d", j=job_id)
        if job["prompt_tokens"] != prompt:
            problems.append(f"job {job_id}: prompt_tokens counter {job['prompt_tokens']} != {prompt} in results")
        return problems

    def report(self, store: Store, jobs: tuple[int, int], elapsed: float) -> None:
        for job_id in jobs:
            job = store.job(job_id)
            attempts = store.query("SELECT attempts, count(*) AS c FROM requests WHERE job_id = :j GROUP BY attempts ORDER BY attempts", j=job_id)
            self.log(f"job {job_id}: {job['done_count']} requests done, {job['result_count']} results, "
                     f"{job['completion_tokens']} completion tokens; starts per request "
                     + ", ".join(f"{r['attempts']}: {r['c']}" for r in attempts))
        self.log(f"faults injected: {sum(self.injected.values())} ({dict(sorted(self.injected.items()))}); "
                 f"wall time {elapsed:.0f} s")


WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "data", "model", "queue", "worker", "redis",
         "store", "batch", "token", "prompt", "answer", "please", "write", "short", "story", "about", "a", "cat")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="how long faults are injected (default 30)")
    parser.add_argument("--seed", type=int, default=None, help="replay a run (default: a new seed, printed)")
    parser.add_argument("--requests", type=int, default=10_000, help="requests of the main job (the second has a tenth)")
    parser.add_argument("--workers", type=int, default=3, help="worker processes kept alive (default 3)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**9)
    return Soak(seed, args.minutes, args.requests, args.workers).run()


if __name__ == "__main__":
    sys.exit(main())
