"""The Redis ACL users of a deployment, each allowed only the keys, channels and commands its part uses
(docs/security.md), and the ACL file that declares them (`producer redis acl`, redis-server --aclfile).

What each part touches was found by running real jobs through a redis-server with these users and
reading its ACL LOG until no denial remained (tests/test_redis_acl.py keeps it so). Celery with kombu's
Redis transport, acks late, events on:

- a queue is a list per model, `gen.<model>`, plus one list per priority step (`gen.<model>\\x06\\x163`, ...);
  declaring it adds a member to the sets `_kombu.binding.gen.<model>` and `_kombu.binding_permanent.gen.<model>`;
- a message a worker took and has not acknowledged sits in the hash `unacked` (its tag scored by time in the
  sorted set `unacked_index`); a worker restores the overdue ones under the lock `unacked_mutex` (redis-py's
  lock: SET NX PX, then a Lua script releases it);
- events are published on `/<db>.celeryev/<type>` channels; Flower and the workers' gossip subscribe to patterns
  of them (a receiver declares an expiring queue `celeryev.<uuid>` bound through Lua scripts that refresh and
  sweep `_kombu.binding_deadlines`);
- worker control (mingle at start, `celery inspect`, Flower's wakeup) is published on `/<db>.celery.pidbox`;
  replies come back on lists `<uuid>.reply.celery.pidbox`, each worker has a list `<name>.celery.pidbox`;
- the reconciler (`producer reconcile`, `retry`, `submit --resume`, and the workers' own sweeps) reads the
  queues (LRANGE), the unacked index and hash (ZRANGEBYSCORE, HMGET), and takes `bulkgen:reconcile:lock`.

Redis checks the keys a Lua script touches against the caller's own ACL, so allowing EVALSHA widens nothing.
Every user is also denied @dangerous and @admin outright (FLUSHALL, FLUSHDB, CONFIG, DEBUG, MODULE, KEYS,
SCRIPT FLUSH, ACL, SHUTDOWN, ...), whatever else its line says. Passwords are written as SHA-256 hashes
(`#<hex>`): the file holds no secret that logs in, but a short password could be guessed from its hash,
so each must be long and random. Torch-free and Celery-free.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

USERS = ("submitter", "worker", "monitor")
PASSWORD_ENV = {user: f"REDIS_{user.upper()}_PASSWORD" for user in USERS}
"""The environment variable each user's password is read from."""
MIN_PASSWORD = 16

LOCK_KEY = "bulkgen:reconcile:lock"
"""The reconciler's fleet lock (reconciler.sweep.take_lock): one owner, here, so that the roles below name it."""

CONNECTION = ("+ping", "+hello", "+auth", "+client", "+quit", "+reset")
"""What redis-py sends on every connection (HELLO 3 AUTH ..., CLIENT SETINFO lib-name/lib-ver, PING). All of
CLIENT because SETINFO is unknown to Redis 7.0 (a rule naming it would not load); DENIED then takes back
what touches other connections (CLIENT KILL, LIST, PAUSE, UNBLOCK, NO-EVICT are @dangerous or @admin)."""
TRANSACTIONS = ("+multi", "+exec", "+discard")
SCRIPTS = ("+evalsha", "+script|load", "+script|exists", "+time")
"""kombu's binding scripts and redis-py's lock (registered scripts: SCRIPT EXISTS/LOAD, then EVALSHA; the
binding scripts call TIME)."""
DENIED = ("-@dangerous", "-@admin")

QUEUES = "gen.*"
"""Every model's queue and its priority lists (contract.messages.queue_name)."""


@dataclass(frozen=True)
class AclUser:
    name: str
    part: str
    commands: tuple[str, ...]
    keys: tuple[str, ...]
    """~pattern: read and write; %R~pattern: read only; %W~pattern: write only."""
    channels: tuple[str, ...]
    """&pattern; {db} is the database number in the brokers' URLs. A PSUBSCRIBE pattern must equal one of
    these literally (Redis matches subscribed patterns as strings, published channels as globs)."""
    selectors: tuple[tuple[str, ...], ...] = ()
    """Redis 7 selectors, `(rule ...)`: a command runs if the root rules or one selector allow it whole; here,
    publishing on one channel without publishing on those the root may only subscribe to."""

    def rules(self, db: int = 0) -> list[str]:
        commands = list(CONNECTION + self.commands)
        if db:
            commands.append("+select")  # redis-py selects the URL's database on every connection
        selectors = ["(" + " ".join(rule.format(db=db) for rule in selector) + ")" for selector in self.selectors]
        return ["resetkeys", "resetchannels", "-@all", *commands, *DENIED, *self.keys,
                *(channel.format(db=db) for channel in self.channels), *selectors]


EXPIRING_BINDINGS = ("~_kombu.binding.celeryev", "~_kombu.binding.celery.pidbox", "~_kombu.binding.reply.celery.pidbox")
"""The binding tables of the exchanges whose queues expire (events, control, replies): a receiver consuming an
expiring queue sweeps the tables nobody refreshed for an hour (DEL, in kombu's script), whoever declared them."""

SUBMITTER = AclUser(
    "submitter",
    "producer (submit, cancel, retry, reconcile, status, results, stats)",
    commands=TRANSACTIONS + (
        "+lpush", "+llen", "+lrange",  # send, queue depth, the reconciler reading what is queued
        "+sadd",  # declaring a queue: its binding sets
        "+zrangebyscore", "+hmget",  # the reconciler reading what workers took (read-only keys)
        "+set",  # the reconcile --loop lock (SET NX PX)
        "+publish",  # the task-sent event
    ),
    keys=(f"~{QUEUES}", "~_kombu.binding.gen.*", "~_kombu.binding_permanent.gen.*",
          "%R~unacked", "%R~unacked_index", f"~{LOCK_KEY}"),
    channels=("&/{db}.celeryev/task.sent",),
)

