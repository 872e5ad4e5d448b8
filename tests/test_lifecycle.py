"""Leases, attempts, hand-backs, the reconciler, and the lifecycle commands (cancel, retry, resume,
status, reconcile) on a real store and a real Redis; no worker processes here (tests/faults/ has them)."""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner
from sqlalchemy import select, text, update
from sqlalchemy.exc import IntegrityError, OperationalError

from models.db import make_engine, session_factory, utcnow
from models.intake import create_job, insert_requests, mark_enqueued, request_row, set_job_totals
from models.store import (
    Outcome,
    cancel_job,
    claim_requests,
    expire_leases,
    record_outcomes,
    release_requests,
    reopen_job,
)
from models.tables import Job, Request
from producer.cli import main
from tests.helpers import WorkerProcess, env_for, producer, wait_for_job, write_jsonl
from contract import policy
from contract.broker import make_app
from contract.messages import GENERATE_TASK, queue_name
from reconciler.sweep import broker, carried_ids, enqueue_missing, sweep
from contract.settings import url_secrets
from workers.app import SecretFilter, delivery_problems
from contract.settings import Settings
from workers.standin import StandInEngine
from workers.types import GenerationResult
from workers.worker import Worker

STANDIN = "stand-in"


def make_job(url: str, count: int, model: str = STANDIN) -> tuple[int, list[int]]:
    db = make_engine(url)
    with db.begin() as connection:
        job_id = create_job(connection, name=None, model=model, source="in.jsonl", defaults={})
        insert_requests(connection, job_id, [[request_row(i, f"c{i}", f"prompt {i}", None, {}, None) for i in range(1, count + 1)]])
        set_job_totals(connection, job_id, total_requests=count, total_samples=count, rejected=0)
        mark_enqueued(connection, job_id)
    with db.connect() as connection:
        ids = list(connection.execute(select(Request.id).where(Request.job_id == job_id).order_by(Request.id)).scalars())
    db.dispose()
    return job_id, ids


def requests_of(url: str, job_id: int) -> dict[int, Request]:
    db = make_engine(url)
    with session_factory(db)() as session:
        rows = {r.id: r for r in session.scalars(select(Request).where(Request.job_id == job_id))}
    db.dispose()
    return rows


def job_row(url: str, job_id: int) -> Job:
    db = make_engine(url)
    with session_factory(db)() as session:
        job = session.get(Job, job_id)
    db.dispose()
    assert job is not None
    return job


def lapse(url: str, ids: list[int]) -> None:
    """What time does to a lease whose holder died: it passes."""
    db = make_engine(url)
    with db.begin() as connection:
        connection.execute(update(Request).where(Request.id.in_(ids)).values(lease_until=utcnow() - timedelta(seconds=1)))
    db.dispose()


# --- claims, leases, attempts -----------------------------------------------------------------------

def test_a_live_lease_keeps_others_off_and_a_lapsed_one_lets_them_in(store_url: str) -> None:
    job_id, ids = make_job(store_url, 3)
    sessions = session_factory(make_engine(store_url))
    with sessions() as session:
        first = claim_requests(session, job_id, ids, "host:1", lease_s=60)
    assert first is not None and [r.id for r in first.requests] == ids and not first.one_by_one
    with sessions() as session:  # a duplicate message, while the holder lives
        second = claim_requests(session, job_id, ids, "host:2", lease_s=60)
    assert second is not None and second.requests == []

    lapse(store_url, ids)  # host:1 died
    with sessions() as session:
        third = claim_requests(session, job_id, ids, "host:2", lease_s=60)
    assert third is not None and third.one_by_one and [r.id for r in third.requests] == ids[:1]
    rows = requests_of(store_url, job_id)
    assert rows[ids[0]].attempts == 2 and rows[ids[0]].worker == "host:2"
    assert rows[ids[1]].attempts == 1 and rows[ids[1]].worker == "host:1"  # not taken: still host:1's, lapsed


