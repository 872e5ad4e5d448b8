"""`workers start`: a Celery worker that holds one model and consumes that model's queue."""
from __future__ import annotations

import os
import socket
import sys

import click

from contract.errors import SchemaBehind
from migrations.schema import check_schema
from models.db import make_engine
from contract import registry
from contract.devices import is_device_name
from workers.quantize import check_combination
from contract.settings import ENV_PREFIX, Settings, redact

DTYPES = ("float32", "bfloat16", "float16")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Run generation workers."""


@main.command()
@click.option("--model", default=None, help="Model alias, local model directory or cached model id [env BULKGEN_MODEL].")
@click.option("--device", default=None, help="cpu or cuda:N; one worker process per GPU [env BULKGEN_DEVICE].")
@click.option("--dtype", type=click.Choice(DTYPES), default=None, help="Weights' precision [env BULKGEN_DTYPE].")
@click.option("--quantize", type=click.Choice(("none", "int8", "int4")), default=None, help="Weight quantization [env BULKGEN_QUANTIZE].")
@click.option("--concurrency", type=int, default=1, show_default=True, help="Worker processes (each loads the model). CPU only; a GPU gets one.")
@click.option("--batch-size", type=int, default=None, help="Most rows (requests x samples) per engine batch [env BULKGEN_BATCH_SIZE].")
@click.option("--database-url", default=None, help="Results store URL [env BULKGEN_WORKER_DATABASE_URL, else BULKGEN_DATABASE_URL].")
@click.option("--broker-url", default=None, help="Redis URL [env BULKGEN_WORKER_BROKER_URL, else BULKGEN_BROKER_URL].")
@click.option("--loglevel", default="INFO", show_default=True)
def start(model, device, dtype, quantize, concurrency, batch_size, database_url, broker_url, loglevel) -> None:  # type: ignore[no-untyped-def]
    """Start a worker that loads MODEL once per process and generates what its queue holds.

    \b
    Examples:
      workers start                                  # bundled SmolLM2 on the CPU
      workers start --model ./my-model --device cuda:0
      for i in 0 1 2 3; do workers start --device cuda:$i & done   # one per GPU
    """
    overrides = {
        "MODEL": model, "DEVICE": device, "DTYPE": dtype, "QUANTIZE": quantize, "BATCH_SIZE": batch_size,
        "DATABASE_URL": database_url, "BROKER_URL": broker_url,
    }
    given = {key: value for key, value in overrides.items() if value is not None}
    # The worker's own credentials (BULKGEN_WORKER_*_URL) become the URLs its processes connect with.
    own = Settings()
    for key, value in (("DATABASE_URL", own.worker_database_url), ("BROKER_URL", own.worker_broker_url)):
        if value and key not in given:
            given[key] = value
    # Flags win over the environment; this process's own environment is left as it is (the worker gets `env`).
    settings = Settings(**{key.lower(): value for key, value in given.items()})
    env = dict(os.environ) | {ENV_PREFIX + key: str(value) for key, value in given.items()}

    if concurrency < 1:
        raise click.BadParameter("must be >= 1", param_hint="--concurrency")
    device = settings.device
    if not is_device_name(device):
        raise click.BadParameter(f"must be cpu or cuda:N, got {device!r}", param_hint="--device")
    if device.startswith("cuda") and concurrency != 1:
        raise click.BadParameter("a GPU worker runs one process; start one worker per GPU", param_hint="--concurrency")
    problem = check_combination(device, settings.dtype, settings.quantize)
    if problem is not None:
        raise click.UsageError(problem)
    try:
        spec = registry.resolve(settings.model)
    except registry.ModelNotFound as exc:
        raise click.ClickException(str(exc)) from None
    try:
        check_schema(make_engine(settings.database_url))
    except SchemaBehind as exc:
        raise click.ClickException(str(exc)) from None
    except Exception as exc:  # an unreachable database at start-up is a user error, not a traceback
        raise click.ClickException(f"cannot reach the database {redact(settings.database_url)}: {exc}") from None

    env["BULKGEN_POOL_SIZE"] = str(concurrency)
    click.echo(
        f"worker: model {spec.name} ({spec.kind}), device {device}, dtype {settings.dtype}, "
        f"queue {spec.queue}, broker {redact(settings.broker_url)}, store {redact(settings.database_url)}",
        err=True,
    )
    argv = [
        sys.executable, "-m", "celery", "-A", "workers.app", "worker",
        "--queues", spec.queue,
        "--pool", "prefork",
        "--concurrency", str(concurrency),
        "--hostname", f"bulkgen-{spec.queue}-{os.getpid()}@{socket.gethostname()}",
        "--loglevel", loglevel,
        "--events",
    ]
    os.execve(sys.executable, argv, env)