WORKER = AclUser(
    "worker",
    "workers (`workers start`: Celery worker processes, their reconciler)",
    commands=TRANSACTIONS + SCRIPTS + (
        "+brpop", "+rpop", "+lpush", "+rpush", "+llen", "+lrange", "+exists", "+pexpire",
        "+sadd", "+smembers",
        "+hset", "+hget", "+hdel", "+hmget", "+watch", "+unwatch",
        "+zadd", "+zrem", "+zrange", "+zrangebyscore", "+zrevrangebyscore",
        "+set", "+get",
        "+publish", "+psubscribe", "+punsubscribe", "+subscribe", "+unsubscribe",
    ),
    keys=(f"~{QUEUES}", "~_kombu.binding.*", "~_kombu.binding_permanent.*", "~_kombu.binding_deadlines",
          "~unacked", "~unacked_index", "~unacked_mutex", "~*.celery.pidbox*", "~celeryev.*", f"~{LOCK_KEY}"),
    channels=("&/{db}.celeryev/*", "&/{db}.celeryev/worker.*", "&/{db}.celery.pidbox"),
    # deleting: its own pidbox and gossip queues when it stops, the restore lock (redis-py's release script),
    # overdue binding tables of expiring queues (kombu's sweep); never a model's queue, unacked or its index
    selectors=(("+del", "+srem", "~*.celery.pidbox*", "~celeryev.*", "~unacked_mutex",
                *EXPIRING_BINDINGS, *(key.replace("binding.", "binding_permanent.") for key in EXPIRING_BINDINGS)),),
)

MONITOR_CONTROL_KEYS = ("~*.reply.celery.pidbox*", "~_kombu.binding_permanent.reply.celery.pidbox")
"""Its reply queues for inspect (a list per request, declared, read, deleted)."""

MONITOR = AclUser(
    "monitor",
    "monitoring (Flower, queue-depth metrics)",
    commands=TRANSACTIONS + SCRIPTS + (
        "+llen", "+exists", "+del", "+pexpire", "+sadd", "+srem", "+smembers",
        "+zadd", "+zrem", "+zrangebyscore",
        "+psubscribe", "+punsubscribe", "+subscribe", "+unsubscribe",
        "+brpop", "+rpop", "+lpush",  # control: inspect replies (on its reply queues only)
    ),
    keys=("%R~" + QUEUES,  # queue depth (LLEN) only: never a message
          "~celeryev.*",  # its own event queue (declared, then deleted)
          *EXPIRING_BINDINGS, "~_kombu.binding_permanent.celeryev", "~_kombu.binding_deadlines",
          "%R~_kombu.binding_permanent.*",
          *MONITOR_CONTROL_KEYS),
    channels=("&/{db}.celeryev/*",),
    # control: Flower's wakeup and inspect publish on the pidbox; never an event
    selectors=(("+publish", "&/{db}.celery.pidbox"),),
)

PARTS: dict[str, AclUser] = {user.name: user for user in (SUBMITTER, WORKER, MONITOR)}


def without_control(user: AclUser) -> AclUser:
    """The monitor without the pidbox: it can watch events and queue depths but cannot reach the workers'
    control (no shutdown, revoke, pool restart; Flower's wakeup and inspect then fail)."""
    return AclUser(
        user.name, user.part,
        commands=tuple(c for c in user.commands if c not in ("+brpop", "+rpop", "+lpush")),
        keys=tuple(k for k in user.keys if k not in MONITOR_CONTROL_KEYS),
        channels=user.channels,
    )


def password_hash(password: str) -> str:
    """The `#<sha256 hex>` form an ACL rule takes instead of the plain password."""
    return "#" + hashlib.sha256(password.encode()).hexdigest()


def check_passwords(passwords: Mapping[str, str | None]) -> dict[str, str]:
    """Every user's password, long enough and each its own; ValueError names the variable, never the value."""
    found: dict[str, str] = {}
    for user in USERS:
        password = passwords.get(user)
        if not password:
            raise ValueError(f"{PASSWORD_ENV[user]} is not set")
        if len(password) < MIN_PASSWORD:
            raise ValueError(f"{PASSWORD_ENV[user]} is shorter than {MIN_PASSWORD} characters (use e.g. `openssl rand -hex 32`)")
        if re.search(r"\s", password):
            raise ValueError(f"{PASSWORD_ENV[user]} contains white space")
        found[user] = password
    if len(set(found.values())) != len(found):
        raise ValueError("the submitter, worker and monitor need three different passwords")
    return found


def passwords_from_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    environ = os.environ if environ is None else environ
    return check_passwords({user: environ.get(PASSWORD_ENV[user]) for user in USERS})


def render(passwords: Mapping[str, str], db: int = 0, monitor_control: bool = True) -> str:
    """The ACL file: the default user off, then one line per part (passwords hashed)."""
    checked = check_passwords(passwords)
    if db < 0 or db > 15:
        raise ValueError(f"the database number must be 0-15, got {db}")
    lines = ["user default off resetpass resetkeys resetchannels -@all"]
    for name, user in PARTS.items():
        if name == "monitor" and not monitor_control:
            user = without_control(user)
        lines.append(" ".join(["user", name, "reset", "on", password_hash(checked[name]), *user.rules(db)]))
    return "\n".join(lines) + "\n"


def write_acl_file(path: Path, passwords: Mapping[str, str], db: int = 0, monitor_control: bool = True) -> Path:
    """Write the file at once (a temporary file renamed over it), mode 0644: it holds hashes only, and
    redis-server reads it as its own user."""
    text = render(passwords, db, monitor_control)
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path