def test_a_request_started_max_attempts_times_ends_failed_with_its_reason(store_url: str) -> None:
    job_id, ids = make_job(store_url, 2)
    sessions = session_factory(make_engine(store_url))
    for attempt in range(3):
        with sessions() as session:
            claim = claim_requests(session, job_id, ids[:1], f"host:{attempt}", lease_s=60, max_attempts=3)
        assert claim is not None and [r.id for r in claim.requests] == ids[:1]
        lapse(store_url, ids[:1])
    with sessions() as session:
        last = claim_requests(session, job_id, ids[:1], "host:9", lease_s=60, max_attempts=3)
    assert last is not None and last.requests == [] and last.gave_up == ids[:1]
    failed = requests_of(store_url, job_id)[ids[0]]
    assert failed.status == "failed" and failed.attempts == 3
    assert failed.error == "gave up after 3 attempts; last: its worker (host:2) was lost while generating it"
    job = job_row(store_url, job_id)
    assert job.failed_count == 1 and job.status == "running"

    with sessions() as session:  # the other request completes: the job is completed, with a failure
        claim = claim_requests(session, job_id, ids[1:], "host:9", lease_s=60)
        assert claim is not None
        record_outcomes(session, job_id, [Outcome(ids[1], 2, [result_row(ids[1], job_id)])])
    job = job_row(store_url, job_id)
    assert (job.status, job.done_count, job.failed_count) == ("completed", 1, 1)


def test_expired_leases_go_back_to_queued_or_fail_at_the_cap(store_url: str) -> None:
    job_id, ids = make_job(store_url, 2)
    db = make_engine(store_url)
    with db.begin() as connection:
        connection.execute(update(Request).where(Request.id == ids[0]).values(status="running", attempts=1, worker="h:1"))
        connection.execute(update(Request).where(Request.id == ids[1]).values(status="running", attempts=3, worker="h:2", error="OOM"))
    lapse(store_url, ids)
    with session_factory(db)() as session:
        requeued, failed = expire_leases(session, job_id, max_attempts=3)
    assert (requeued, failed) == ([ids[0]], [ids[1]])
    rows = requests_of(store_url, job_id)
    assert rows[ids[0]].status == "queued" and rows[ids[0]].attempts == 1
    assert rows[ids[1]].status == "failed" and rows[ids[1]].error == "gave up after 3 attempts; last: OOM"


def test_release_hands_back_with_attempts_counted(store_url: str) -> None:
    job_id, ids = make_job(store_url, 2)
    sessions = session_factory(make_engine(store_url))
    with sessions() as session:
        claim_requests(session, job_id, ids, "h:1")
    with sessions() as session:
        assert release_requests(session, ids, "h:other", "nope") == []  # only the holder hands back
        assert sorted(release_requests(session, ids, "h:1", "ValueError: bad")) == ids
    rows = requests_of(store_url, job_id)
    assert {(r.status, r.attempts, r.error) for r in rows.values()} == {("queued", 1, "ValueError: bad")}
    with sessions() as session:
        again = claim_requests(session, job_id, ids, "h:1")
    assert again is not None and again.one_by_one and len(again.requests) == 1


def result_row(request_id: int, job_id: int, sample: int = 0, text_: str = "t") -> dict:
    now = utcnow()
    return {
        "request_id": request_id, "job_id": job_id, "sample_index": sample, "text": text_, "finish_reason": "length",
        "prompt_tokens": 2, "completion_tokens": 5, "params": {}, "seed": 1, "model": STANDIN, "dtype": "none",
        "quantization": "none", "worker_host": "h", "device": "cpu", "started_at": now, "finished_at": now,
        "generation_seconds": 0.1,
    }


