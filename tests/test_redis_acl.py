"""The Redis ACL users (contract.redis_acl, `producer redis acl`) against a real redis-server that loads the
generated file: the default user is off, each user is refused what its part does not use, and a whole job runs
with the three users without one denial in the server's ACL LOG."""
from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from contract.messages import queue_name
from contract.redis_acl import LOCK_KEY, PARTS, PASSWORD_ENV, PRODUCER_LOCK_KEY, USERS, check_passwords, password_hash, render
from tests.helpers import TINY, RedisServer, WorkerProcess, env_for, free_port, producer, wait_for_job, wait_until, write_jsonl

PASSWORDS = {
    "submitter": "submitter-" + hashlib.sha256(b"s").hexdigest()[:24],
    "worker": "worker-" + hashlib.sha256(b"w").hexdigest()[:24],
    "monitor": "monitor-" + hashlib.sha256(b"m").hexdigest()[:24],
}
OBSERVER = ("observer", "observer-" + hashlib.sha256(b"o").hexdigest()[:24])
"""A user of the test's own, appended to the generated file, that reads the ACL LOG (no part holds @admin)."""
QUEUE = queue_name(TINY)


class AclRedis(RedisServer):
    """A redis-server loading the generated ACL file (plus the observer) from its directory."""

    def __init__(self, directory: Path, passwords: dict[str, str] = PASSWORDS) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        acl = directory / "users.acl"
        name, password = OBSERVER
        acl.write_text(render(passwords) + f"user {name} on {password_hash(password)} ~* &* +@all\n")
        super().__init__(directory, aof=False, username=name, password=password, extra=["--aclfile", str(acl)])
        self.passwords = passwords

    def url_for(self, user: str) -> str:
        return f"redis://{user}:{self.passwords[user]}@127.0.0.1:{self.port}/0"

    def as_user(self, user: str) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, username=user, password=self.passwords[user])

    def denials(self) -> list[dict[str, Any]]:
        with self.client() as client:
            return [e for e in client.acl_log(count=1000) if e.get("username") != OBSERVER[0]]

    def reset_log(self) -> None:
        with self.client() as client:
            client.acl_log_reset()


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclRedis]:
    server = AclRedis(tmp_path_factory.mktemp("acl-redis"))
    server.start()
    try:
        yield server
    finally:
        server.kill()


# --- the file -----------------------------------------------------------------------------------

def test_file_holds_hashes_not_passwords() -> None:
    text = render(PASSWORDS)
    lines = text.splitlines()
    assert lines[0].startswith("user default off ")
    assert [line.split()[1] for line in lines] == ["default", *USERS]
    for user, password in PASSWORDS.items():
        assert password not in text
        assert "#" + hashlib.sha256(password.encode()).hexdigest() in text
        line = next(line for line in lines if line.split()[1] == user)
        assert " on " in line and "nopass" not in line and "+@all" not in line and "allkeys" not in line
        assert "~*" not in line.split() and "&*" not in line.split() and "allchannels" not in line
        root, _, selectors = line.partition(" (")
        assert "~" not in root, "every key is granted in a selector, with the commands that may touch it"
        assert root.index("-@dangerous") > root.rindex(" +"), "the denials come after every grant"
        assert "-@admin" in root and "+@" not in selectors


def test_passwords_are_checked_without_echoing_them() -> None:
    with pytest.raises(ValueError, match="REDIS_WORKER_PASSWORD is not set"):
        check_passwords({"submitter": PASSWORDS["submitter"], "monitor": PASSWORDS["monitor"]})
    with pytest.raises(ValueError, match="REDIS_MONITOR_PASSWORD is shorter") as short:
        check_passwords(PASSWORDS | {"monitor": "tiny-secret"})
    assert "tiny-secret" not in str(short.value)
    with pytest.raises(ValueError, match="three different passwords") as same:
        check_passwords(PASSWORDS | {"worker": PASSWORDS["submitter"]})
    assert PASSWORDS["submitter"] not in str(same.value)
    with pytest.raises(ValueError, match="white space"):
        check_passwords(PASSWORDS | {"worker": "a" * 20 + " b"})
    with pytest.raises(ValueError, match="0-15"):
        render(PASSWORDS, db=16)
    assert "+select" in render(PASSWORDS, db=2) and "&/2.celeryev/*" in render(PASSWORDS, db=2)
    assert "+select" not in render(PASSWORDS)


