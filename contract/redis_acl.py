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
  queues (LRANGE), the unacked index and hash (ZRANGEBYSCORE, HMGET); the workers' sweeps take
  `bulkgen:reconcile:lock`, `producer reconcile --loop` its own `bulkgen:reconcile:producer-lock`.

Each command that names a key is granted only on the keys it is for (a Redis 7 selector per grant; the root
holds no key): SET only on a lock, DEL and PEXPIRE only on the queues and tables that expire by design, so no
user can replace, expire or delete a model's queue or `unacked` unless consuming them is its part. Redis
checks the keys a Lua script touches against the caller's own ACL, so allowing EVALSHA widens nothing.
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
from dataclasses import dataclass, replace
from pathlib import Path

USERS = ("submitter", "worker", "monitor")
PASSWORD_ENV = {user: f"REDIS_{user.upper()}_PASSWORD" for user in USERS}
"""The environment variable each user's password is read from."""
MIN_PASSWORD = 16

LOCK_KEY = "bulkgen:reconcile:lock"
"""The workers' fleet lock (reconciler.sweep.take_lock): per interval, the worker that sets it sweeps. Only the
worker user may set it: a key the submitter could set (SET ... EX 100000) would stop every reconciler for a day."""
PRODUCER_LOCK_KEY = "bulkgen:reconcile:producer-lock"
"""`producer reconcile --loop`'s own lock (one loop sweeps per interval), the submitter's: at worst it stops the
producer's loops, never the workers' reconciler. --loop is for fleets whose workers do not sweep; where both
run, each sweeps once per interval (a duplicate message is harmless: a claim skips what is done or leased)."""

CONNECTION = ("+ping", "+hello", "+auth", "+client", "+quit", "+reset")
"""What redis-py sends on every connection (HELLO 3 AUTH ..., CLIENT SETINFO lib-name/lib-ver, PING). All of
CLIENT because SETINFO is unknown to Redis 7.0 (a rule naming it would not load); DENIED then takes back
what touches other connections (CLIENT KILL, LIST, PAUSE, UNBLOCK, NO-EVICT are @dangerous or @admin)."""
TRANSACTIONS = ("+multi", "+exec", "+discard", "+unwatch")
SCRIPTS = ("+script|load", "+script|exists", "+time")
"""kombu's binding scripts and redis-py's lock are registered scripts (SCRIPT EXISTS/LOAD, then EVALSHA, granted
with the keys each script is given; the binding scripts call TIME)."""
SUBSCRIBE = ("+psubscribe", "+punsubscribe", "+subscribe", "+unsubscribe")
DENIED = ("-@dangerous", "-@admin")

QUEUES = "gen.*"
"""Every model's queue and its priority lists (contract.messages.queue_name)."""


@dataclass(frozen=True)
class Grant:
    """One Redis 7 selector, `(commands keys)`: these commands on these keys or channels, and nothing else.

    Every command that names a key is granted this way, so a command may touch only the keys it is for: SET
    only a lock, PEXPIRE and DEL only the queues that expire by design, never a model's queue or `unacked`.
    One selector must allow a command whole (all of its keys), so a script's keys share its grant."""

    why: str
    commands: tuple[str, ...]
    keys: tuple[str, ...] = ()
    """~pattern: read and write; %R~pattern: read only."""
    channels: tuple[str, ...] = ()

    def rule(self, db: int) -> str:
        return "(" + " ".join([*self.commands, *self.keys, *(c.format(db=db) for c in self.channels)]) + ")"


@dataclass(frozen=True)
class AclUser:
    name: str
    part: str
    commands: tuple[str, ...]
    """Commands without keys (connection, transactions, pub/sub), granted at the root."""
    channels: tuple[str, ...]
    """&pattern; {db} is the database number in the brokers' URLs. A PSUBSCRIBE pattern must equal one of
    these literally (Redis matches subscribed patterns as strings, published channels as globs)."""
    grants: tuple[Grant, ...]
    """Everything that names a key, each command confined to its keys (the root holds no key)."""

    def rules(self, db: int = 0) -> list[str]:
        commands = list(CONNECTION + self.commands)
        if db:
            commands.append("+select")  # redis-py selects the URL's database on every connection
        return ["resetkeys", "resetchannels", "-@all", *commands, *DENIED,
                *(channel.format(db=db) for channel in self.channels), *(grant.rule(db) for grant in self.grants)]

    def key_patterns(self) -> list[str]:
        """Every key pattern the user holds, in order, each once."""
        return list(dict.fromkeys(key for grant in self.grants for key in grant.keys))


EXPIRING_BINDINGS = ("~_kombu.binding.celeryev", "~_kombu.binding.celery.pidbox", "~_kombu.binding.reply.celery.pidbox")
"""The binding tables of the exchanges whose queues expire (events, control, replies): a receiver consuming an
expiring queue sweeps the tables nobody refreshed for an hour (DEL, in kombu's script), whoever declared them."""
DEADLINES = "~_kombu.binding_deadlines"
BINDING_SCRIPTS = (
    Grant("kombu's binding scripts: refresh (SADD a table, ZADD its deadline) and sweep; Redis checks each "
          "command inside against these grants too", ("+evalsha",), (*EXPIRING_BINDINGS, DEADLINES)),
    Grant("the deadlines of expiring binding tables", ("+zadd", "+zrangebyscore", "+zrem"), (DEADLINES,)),
    Grant("the sweep keeps a table whose permanent set has members", ("+exists",), ("%R~_kombu.binding_permanent.*",)),
)