def test_cancel_then_reopen(store_url: str) -> None:
    job_id, ids = make_job(store_url, 4)
    sessions = session_factory(make_engine(store_url))
    with sessions() as session:
        claim_requests(session, job_id, ids[:2], "h:1")
        record_outcomes(session, job_id, [Outcome(ids[0], 2, [result_row(ids[0], job_id)]), Outcome(ids[1], 2, error="too long")])
    with sessions() as session:
        info = cancel_job(session, job_id)
    assert info == {"job_id": job_id, "status": "cancelled", "cancelled": 2, "running": 0, "changed": True}
    with sessions() as session:
        assert claim_requests(session, job_id, ids, "h:2") is None  # workers skip a cancelled job's messages
    with sessions() as session:
        assert cancel_job(session, job_id)["changed"] is False  # type: ignore[index]
    assert {r.status for r in requests_of(store_url, job_id).values()} == {"done", "failed", "cancelled"}

    with sessions() as session:
        reopened = reopen_job(session, job_id)
    assert reopened == {"job_id": job_id, "failed": 1, "cancelled": 2, "unfinished": 3}
    job = job_row(store_url, job_id)
    assert (job.status, job.done_count, job.failed_count, job.finished_at) == ("queued", 1, 0, None)
    rows = requests_of(store_url, job_id)
    assert rows[ids[1]].status == "queued" and rows[ids[1]].attempts == 0 and rows[ids[1]].error is None


def test_retrying_a_cancelled_job_whose_running_requests_all_finished_completes_it(store_url: str) -> None:
    """Found by the soak: a job cancelled while its last requests ran ends with every request done but stays
    'cancelled' (a cancelled job is not completed by its counters); `producer retry` then has nothing to reopen and
    must settle it as its counters say, or the job is never completed."""
    job_id, ids = make_job(store_url, 3)
    sessions = session_factory(make_engine(store_url))
    with sessions() as session:
        claim_requests(session, job_id, ids, "h:1")
    with sessions() as session:
        assert cancel_job(session, job_id)["running"] == 3  # type: ignore[index]
    with sessions() as session:
        record_outcomes(session, job_id, [Outcome(i, 2, [result_row(i, job_id)]) for i in ids])
    assert job_row(store_url, job_id).status == "cancelled"
    with sessions() as session:
        assert reopen_job(session, job_id) == {"job_id": job_id, "failed": 0, "cancelled": 0, "unfinished": 0}
    job = job_row(store_url, job_id)
    assert (job.status, job.done_count, job.failed_count) == ("completed", 3, 0) and job.finished_at is not None


# --- the worker's batch loop, in process, on a real store ---------------------------------------

class PickyEngine(StandInEngine):
    """Raises on the whole batch whenever it holds the prompt 'bad'; reports a per-request error for 'long'."""

    def generate(self, requests):  # type: ignore[no-untyped-def]
        if any(r.prompt == "bad" for r in requests):
            raise ValueError("cannot tokenize 'bad'")
        results = super().generate(requests)
        return [GenerationResult(0, [], error="prompt too long") if r.prompt == "long" else res for r, res in zip(requests, results)]


@pytest.fixture
def worker_state(sqlite_url: str) -> Iterator[Worker]:
    settings = Settings(database_url=sqlite_url, model=STANDIN, lease_s=30, max_attempts=3)
    worker = Worker(
        engine=PickyEngine(STANDIN), sessions=session_factory(make_engine(sqlite_url)), model=STANDIN,
        device="cpu", worker="test:1", settings=settings,
    )
    yield worker
    worker.shutdown(timeout=30)


def test_a_request_that_breaks_its_batch_fails_alone_and_the_rest_complete(worker_state, sqlite_url: str) -> None:  # type: ignore[no-untyped-def]
    job_id, ids = make_job(sqlite_url, 6)
    db = make_engine(sqlite_url)
    with db.begin() as connection:
        connection.execute(update(Request).where(Request.id == ids[2]).values(prompt="bad"))
        connection.execute(update(Request).where(Request.id == ids[4]).values(prompt="long"))
    assert worker_state.handle(job_id, ids) == 6  # claimed together; the batch fails, then each is tried alone
    assert worker_state.wait_idle(timeout=60)
    rows = requests_of(sqlite_url, job_id)
    assert rows[ids[2]].status == "failed" and rows[ids[2]].attempts == 3
    assert rows[ids[2]].error == "gave up after 3 attempts; last: ValueError: cannot tokenize 'bad'"
    assert rows[ids[4]].status == "failed" and rows[ids[4]].error == "prompt too long" and rows[ids[4]].attempts == 2
    assert {rows[i].status for i in ids if i not in (ids[2], ids[4])} == {"done"}
    job = job_row(sqlite_url, job_id)
    assert (job.status, job.done_count, job.failed_count) == ("completed", 4, 2)
    with db.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM results")).scalar_one() == 4
    assert worker_state.handle(job_id, ids) == 0  # redelivered: nothing is generated again