def test_cli_writes_the_file_and_never_a_password(tmp_path: Path) -> None:
    env = dict(os.environ) | {PASSWORD_ENV[user]: PASSWORDS[user] for user in USERS}
    target = tmp_path / "users.acl"
    done = producer(["redis", "acl", "-o", str(target)], env, check=True)
    assert target.read_text() == render(PASSWORDS)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    printed = producer(["redis", "acl", "--no-monitor-control"], env, check=True)
    assert printed.stdout == render(PASSWORDS, monitor_control=False)
    watching_only = printed.stdout.splitlines()[3]
    assert watching_only.startswith("user monitor ") and "&/0.celery.pidbox" not in watching_only
    assert "reply.celery.pidbox*" not in watching_only and "+publish" not in watching_only
    helped = producer(["redis", "acl", "--help"], env, check=True)
    for output in (done.stdout + done.stderr, printed.stdout + printed.stderr, helped.stdout):
        assert not any(password in output for password in PASSWORDS.values())
    missing = producer(["redis", "acl"], {k: v for k, v in env.items() if k != "REDIS_MONITOR_PASSWORD"})
    assert missing.returncode == 1 and "REDIS_MONITOR_PASSWORD is not set" in missing.stderr
    assert "Traceback" not in missing.stderr and not any(p in missing.stderr for p in PASSWORDS.values())


# --- the server refuses what a part does not use ------------------------------------------------

def test_default_user_cannot_connect(acl_redis: AclRedis) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", acl_redis.port), timeout=5) as sock:
        sock.sendall(b"PING\r\n")
        assert sock.recv(200).startswith(b"-NOAUTH")
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=acl_redis.port).ping()
    with pytest.raises(redis.AuthenticationError, match="invalid username-password pair"):
        redis.Redis(host="127.0.0.1", port=acl_redis.port, password="anything-at-all").ping()
    with pytest.raises(redis.AuthenticationError, match="invalid username-password pair"):
        redis.Redis(host="127.0.0.1", port=acl_redis.port, username="worker", password=PASSWORDS["submitter"]).ping()
    for user in USERS:
        assert acl_redis.as_user(user).ping()


