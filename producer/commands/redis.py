"""`producer redis acl`: the Redis ACL file, one user per part, written from the passwords in the environment."""
from __future__ import annotations

from pathlib import Path

import click


@click.group()
def redis() -> None:
    """Redis ACL users: one per part, each with only the keys and commands it uses."""


@redis.command()
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the file here (mode 0644, replaced at once); without it, print it.")
@click.option("--db", type=click.IntRange(0, 15), default=0, show_default=True,
              help="The database number in the brokers' URLs (event and control channels are named by it).")
@click.option("--monitor-control/--no-monitor-control", default=True, show_default=True,
              help="Let the monitor publish worker control (Flower needs it for its wakeup and inspect; it "
                   "can also shut workers down). Without it the monitor only watches events and queue depths.")
def acl(output: Path | None, db: int, monitor_control: bool) -> None:
    """Write the ACL file redis-server loads with `--aclfile`: the default user off, and the users
    submitter, worker and monitor, each allowed only its part's keys, channels and commands
    (docs/security.md). Passwords come from REDIS_SUBMITTER_PASSWORD, REDIS_WORKER_PASSWORD and
    REDIS_MONITOR_PASSWORD and are written as SHA-256 hashes, never in plain.

    \b
    Rotate: set the new passwords, write the file again, `redis-cli ... ACL LOAD` (or restart Redis),
    then give each part its new URL: redis://submitter:NEW@host:6379/0 and so on.
    """
    from contract.redis_acl import passwords_from_env, render, write_acl_file

    try:
        passwords = passwords_from_env()
        if output is None:
            click.echo(render(passwords, db, monitor_control), nl=False)
            return
        write_acl_file(output, passwords, db, monitor_control)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot write {output}: {exc.strerror}") from None
    click.echo(f"wrote {output}: users submitter, worker, monitor; default off", err=True)