def test_store_errors_are_waited_out_and_others_are_not() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))
        return "ok"

    assert policy.with_store_retry(flaky, within_s=10, first_wait_s=0.01) == "ok" and len(calls) == 3

    def down() -> None:
        raise OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))

    with pytest.raises(policy.TransientError):
        policy.with_store_retry(down, within_s=0.1, first_wait_s=0.02)

    def wrong() -> None:
        raise IntegrityError("INSERT", {}, ValueError("duplicate key"))

    with pytest.raises(IntegrityError):  # a bug is not retried
        policy.with_store_retry(wrong, within_s=10, first_wait_s=0.01)


# --- the reconciler and the lifecycle commands ----------------------------------------------------

def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def message_ids(client: redis.Redis, queue: str) -> list[int]:
    ids = []
    for raw in client.lrange(queue, 0, -1):
        import base64

        body = json.loads(base64.b64decode(json.loads(raw)["body"]))
        ids += body[0][1]
    return sorted(ids)


def test_reconciler_sends_only_what_redis_lost(sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"p{i}"} for i in range(50)])
    code, output = cli("submit", str(path), "--model", STANDIN, "--database-url", sqlite_url, "--broker-url", broker_url)
    assert code == 0, output
    job_id = int(output.split()[-1])
    ids = sorted(requests_of(sqlite_url, job_id))
    client = redis.Redis.from_url(broker_url)
    queue = queue_name(STANDIN)
    app = make_app(broker_url)
    db = make_engine(sqlite_url)
    settings = Settings(database_url=sqlite_url, broker_url=broker_url, reconcile_grace_s=0, ids_per_message=8)

    assert sweep(db, app, settings).resent == 0  # everything is still on the queue
    lost = message_ids(client, queue)
    assert lost == ids
    client.ltrim(queue, 0, 2)  # keep the 3 newest messages, lose the others
    kept = message_ids(client, queue)
    report = sweep(db, app, settings)
    assert report.resent == len(ids) - len(kept)
    assert message_ids(client, queue) == ids  # each id carried exactly once again
    assert sweep(db, app, settings).resent == 0

    # within the grace period nothing is sent, however lost
    client.delete(queue)
    assert sweep(db, app, Settings(database_url=sqlite_url, broker_url=broker_url, reconcile_grace_s=3600)).resent == 0

    # a message taken by a worker long ago and never acknowledged does not count as carried
    stale = json.dumps([{"body": "", "headers": {"task": GENERATE_TASK}, "properties": {}}, "", queue])
    client.hset("unacked", "tag-1", json.dumps([json.loads(_message(job_id, ids[:8])), "", queue]))
    client.zadd("unacked_index", {"tag-1": 1.0})
    client.hset("unacked", "tag-2", stale)
    with broker(app) as link:
        assert (job_id, ids[0]) not in carried_ids(link, [queue], taken_within_s=60)
    client.zadd("unacked_index", {"tag-1": __import__("time").time()})
    with broker(app) as link:
        carried = carried_ids(link, [queue], taken_within_s=60)
        assert (job_id, ids[0]) in carried and (job_id, ids[8]) not in carried


def _message(job_id: int, ids: list[int]) -> str:
    import base64

    body = base64.b64encode(json.dumps([[job_id, ids], {}, {}]).encode()).decode()
    return json.dumps({"body": body, "headers": {"task": GENERATE_TASK}, "properties": {"body_encoding": "base64"}})