SUBMITTER = AclUser(
    "submitter",
    "producer (submit, cancel, retry, reconcile, status, results, stats)",
    commands=TRANSACTIONS + ("+publish",),  # the task-sent event
    channels=("&/{db}.celeryev/task.sent",),
    grants=(
        Grant("send, queue depth, the reconciler reading what is queued", ("+lpush", "+llen", "+lrange"), (f"~{QUEUES}",)),
        Grant("declaring a queue: its binding sets", ("+sadd",), ("~_kombu.binding.gen.*", "~_kombu.binding_permanent.gen.*")),
        Grant("the reconciler reading what workers took", ("+hmget",), ("%R~unacked",)),
        Grant("the reconciler reading when they took it", ("+zrangebyscore",), ("%R~unacked_index",)),
        Grant("`reconcile --loop`'s lock (SET NX PX)", ("+set",), (f"~{PRODUCER_LOCK_KEY}",)),
    ),
)

PIDBOX_QUEUES = "~[^_]*.celery.pidbox*"
"""A worker's control queue `<name>.celery.pidbox` and inspect's reply queues `<id>.reply.celery.pidbox`; `[^_]`
keeps the binding tables `_kombu.binding.celery.pidbox`, ... out (no one may expire or replace those)."""
OWN_QUEUES = (PIDBOX_QUEUES, "~celeryev.*")
"""A worker's control queue and its gossip queue (fanout, expiring), and the reply queues it answers inspect on."""

WORKER = AclUser(
    "worker",
    "workers (`workers start`: Celery worker processes, their reconciler)",
    commands=TRANSACTIONS + SCRIPTS + ("+publish",) + SUBSCRIBE,
    channels=("&/{db}.celeryev/*", "&/{db}.celeryev/worker.*", "&/{db}.celery.pidbox"),
    grants=(
        Grant("consume (BRPOP, RPOP), restore (LPUSH, RPUSH), the reconciler's reads and re-sends; never DEL, SET "
              "or PEXPIRE", ("+brpop", "+rpop", "+lpush", "+rpush", "+llen", "+lrange", "+exists"), (f"~{QUEUES}",)),
        Grant("acks late: what was taken and not acknowledged (WATCH for kombu's restore)",
              ("+hset", "+hget", "+hdel", "+hmget", "+watch"), ("~unacked",)),
        Grant("acks late: when it was taken", ("+zadd", "+zrem", "+zrange", "+zrangebyscore", "+zrevrangebyscore"),
              ("~unacked_index",)),
        Grant("the restore lock (redis-py's lock: SET NX PX, a script GETs and DELs it)",
              ("+set", "+get", "+del", "+evalsha"), ("~unacked_mutex",)),
        Grant("the fleet's reconcile lock (SET NX PX)", ("+set",), (f"~{LOCK_KEY}",)),
        Grant("declaring and looking up queues", ("+sadd", "+smembers", "+exists"),
              ("~_kombu.binding.*", "~_kombu.binding_permanent.*")),
        *BINDING_SCRIPTS,
        Grant("its own control and gossip queues, and inspect replies: they expire, and go when it stops",
              ("+lpush", "+rpush", "+brpop", "+rpop", "+llen", "+exists", "+pexpire", "+del"), OWN_QUEUES),
        Grant("the binding tables of expiring queues: unbound when one is deleted, swept when overdue",
              ("+del", "+srem"), (*EXPIRING_BINDINGS, *(key.replace("binding.", "binding_permanent.") for key in EXPIRING_BINDINGS))),
    ),
)

MONITOR_CONTROL = (
    Grant("inspect: its reply queues (declared, read, deleted; they expire)",
          ("+brpop", "+rpop", "+lpush", "+llen", "+exists", "+pexpire", "+del"), ("~[^_]*.reply.celery.pidbox*",)),
    Grant("inspect: unbinding its reply queue", ("+sadd", "+srem"), ("~_kombu.binding_permanent.reply.celery.pidbox",)),
    Grant("Flower's wakeup and inspect publish on the pidbox; never an event", ("+publish",), channels=("&/{db}.celery.pidbox",)),
)
"""What reaching the workers' control takes (dropped by --no-monitor-control)."""

MONITOR = AclUser(
    "monitor",
    "monitoring (Flower, queue-depth metrics)",
    commands=TRANSACTIONS + SCRIPTS + SUBSCRIBE,
    channels=("&/{db}.celeryev/*",),
    grants=(
        Grant("queue depth only: never a message", ("+llen", "+exists"), ("%R~" + QUEUES,)),
        Grant("its own event queue (declared, then deleted; it expires)", ("+llen", "+exists", "+pexpire", "+del"), ("~celeryev.*",)),
        Grant("the binding tables of expiring queues: declared, unbound, swept when overdue",
              ("+sadd", "+srem", "+smembers", "+del"), (*EXPIRING_BINDINGS, "~_kombu.binding_permanent.celeryev")),
        *BINDING_SCRIPTS,
        *MONITOR_CONTROL,
    ),
)

PARTS: dict[str, AclUser] = {user.name: user for user in (SUBMITTER, WORKER, MONITOR)}


def without_control(user: AclUser) -> AclUser:
    """The monitor without the pidbox: it can watch events and queue depths but cannot reach the workers'
    control (no shutdown, revoke, pool restart; Flower's wakeup and inspect then fail)."""
    return replace(user, grants=tuple(grant for grant in user.grants if grant not in MONITOR_CONTROL))


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