REFUSED = {
    "submitter": [
        ("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "GET", "*"), ("KEYS", "*"), ("SCAN", "0"), ("ACL", "LIST"),
        ("CLIENT", "LIST"), ("CLIENT", "KILL", "ID", "1"), ("SCRIPT", "FLUSH"), ("EVAL", "return 1", "0"),
        ("HGETALL", "unacked"), ("HSET", "unacked", "t", "x"), ("HDEL", "unacked", "t"), ("DEL", "unacked"),
        ("ZREM", "unacked_index", "t"), ("DEL", QUEUE), ("BRPOP", QUEUE, "1"), ("RPOP", QUEUE), ("LREM", QUEUE, "0", "x"),
        ("SET", "unacked_mutex", "x"), ("GET", "anything"), ("SET", "anything", "x"),
        ("PUBLISH", "/0.celery.pidbox", "x"), ("PUBLISH", "/0.celeryev/worker.heartbeat", "x"),
        ("SUBSCRIBE", "/0.celeryev/task.sent"), ("SET", LOCK_KEY, "x", "EX", "100000"), ("LPUSH", LOCK_KEY, "x"),
        ("SET", QUEUE, "x"), ("PEXPIRE", QUEUE, "1"), ("SADD", QUEUE, "x"), ("LPUSH", PRODUCER_LOCK_KEY, "x"),
    ],
    "worker": [
        ("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "GET", "*"), ("KEYS", "*"), ("ACL", "LIST"), ("CLIENT", "LIST"),
        ("SCRIPT", "FLUSH"), ("EVAL", "return 1", "0"), ("GET", "anything"), ("SET", "anything", "x"),
        ("HSET", "anything", "k", "v"), ("LPUSH", "not-a-queue", "x"), ("PUBLISH", "elsewhere", "x"),
        ("DEL", QUEUE), ("DEL", "unacked"), ("DEL", "unacked_index"), ("DEL", f"_kombu.binding.{QUEUE}"),
        ("SREM", f"_kombu.binding.{QUEUE}", "x"), ("DEL", "x.celery.pidbox", QUEUE),
        ("SET", QUEUE, "x"), ("PEXPIRE", QUEUE, "1"), ("PEXPIRE", "unacked", "1"), ("SET", "unacked", "x"),
        ("SET", PRODUCER_LOCK_KEY, "x"), ("PEXPIRE", "_kombu.binding.celery.pidbox", "1"),
    ],
    "monitor": [
        ("FLUSHALL",), ("CONFIG", "GET", "*"), ("KEYS", "*"), ("ACL", "LIST"), ("CLIENT", "LIST"),
        ("LPUSH", QUEUE, "x"), ("RPOP", QUEUE), ("BRPOP", QUEUE, "1"), ("LRANGE", QUEUE, "0", "-1"), ("DEL", QUEUE),
        ("HGETALL", "unacked"), ("HMGET", "unacked", "t"), ("DEL", "unacked"), ("SET", "bulkgen:reconcile:lock", "x"),
        ("SADD", f"_kombu.binding.{QUEUE}", "x"), ("PUBLISH", "/0.celeryev/task.succeeded", "x"),
        ("PUBLISH", "/0.celeryev/worker.heartbeat", "x"), ("LPUSH", "x.celery.pidbox", "x"),
    ],
}
DRY_REFUSED = [("SHUTDOWN",), ("DEBUG", "SLEEP", "0"), ("MODULE", "LOAD", "/tmp/x.so"), ("CONFIG", "SET", "dir", "/tmp"),
               ("SAVE",), ("BGREWRITEAOF",), ("REPLICAOF", "127.0.0.1", "1"), ("MIGRATE", "h", "1", "k", "0", "1"),
               ("SCRIPT", "KILL"), ("FUNCTION", "FLUSH"), ("MONITOR",), ("SWAPDB", "0", "1")]


@pytest.mark.parametrize("user", USERS)
def test_each_user_is_refused_outside_its_part(acl_redis: AclRedis, user: str) -> None:
    client = acl_redis.as_user(user)
    for command in REFUSED[user]:
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command(*command)
            pytest.fail(f"{user} may run {command}")
    with acl_redis.client() as observer:
        for command in DRY_REFUSED:  # never run: the server would act if one were allowed
            answer = observer.execute_command("ACL", "DRYRUN", user, *command)
            assert answer != b"OK" and b"no permissions" in answer, (user, command, answer)
    assert client.ping()


# --- destructive commands, per user, on every key pattern any user holds ------------------------

WRITES: dict[str, tuple[str, ...]] = {
    # replace or create: a string over a queue, a list over a lock, ...
    "SET": ("SET", "{k}", "x"), "SETEX": ("SETEX", "{k}", "1", "x"), "PSETEX": ("PSETEX", "{k}", "1", "x"),
    "GETSET": ("GETSET", "{k}", "x"), "SETNX": ("SETNX", "{k}", "x"), "MSET": ("MSET", "{k}", "x"),
    "APPEND": ("APPEND", "{k}", "x"), "SETRANGE": ("SETRANGE", "{k}", "0", "x"), "INCR": ("INCR", "{k}"),
    "LPUSH": ("LPUSH", "{k}", "x"), "RPUSH": ("RPUSH", "{k}", "x"), "SADD": ("SADD", "{k}", "x"),
    "HSET": ("HSET", "{k}", "f", "x"), "ZADD": ("ZADD", "{k}", "1", "x"),
    "RESTORE": ("RESTORE", "{k}", "0", "x", "REPLACE"), "COPY": ("COPY", "{k}", "{k}", "REPLACE"),
    "SORT": ("SORT", "{k}", "STORE", "{k}"), "SUNIONSTORE": ("SUNIONSTORE", "{k}", "{k}"),
    "ZUNIONSTORE": ("ZUNIONSTORE", "{k}", "1", "{k}"), "BITOP": ("BITOP", "AND", "{k}", "{k}"),
    # expire, delete, move away
    "EXPIRE": ("EXPIRE", "{k}", "1"), "PEXPIRE": ("PEXPIRE", "{k}", "1"), "EXPIREAT": ("EXPIREAT", "{k}", "1"),
    "PEXPIREAT": ("PEXPIREAT", "{k}", "1"), "PERSIST": ("PERSIST", "{k}"), "GETEX": ("GETEX", "{k}", "PX", "1"),
    "GETDEL": ("GETDEL", "{k}"), "DEL": ("DEL", "{k}"), "UNLINK": ("UNLINK", "{k}"),
    "RENAME": ("RENAME", "{k}", "{k}"), "RENAMENX": ("RENAMENX", "{k}", "{k}"), "MOVE": ("MOVE", "{k}", "1"),
    # take or remove members
    "LPOP": ("LPOP", "{k}"), "RPOP": ("RPOP", "{k}"), "BRPOP": ("BRPOP", "{k}", "1"), "BLPOP": ("BLPOP", "{k}", "1"),
    "LMOVE": ("LMOVE", "{k}", "{k}", "LEFT", "RIGHT"), "RPOPLPUSH": ("RPOPLPUSH", "{k}", "{k}"),
    "LTRIM": ("LTRIM", "{k}", "0", "0"), "LREM": ("LREM", "{k}", "0", "x"), "LSET": ("LSET", "{k}", "0", "x"),
    "HDEL": ("HDEL", "{k}", "f"), "SREM": ("SREM", "{k}", "x"), "SPOP": ("SPOP", "{k}"),
    "SMOVE": ("SMOVE", "{k}", "{k}", "x"), "ZREM": ("ZREM", "{k}", "x"), "ZPOPMIN": ("ZPOPMIN", "{k}"),
    "ZREMRANGEBYSCORE": ("ZREMRANGEBYSCORE", "{k}", "0", "1"),
}
"""Every command that can replace, expire, delete or empty a key (or create one of the wrong type), as the
server would be sent it for key {k}."""

SAMPLES: dict[str, tuple[str, ...]] = {
    "gen.*": (QUEUE, QUEUE + "\x06\x163"),
    "_kombu.binding.gen.*": (f"_kombu.binding.{QUEUE}",),
    "_kombu.binding_permanent.gen.*": (f"_kombu.binding_permanent.{QUEUE}",),
    "_kombu.binding.*": (f"_kombu.binding.{QUEUE}", "_kombu.binding.celeryev"),
    "_kombu.binding_permanent.*": (f"_kombu.binding_permanent.{QUEUE}", "_kombu.binding_permanent.celeryev"),
    "unacked": ("unacked",), "unacked_index": ("unacked_index",), "unacked_mutex": ("unacked_mutex",),
    LOCK_KEY: (LOCK_KEY,), PRODUCER_LOCK_KEY: (PRODUCER_LOCK_KEY,),
    "_kombu.binding_deadlines": ("_kombu.binding_deadlines",),
    "_kombu.binding.celeryev": ("_kombu.binding.celeryev",),
    "_kombu.binding.celery.pidbox": ("_kombu.binding.celery.pidbox",),
    "_kombu.binding.reply.celery.pidbox": ("_kombu.binding.reply.celery.pidbox",),
    "_kombu.binding_permanent.celeryev": ("_kombu.binding_permanent.celeryev",),
    "_kombu.binding_permanent.celery.pidbox": ("_kombu.binding_permanent.celery.pidbox",),
    "_kombu.binding_permanent.reply.celery.pidbox": ("_kombu.binding_permanent.reply.celery.pidbox",),
    "[^_]*.celery.pidbox*": ("bulkgen-gen.tiny-7@host.celery.pidbox", "c0ffee.reply.celery.pidbox"),
    "[^_]*.reply.celery.pidbox*": ("c0ffee.reply.celery.pidbox",),
    "celeryev.*": ("celeryev.c0ffee",),
}
"""Keys that each pattern a user holds matches: every one is tried with every command in WRITES."""

QUEUES_ = {QUEUE, QUEUE + "\x06\x163"}
EXPIRING_TABLES = {f"_kombu.{kind}.{exchange}" for kind in ("binding", "binding_permanent")
                   for exchange in ("celeryev", "celery.pidbox", "reply.celery.pidbox")}
OWN_QUEUES = {"bulkgen-gen.tiny-7@host.celery.pidbox", "c0ffee.reply.celery.pidbox", "celeryev.c0ffee"}


def writes_allowed() -> dict[str, dict[str, set[str]]]:
    """What each part's code sends that writes (kombu's Redis transport, redis-py's lock, the reconciler): per user,
    per key, the commands; everything else in WRITES is refused."""
    submitter = {**{q: {"LPUSH"} for q in QUEUES_},
                 f"_kombu.binding.{QUEUE}": {"SADD"}, f"_kombu.binding_permanent.{QUEUE}": {"SADD"},
                 PRODUCER_LOCK_KEY: {"SET"}}
    worker = {**{q: {"LPUSH", "RPUSH", "RPOP", "BRPOP"} for q in QUEUES_},
              "unacked": {"HSET", "HDEL"}, "unacked_index": {"ZADD", "ZREM"}, "unacked_mutex": {"SET", "DEL"},
              LOCK_KEY: {"SET"}, "_kombu.binding_deadlines": {"ZADD", "ZREM"},
              f"_kombu.binding.{QUEUE}": {"SADD"}, f"_kombu.binding_permanent.{QUEUE}": {"SADD"},
              **{table: {"SADD", "SREM", "DEL"} for table in EXPIRING_TABLES},
              **{queue: {"LPUSH", "RPUSH", "RPOP", "BRPOP", "PEXPIRE", "DEL"} for queue in OWN_QUEUES}}
    monitor = {"celeryev.c0ffee": {"PEXPIRE", "DEL"}, "_kombu.binding_deadlines": {"ZADD", "ZREM"},
               **{f"_kombu.binding.{exchange}": {"SADD", "SREM", "DEL"}
                  for exchange in ("celeryev", "celery.pidbox", "reply.celery.pidbox")},
               "_kombu.binding_permanent.celeryev": {"SADD", "SREM", "DEL"},
               "_kombu.binding_permanent.reply.celery.pidbox": {"SADD", "SREM"},
               "c0ffee.reply.celery.pidbox": {"LPUSH", "RPOP", "BRPOP", "PEXPIRE", "DEL"}}
    return {"submitter": submitter, "worker": worker, "monitor": monitor}


def test_every_pattern_a_user_holds_is_tried() -> None:
    for user in PARTS.values():
        for pattern in user.key_patterns():
            assert pattern.lstrip("%RW~") in SAMPLES, f"{user.name} holds {pattern}: add keys it matches to SAMPLES"


@pytest.mark.parametrize("user", USERS)
def test_destructive_commands_only_on_the_keys_each_part_needs(acl_redis: AclRedis, user: str) -> None:
    """ACL DRYRUN (the server's own check, selectors included, nothing run) of every command in WRITES on a key of
    every pattern any user holds: the allowed ones are exactly what the part's code sends."""
    keys = sorted({key for samples in SAMPLES.values() for key in samples})
    with acl_redis.client() as observer:
        pipe = observer.pipeline(transaction=False)
        for key in keys:
            for template in WRITES.values():
                pipe.execute_command("ACL", "DRYRUN", user, *(part.format(k=key) for part in template))
        answers = iter(pipe.execute(raise_on_error=False))
    allowed = {key: {name for name in WRITES if next(answers) == b"OK"} for key in keys}
    expected = writes_allowed()[user]
    wrong = {key: (sorted(allowed[key]), sorted(expected.get(key, set())))
             for key in keys if allowed[key] != expected.get(key, set())}
    assert wrong == {}, f"{user}: key -> (allowed, expected): {wrong}"


def test_the_issue_probes_leave_queues_and_locks_intact(acl_redis: AclRedis) -> None:
    """Run for real: a submitter replacing or expiring a queue or taking the fleet's lock for a day, a worker
    expiring the queue or `unacked` (issue 27); each is refused and the keys keep their contents and no TTL."""
    binding = f"_kombu.binding.{QUEUE}"
    with acl_redis.client() as observer:
        observer.delete(QUEUE, binding, "unacked", "unacked_index", LOCK_KEY)
        observer.lpush(QUEUE, "m1")
        observer.sadd(binding, f"{QUEUE}\x06\x16\x06\x16{QUEUE}")
        observer.hset("unacked", "tag", "payload")
        observer.zadd("unacked_index", {"tag": 1.0})
    probes = {
        "submitter": [("SET", QUEUE, "x"), ("SET", QUEUE, "x", "PX", "1"), ("SET", binding, "x"),
                      ("SET", LOCK_KEY, "x", "EX", "100000"), ("LPUSH", LOCK_KEY, "x"), ("PEXPIRE", QUEUE, "1"),
                      ("EXPIRE", binding, "1"), ("UNLINK", QUEUE), ("RENAME", QUEUE, f"{QUEUE}.x")],
        "worker": [("PEXPIRE", QUEUE, "1"), ("PEXPIRE", "unacked", "1"), ("SET", QUEUE, "x"), ("SET", "unacked", "x"),
                   ("EXPIRE", "unacked_index", "1"), ("DEL", binding), ("UNLINK", "unacked"), ("GETDEL", QUEUE)],
        "monitor": [("PEXPIRE", QUEUE, "1"), ("SET", QUEUE, "x"), ("DEL", binding), ("SET", LOCK_KEY, "x")],
    }
    try:
        for user, commands in probes.items():
            client = acl_redis.as_user(user)
            for command in commands:
                with pytest.raises(redis.exceptions.NoPermissionError):
                    client.execute_command(*command)
                    pytest.fail(f"{user} may run {command}")
        with acl_redis.client() as observer:
            assert observer.lrange(QUEUE, 0, -1) == [b"m1"] and observer.smembers(binding)
            assert observer.hgetall("unacked") == {b"tag": b"payload"} and observer.zcard("unacked_index") == 1
            assert [observer.pttl(key) for key in (QUEUE, binding, "unacked", "unacked_index")] == [-1] * 4
            assert observer.exists(LOCK_KEY) == 0, "nobody but a worker takes the fleet's reconcile lock"
    finally:
        with acl_redis.client() as observer:
            observer.delete(QUEUE, binding, "unacked", "unacked_index", LOCK_KEY)


def test_each_user_may_do_its_part(acl_redis: AclRedis) -> None:
    """The grants the refusals above leave: what each part's code sends (the end-to-end test runs them all)."""
    acl_redis.reset_log()
    submitter, worker, monitor = (acl_redis.as_user(user) for user in USERS)
    submitter.lpush(QUEUE, "m1")
    assert submitter.llen(QUEUE) == 1 and submitter.lrange(QUEUE, 0, -1) == [b"m1"]
    assert monitor.llen(QUEUE) == 1 and monitor.llen(QUEUE + "\x06\x163") == 0
    assert worker.brpop([QUEUE], timeout=1) == (QUEUE.encode(), b"m1")
    worker.zadd("unacked_index", {"tag": time.time()})
    worker.hset("unacked", "tag", "payload")
    assert submitter.zrangebyscore("unacked_index", 0, "+inf") == [b"tag"]
    assert submitter.hmget("unacked", ["tag"]) == [b"payload"]
    worker.zrem("unacked_index", "tag")
    worker.hdel("unacked", "tag")
    assert submitter.set(PRODUCER_LOCK_KEY, "t", nx=True, px=100)
    assert worker.set(LOCK_KEY, "t", nx=True, px=100)
    assert worker.set("unacked_mutex", "t", nx=True, px=100)
    assert submitter.publish("/0.celeryev/task.sent", "{}") == 0
    assert monitor.publish("/0.celery.pidbox", "{}") == 0
    assert acl_redis.denials() == []


def test_monitor_without_control_only_watches(acl_redis: AclRedis) -> None:
    """`--no-monitor-control`: the monitor's rules without the pidbox (loaded as a user of its own here)."""
    line = render(PASSWORDS, monitor_control=False).splitlines()[3].split()
    with acl_redis.client() as observer:
        observer.execute_command("ACL", "SETUSER", "watcher", *line[2:])
        try:
            def allowed(*command: str) -> bool:
                return observer.execute_command("ACL", "DRYRUN", "watcher", *command) == b"OK"

            assert allowed("LLEN", QUEUE) and allowed("PSUBSCRIBE", "/0.celeryev/*")
            assert not allowed("PUBLISH", "/0.celery.pidbox", "x") and not allowed("PUBLISH", "/0.celeryev/x", "x")
            assert not allowed("LPUSH", "u.reply.celery.pidbox", "x") and not allowed("BRPOP", "u.reply.celery.pidbox", "1")
        finally:
            observer.execute_command("ACL", "DELUSER", "watcher")


@pytest.mark.parametrize("user", ["worker", "monitor"])
def test_binding_sweep_runs_as_consumers_of_expiring_queues(acl_redis: AclRedis, user: str) -> None:
    """Whoever consumes an expiring queue (a worker's pidbox and gossip, Flower's events) runs kombu's sweep of
    binding tables nobody refreshed for an hour, whichever part declared them; a denial there would kill the
    consumer."""
    from kombu import Connection

    acl_redis.reset_log()
    exchanges = ("celeryev", "celery.pidbox", "reply.celery.pidbox")
    with acl_redis.client() as observer:
        for exchange in exchanges:
            observer.sadd(f"_kombu.binding.{exchange}", "stale")
        observer.zadd("_kombu.binding_deadlines", {exchange: 0 for exchange in exchanges})
    with Connection(acl_redis.url_for(user)) as connection:
        assert connection.default_channel.sweep_bindings() == len(exchanges)
    with acl_redis.client() as observer:
        assert not any(observer.exists(f"_kombu.binding.{exchange}") for exchange in exchanges)
    assert acl_redis.denials() == []


def test_reconciler_reads_redis_as_the_submitter(acl_redis: AclRedis, sqlite_url: str) -> None:
    """What `producer reconcile` / retry / submit --resume read through kombu, and its --loop lock."""
    from contract.broker import Sender, connect
    from reconciler.sweep import broker, carried_ids, take_lock
    from contract.settings import Settings

    acl_redis.reset_log()
    with acl_redis.client() as observer:  # the lock free, whatever ran before on this server
        held = (observer.get(PRODUCER_LOCK_KEY), observer.pttl(PRODUCER_LOCK_KEY))
        observer.delete(PRODUCER_LOCK_KEY)
    settings = Settings(broker_url=acl_redis.url_for("submitter"), database_url=sqlite_url)
    app = connect(settings)
    with app.connection_for_write() as connection, Sender(app) as send:
        send(QUEUE, 7, [1, 2, 3])
        connection.ensure_connection()
    taken = {"body": "", "headers": {"task": "bulkgen.generate"}, "properties": {"body_encoding": "base64"}}
    import base64

    taken["body"] = base64.b64encode(json.dumps([[7, [4, 5]], {}, {}]).encode()).decode()
    with acl_redis.client() as observer:  # as a worker would have left it
        observer.zadd("unacked_index", {"tag-1": time.time()})
        observer.hset("unacked", "tag-1", json.dumps([taken, "", QUEUE]))
    with broker(app) as link:
        carried = carried_ids(link, [QUEUE], taken_within_s=60)
    assert all((7, i) in carried for i in (1, 2, 3, 4, 5))
    try:
        assert take_lock(app, "token", 1.0, PRODUCER_LOCK_KEY) is True, f"the lock was held before the test by {held}"
        assert acl_redis.denials() == []
    finally:
        with acl_redis.client() as observer:
            observer.delete(QUEUE, "unacked", "unacked_index", PRODUCER_LOCK_KEY)


def test_worker_restores_unacked_messages(acl_redis: AclRedis) -> None:
    """kombu's restores as the worker: a channel closed holding a message (a worker stopping), and the sweep
    that brings back a message unacknowledged past the visibility timeout (under the unacked_mutex lock)."""
    from kombu import Connection, Exchange, Queue

    acl_redis.reset_log()
    with acl_redis.client() as observer:  # no message left by an earlier test on this server
        observer.delete(QUEUE, "unacked", "unacked_index")
    queue = Queue(QUEUE, Exchange(QUEUE), routing_key=QUEUE)
    with Connection(acl_redis.url_for("submitter")) as submitter:  # as Celery sends: the default exchange
        submitter.Producer().publish({"n": 1}, exchange="", routing_key=QUEUE, declare=[queue], serializer="json")
    options = {"visibility_timeout": 1}
    with Connection(acl_redis.url_for("worker"), transport_options=options) as worker:
        channel = worker.channel()
        message = queue(channel).get(no_ack=False)
        assert message is not None and message.payload == {"n": 1}
        channel.close()  # unacknowledged: restored
    with acl_redis.client() as observer:
        assert observer.llen(QUEUE) == 1 and observer.hlen("unacked") == 0
    with Connection(acl_redis.url_for("worker"), transport_options=options) as worker:
        channel = worker.channel()
        message = queue(channel).get(no_ack=False)
        assert message is not None
        with acl_redis.client() as observer:
            # the sweep kombu runs now and then, until the message has passed the visibility timeout and is back
            wait_until(lambda: channel.qos.restore_visible(num=10, interval=1) or observer.llen(QUEUE) == 1, 30,
                       "the sweep to restore the message unacknowledged past the visibility timeout")
            assert observer.llen(QUEUE) == 1 and observer.hlen("unacked") == 0
        again = queue(channel).get(no_ack=False)
        assert again is not None and again.payload == {"n": 1}
        again.ack()
        channel.close()
    with acl_redis.client() as observer:
        assert observer.llen(QUEUE) == 0 and observer.hlen("unacked") == 0
    assert acl_redis.denials() == []


# --- a whole job, each part as its own user -----------------------------------------------------

class FlowerLike(threading.Thread):
    """What Flower does with the monitor's URL: capture every event, waking the workers up first."""

    def __init__(self, app: Any) -> None:
        super().__init__(daemon=True)
        self.app = app
        self.events: list[dict[str, Any]] = []
        self.receiver: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.app.connection_for_read() as connection:
                self.receiver = self.app.events.Receiver(connection, handlers={"*": self.events.append})
                self.receiver.capture(limit=None, timeout=None, wakeup=True)
        except BaseException as exc:  # noqa: BLE001 (reported by the test)
            self.error = exc

    def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True
        self.join(15)


def stale_requests(database_url: str, job_id: int, grace_s: float) -> int:
    """How many of the job's queued requests the reconciler would now find last enqueued more than grace_s ago."""
    from datetime import timedelta

    from models.db import make_engine, session_factory, utcnow
    from models.store import iter_stale_queued, open_jobs

    db = make_engine(database_url)
    try:
        with session_factory(db)() as session:
            job = next(job for job in open_jobs(session) if job.id == job_id)
        return sum(len(ids) for ids in iter_stale_queued(db, job, utcnow() - timedelta(seconds=grace_s)))
    finally:
        db.dispose()


def reconciler_sweeps(port: int) -> float:
    """The sweeps a reconciler has run (done or skipped), from its metrics endpoint; 0 before it serves."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return 0
    return sum(sample.value for family in text_string_to_metric_families(body) for sample in family.samples
               if sample.name == "bulkgen_reconciler_sweeps_total")


@pytest.mark.slow
def test_job_end_to_end_with_acl_users(tmp_path: Path, sqlite_url: str) -> None:
    from contract.broker import make_app

    server = AclRedis(tmp_path / "redis")
    server.start()
    worker = None
    try:
        env = env_for(
            sqlite_url,
            "redis://nobody@127.0.0.1:1/0",  # the shared URL leads nowhere: each part must use its own
            BULKGEN_SUBMITTER_BROKER_URL=server.url_for("submitter"),
            BULKGEN_WORKER_BROKER_URL=server.url_for("worker"),
            BULKGEN_RECONCILE_INTERVAL_S="2",
            BULKGEN_RECONCILE_GRACE_S="1",
            BULKGEN_METRICS_PORT="0",
            BULKGEN_RECONCILER_METRICS_PORT=str(reconciler_port := free_port()),  # its sweeps, counted
        )
        monitor_app = make_app(server.url_for("monitor"))
        watcher = FlowerLike(monitor_app)
        watcher.start()

        rows = [{"custom_id": f"r{i}", "prompt": f"Request {i}:", "seed": i} for i in range(8)]
        prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
        submitted = producer(["submit", str(prompts), "--model", TINY, "--max-new-tokens", "6"], env, check=True)
        job_id = int(submitted.stdout.strip().splitlines()[-1])
        # Redis loses the job's message twice: the producer's reconcile sends it again as the submitter,
        # then the workers' own reconciler as the worker
        with server.client() as observer:
            assert observer.delete(QUEUE) == 1
        wait_until(lambda: stale_requests(sqlite_url, job_id, grace_s=1) == len(rows), 30,
                   "the job's requests to be last enqueued more than reconcile_grace_s ago")
        swept = producer(["reconcile"], env, check=True)
        assert f"{len(rows)} requests re-enqueued" in swept.stdout, swept.stdout
        with server.client() as observer:
            assert observer.delete(QUEUE) == 1
        worker = WorkerProcess(env, log_path=tmp_path / "worker.log")
        assert wait_for_job(sqlite_url, job_id, timeout=240) == "completed"

        outputs = [submitted.stdout + submitted.stderr, swept.stdout + swept.stderr]
        for args in (["status", str(job_id)], ["reconcile"], ["retry", str(job_id)], ["stats"]):
            done = producer(args, env, check=True)
            outputs.append(done.stdout + done.stderr)
        # Flower's worker pages: inspect through the pidbox, replies on the monitor's reply queue
        replies = monitor_app.control.inspect(timeout=5).ping()
        assert replies and all(reply == {"ok": "pong"} for reply in replies.values())
        with monitor_app.connection_for_read() as connection:
            assert connection.default_channel.client.llen(QUEUE) == 0
        # the worker's own reconciler sweeps (and kombu's restore checks run) twice more meanwhile
        swept_so_far = reconciler_sweeps(reconciler_port)
        wait_until(lambda: reconciler_sweeps(reconciler_port) >= swept_so_far + 2, 60, "two more sweeps of the worker's reconciler")
        watcher.stop()
        worker.stop()
        log = worker.output()

        from sqlalchemy import create_engine, text

        engine = create_engine(sqlite_url)
        with engine.connect() as connection:
            results = connection.execute(text("SELECT count(*) FROM results WHERE job_id = :j"), {"j": job_id}).scalar_one()
        engine.dispose()
        assert results == len(rows)
        assert watcher.error is None, repr(watcher.error)
        kinds = {event.get("type") for event in watcher.events}
        assert {"task-sent", "task-received", "task-succeeded", "worker-heartbeat"} <= kinds, kinds
        assert "NOPERM" not in log and "NoPermissionError" not in log, log[-3000:]
        assert f"{len(rows)} requests re-enqueued" in log, "the workers' reconciler sent the lost message again"
        assert server.denials() == [], json.dumps(server.denials(), default=str)[:3000]
        for output in [*outputs, log]:
            assert not any(password in output for password in PASSWORDS.values())
    finally:
        if worker is not None:
            worker.stop()
        server.kill()