def test_retry_sends_the_failed_and_the_missing_only(sqlite_url: str, broker_url: str) -> None:
    job_id, ids = make_job(sqlite_url, 10)
    sessions = session_factory(make_engine(sqlite_url))
    with sessions() as session:  # 0-3 done, 4-5 failed, 6 running under a live lease, 7-9 queued (lost from Redis)
        claim_requests(session, job_id, ids[:7], "h:1", lease_s=600)
        record_outcomes(session, job_id, [Outcome(i, 1, [result_row(i, job_id)]) for i in ids[:4]]
                        + [Outcome(i, 1, error="prompt too long") for i in ids[4:6]])
    client = redis.Redis.from_url(broker_url)
    queue = queue_name(STANDIN)
    env = {"BULKGEN_DATABASE_URL": sqlite_url, "BULKGEN_BROKER_URL": broker_url}
    code, output = cli("retry", str(job_id), "--database-url", sqlite_url, "--broker-url", broker_url)
    assert code == 0, output
    assert "2 failed and 0 cancelled requests reopened; 5 requests enqueued" in output
    assert message_ids(client, queue) == ids[4:6] + ids[7:]
    job = job_row(sqlite_url, job_id)
    assert (job.failed_count, job.done_count, job.status) == (0, 4, "running")
    code, output = cli("retry", str(job_id), "--database-url", sqlite_url, "--broker-url", broker_url)
    assert "0 requests enqueued" in output  # all of them are on the queue now
    assert env  # the commands took their URLs from the flags


def test_status_shows_states_tokens_and_grouped_failures(sqlite_url: str) -> None:
    job_id, ids = make_job(sqlite_url, 5)
    sessions = session_factory(make_engine(sqlite_url))
    with sessions() as session:
        claim_requests(session, job_id, ids, "h:1")
        record_outcomes(session, job_id, [Outcome(ids[0], 3, [result_row(ids[0], job_id)])]
                        + [Outcome(i, 0, error="prompt too long") for i in ids[1:3]] + [Outcome(ids[3], 0, error="bad chat")])
    code, output = cli("status", str(job_id), "--json", "--database-url", sqlite_url)
    assert code == 0, output
    info = json.loads(output)
    assert info["by_state"] == {"done": 1, "failed": 3, "running": 1}
    assert info["failures"] == [{"reason": "prompt too long", "count": 2}, {"reason": "bad chat", "count": 1}]
    assert (info["prompt_tokens"], info["completion_tokens"], info["results"]) == (3, 5, 1)
    assert info["tokens_per_s"] is not None and info["lease_lapsed"] == 0
    code, output = cli("status", str(job_id), "--database-url", sqlite_url)
    assert code == 0 and "prompt too long" in output and "failures by reason" in output


def test_resume_finishes_an_interrupted_submit(sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"p{i}"} for i in range(20)] + ['{"prompt": 3}'])
    code, output = cli("submit", str(path), "--skip-invalid", "--model", STANDIN, "--database-url", sqlite_url, "--broker-url", broker_url)
    assert code == 0, output
    job_id = int(output.split()[-1])
    client = redis.Redis.from_url(broker_url)
    queue = queue_name(STANDIN)
    # as if the submit died after storing the job and sending a few of its messages
    client.ltrim(queue, -1, -1)
    db = make_engine(sqlite_url)
    with db.begin() as connection:
        connection.execute(update(Job).where(Job.id == job_id).values(status="submitting", enqueued_at=None))
    code, output = cli("status", str(job_id), "--database-url", sqlite_url)
    assert "--resume" in output and "interrupted" in output
    code, output = cli("submit", str(path), "--resume", str(job_id), "--database-url", sqlite_url, "--broker-url", broker_url)
    assert code == 0, output
    assert message_ids(client, queue) == sorted(requests_of(sqlite_url, job_id))
    job = job_row(sqlite_url, job_id)
    assert job.status == "queued" and job.enqueued_at is not None

    code, output = cli("cancel", str(job_id), "--database-url", sqlite_url)
    assert code == 0 and "20 queued requests dropped" in output
    code, output = cli("submit", str(path), "--resume", str(job_id), "--database-url", sqlite_url, "--broker-url", broker_url)
    assert code != 0 and f"producer retry {job_id}" in output
    code, output = cli("submit", str(path), "--resume", "999", "--database-url", sqlite_url, "--broker-url", broker_url)
    assert code != 0 and "no job 999" in output


def test_enqueue_missing_on_a_finished_job_sends_nothing(sqlite_url: str, broker_url: str) -> None:
    job_id, ids = make_job(sqlite_url, 2)
    sessions = session_factory(make_engine(sqlite_url))
    with sessions() as session:
        claim_requests(session, job_id, ids, "h:1")
        record_outcomes(session, job_id, [Outcome(i, 1, [result_row(i, job_id)]) for i in ids])
    assert enqueue_missing(make_engine(sqlite_url), make_app(broker_url), job_id) == 0


def test_reconcile_command(sqlite_url: str, broker_url: str) -> None:
    job_id, ids = make_job(sqlite_url, 3)
    code, output = cli("reconcile", "--database-url", sqlite_url, "--broker-url", broker_url)
    assert code == 0 and "1 open jobs" in output
    code, output = cli("reconcile", "--loop", "0", "--database-url", sqlite_url, "--broker-url", broker_url)
    assert code != 0 and "--loop" in output


# --- settings the worker refuses, and credentials ------------------------------------------------

def test_unsafe_delivery_settings_are_named() -> None:
    settings = Settings()
    assert delivery_problems(make_app("redis://127.0.0.1:6379/0", settings).conf, settings) == []
    bad = Settings(visibility_timeout_s=3600, task_time_limit_s=7200, task_soft_time_limit_s=7300)
    conf = make_app("redis://127.0.0.1:6379/0", bad).conf
    conf.worker_prefetch_multiplier = 4
    conf.task_acks_late = False
    conf.accept_content = ["json", "pickle"]
    problems = "\n".join(delivery_problems(conf, bad))
    for words in ("task_acks_late is off", "prefetch_multiplier is 4", "only JSON", "below the hard one",
                  "below the broker's visibility timeout (3600 s)"):
        assert words in problems


def test_rediss_urls_verify_certificates() -> None:
    import ssl

    assert make_app("rediss://:pw@example.com:6380/0").conf.broker_use_ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    # ssl options in the URL are the user's choice, passed to kombu as they are
    assert not make_app("rediss://:pw@example.com:6380/0?ssl_ca_certs=/ca.pem").conf.broker_use_ssl
    assert not make_app("redis://:pw@example.com:6379/0").conf.broker_use_ssl


def test_secret_filter_scrubs_messages_and_tracebacks() -> None:
    secrets = url_secrets("postgresql+psycopg://u:db%40pass@h/db", "redis://:redis-pw@h:6379/0", "redis://h")
    assert set(secrets) >= {"db%40pass", "db@pass", "redis-pw"}
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "cannot reach %s", ("redis://:redis-pw@h",), None)
    try:
        raise RuntimeError("login db@pass failed")
    except RuntimeError:
        import sys

        record.exc_info = sys.exc_info()
    SecretFilter(secrets).filter(record)
    formatted = logging.Formatter().format(record)
    assert "redis-pw" not in formatted and "db@pass" not in formatted and "***" in formatted


def test_a_line_over_the_size_limit_is_rejected_with_its_number(sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": "' + "x" * (1 << 20) + '"}\n{"prompt": "ok too"}\n')
    code, output = cli("submit", str(path), "--model", STANDIN, "--database-url", sqlite_url, "--broker-url", broker_url)
    assert code != 0 and "big.jsonl:2: line is 1048590 bytes, the limit is 1048576" in output
    assert "Traceback" not in output
    db = make_engine(sqlite_url)
    with db.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM jobs")).scalar_one() == 0
    assert redis.Redis.from_url(broker_url).llen(queue_name(STANDIN)) == 0


# --- with real worker processes --------------------------------------------------------------------

@pytest.mark.slow
def test_worker_refuses_to_start_with_a_time_limit_beyond_the_visibility_timeout(sqlite_url: str, broker_url: str) -> None:
    env = env_for(sqlite_url, broker_url, BULKGEN_TASK_TIME_LIMIT_S="20000", BULKGEN_TASK_SOFT_TIME_LIMIT_S="19000")
    worker = WorkerProcess(env, model=STANDIN)
    try:
        code = worker.process.wait(60)
    finally:
        worker.stop()
    output = worker.output()
    assert code != 0
    assert "refuses to start" in output and "hard time limit (20000 s) must be below the broker's visibility timeout (10800 s)" in output


class Pwned:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_a_pickled_message_is_refused_not_run(sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    queue = queue_name(STANDIN)
    app = make_app(broker_url)
    app.send_task(GENERATE_TASK, args=[Pwned(marker), []], queue=queue, serializer="pickle")
    raw = json.loads(redis.Redis.from_url(broker_url).lrange(queue, 0, 0)[0])
    assert raw["content-type"] == "application/x-python-serialize"  # it really is a pickle on the queue
    env = env_for(sqlite_url, broker_url)
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "after the pickle"}])
    job_id = int(producer(["submit", str(path), "--model", STANDIN], env, check=True).stdout.split()[-1])
    worker = WorkerProcess(env, model=STANDIN)
    try:
        assert wait_for_job(sqlite_url, job_id, timeout=120) == "completed"  # queued behind the pickle: it was consumed
        assert worker.process.poll() is None
    finally:
        worker.stop()
    assert not marker.exists()
    assert "Refusing to deserialize untrusted content of type pickle" in worker.output()


@pytest.mark.slow
def test_tls_broker_with_password_and_no_credential_in_any_output(pg_url: str, tmp_path: Path) -> None:
    import shutil
    import subprocess

    from tests.helpers import RedisServer, free_port

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make the test's certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    redis_password, db_password = "redis-Secret-41", "db-Secret-77"
    tls_port = free_port()
    server = RedisServer(tmp_path / "redis", aof=False, password=redis_password, extra=[
        "--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
        "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"])
    server.start()
    try:
        database_url = pg_url.replace("postgresql+psycopg://postgres@", f"postgresql+psycopg://postgres:{db_password}@")
        broker = f"rediss://:{redis_password}@127.0.0.1:{tls_port}/0"
        env = env_for(database_url, f"{broker}?ssl_ca_certs={cert}")
        path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"p{i}"} for i in range(10)])

        unverified = producer(["submit", str(path), "--model", STANDIN], env_for(database_url, broker))
        assert unverified.returncode != 0 and "certificate verify failed" in unverified.stderr  # a bare rediss:// verifies

        submitted = producer(["submit", str(path), "--model", STANDIN], env, check=True)
        job_id = int(submitted.stdout.split()[-1])
        worker = WorkerProcess(env, model=STANDIN, extra=["--loglevel", "DEBUG"])
        try:
            assert wait_for_job(pg_url, job_id, timeout=120) == "completed", worker.output()[-3000:]
        finally:
            worker.stop()
        outputs = [
            unverified.stdout + unverified.stderr, submitted.stdout + submitted.stderr, worker.output(),
            producer(["status", str(job_id)], env, check=True).stdout,
            producer(["status", str(job_id), "--json"], env, check=True).stdout,
            producer(["jobs"], env, check=True).stdout,
            producer(["--help"], env, check=True).stdout,
            producer(["submit", "--help"], env, check=True).stdout,
            producer(["reconcile"], env, check=True).stdout,
            producer(["retry", str(job_id)], env, check=True).stdout,
            producer(["submit", str(path), "--resume", str(job_id)], env, check=True).stderr,
        ]
        assert "127.0.0.1" in worker.output()  # the URLs were printed, with their passwords hidden
        for output in outputs:
            assert redis_password not in output and db_password not in output
    finally:
        server.kill()


def test_a_cancelled_jobs_lapsed_requests_end_cancelled(sqlite_url: str, broker_url: str) -> None:
    job_id, ids = make_job(sqlite_url, 3)
    db = make_engine(sqlite_url)
    with session_factory(db)() as session:
        claim_requests(session, job_id, ids[:1], "h:1")
        cancel_job(session, job_id)
    lapse(sqlite_url, ids[:1])  # its worker died after the cancel
    report = sweep(db, make_app(broker_url), Settings(database_url=sqlite_url, broker_url=broker_url))
    assert report.jobs == 0 and report.resent == 0
    assert {r.status for r in requests_of(sqlite_url, job_id).values()} == {"cancelled"}
