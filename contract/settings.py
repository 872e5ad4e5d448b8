"""Settings shared by the producer and the workers, read from BULKGEN_* environment variables, and the
redaction of the credentials they hold.

Torch-free on purpose: the producer imports this module and must start fast.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic_settings import BaseSettings, SettingsConfigDict

from contract.redaction import redact, url_secrets

__all__ = ["ENV_PREFIX", "Settings", "configured_secrets", "get_settings", "redact", "scrub", "url_secrets"]

ENV_PREFIX = "BULKGEN_"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    database_url: str = "sqlite:///bulkgen.db"
    """SQLAlchemy URL of the results store (SQLite file by default, postgresql+psycopg://... for PostgreSQL)."""
    reader_database_url: str | None = None
    """URL `producer query` reads the store with (unset: database_url). On PostgreSQL, a role with SELECT on the
    store's tables and nothing else; `query` refuses a superuser or a role that can write (unless --allow-role-that-can-write)."""
    query_timeout_s: float = 300.0
    """Longest a `producer query` may run (its --timeout raises it for one run). Enforced on SQLite by a progress
    handler, on PostgreSQL by the session's statement_timeout and a cancel at the deadline; `producer db roles`
    also sets it as the reader role's statement_timeout."""
    query_max_cell_bytes: int = 16 * 2**20
    """Largest value (bytes of a blob, characters of a text) one `producer query` row may hold (--max-cell-bytes)."""
    query_max_result_bytes: int = 256 * 2**20
    """Most bytes the values of one `producer query` result may add up to (--max-result-bytes)."""
    reader_temp_file_limit: str = "1GB"
    """temp_file_limit `producer db roles` sets on the reader role (a superuser's setting: set only when `db roles`
    runs as a superuser): a query's sorts and hashes may spill this much to disk, no more."""
    submitter_database_url: str | None = None
    """URL the producer's commands other than `query` use (submit, cancel, retry, reconcile, status, results;
    unset: database_url). On PostgreSQL, the submitter role of `producer db roles`."""
    worker_database_url: str | None = None
    """URL `workers start` hands its worker processes (unset: database_url). On PostgreSQL, the worker role."""
    broker_url: str = "redis://127.0.0.1:6379/0"
    """Celery broker URL (redis://, rediss:// or redis+socket://)."""
    submitter_broker_url: str | None = None
    """Broker URL of the producer's commands (unset: broker_url); the Redis ACL user `submitter`."""
    worker_broker_url: str | None = None
    """Broker URL `workers start` hands its worker processes (unset: broker_url); the Redis ACL user `worker`."""
    model: str = "smollm2-135m-instruct"
    """Default model for `producer submit` and `workers start`."""
    device: str = "cpu"
    """Device a worker generates on: cpu or cuda:N."""
    dtype: str = "float32"
    quantize: str = "none"
    batch_size: int = 64
    """Most rows (requests x samples) one engine batch holds."""
    kv_cache_tokens: int | None = None
    """Tokens of K/V the running rows may hold (prompt + max_new_tokens each). Unset: 65,536 on a CPU, or fewer
    if that many would take more than 1 GiB (SmolLM2-135M: 46,603 in bfloat16, 23,301 in float32); on a GPU,
    what 90% of its memory left free by the model holds."""
    prefix_cache_tokens: int = 8192
    """Prompt tokens whose K/V a worker keeps for later prompts that start the same way (a shared system prompt
    is computed once); least recently used first out; 0 turns prefix caching off. Llama-family models only."""
    speculative_tokens: int = 8
    """Most draft tokens a row proposes per step for speculative decoding (prompt lookup: a row that copies its
    prompt takes several tokens per step; exact, and used only when the worker measures that it pays); 0 = off."""
    cuda_graphs: bool = True
    """On a GPU: decode steps replay CUDA graphs and are launched before the host records the last step's tokens
    (workers.graphs, workers.scheduler); false: eager steps, one after the other. No effect on a CPU."""
    compile_decode: bool = False
    """On a GPU with cuda_graphs: the graphed decode step through torch.compile first (fused elementwise kernels;
    each batch size compiles at its first step, minutes for a large model). Off until measured to pay on a GPU."""
    draft_model: str | None = None
    """A smaller model with the worker model's tokenizer (a name `--model` takes) that drafts in place of prompt
    lookup; unset: prompt lookup. The worker loads it beside its model, on the same device in the same dtype."""
    ids_per_message: int = 128
    """Request ids carried by one queue message."""
    metrics_port: int = 9400
    """Prometheus endpoint of a worker (0 = off); pool child i of a worker on cuda:N serves on port + N + i."""
    log_format: Literal["text", "json"] = "text"
    """Workers' log lines and the producer's notices on stderr: text, or one JSON object per line (contract.logs),
    with the job id and request ids on every line that concerns them."""
    reconciler_metrics_port: int = 9500
    """Prometheus endpoint of the reconciler (0 = off): queue depth per model, lapsed leases, re-sends. A worker's main
    process (which runs the fleet's reconciler) on cuda:N serves it on port + N; `producer reconcile --loop` on port."""

    # Delivery and recovery (docs/reliability.md says why each is what it is).
    visibility_timeout_s: int = 3 * 3600
    """Redis hands an unacknowledged message to another worker after this long; every time limit stays below it."""
    task_soft_time_limit_s: int = 2 * 3600
    """A task (claiming a message, then waiting for room in the batch) still running after this long stops."""
    task_time_limit_s: int = 2 * 3600 + 600
    """A pool process still busy after this long is killed (its requests come back through their lease)."""
    lease_s: int = 120
    """A running request's lease; its worker renews it every lease_s / 4. Expired = its holder is gone."""
    max_attempts: int = 3
    """Times a request may be started; one that loses its worker every time then ends failed."""
    reconcile_interval_s: int = 30
    """How often one worker of the fleet re-enqueues lost requests (0 = never; `producer reconcile` can)."""
    reconcile_grace_s: int = 120
    """A queued request missing from Redis is re-enqueued only this long after it was last enqueued."""
    db_retry_s: int = 600
    """How long a worker waits out an unreachable store (with backoff) before handing its batch back."""


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def configured_secrets(settings: Settings) -> list[str]:
    """The passwords of every URL in these settings."""
    urls = [value for name, value in settings.model_dump().items() if name.endswith("_url") and isinstance(value, str)]
    return url_secrets(*urls)


def scrub(text: str, settings: Settings) -> str:
    """The text with the passwords of the configured URLs replaced by ***."""
    for secret in configured_secrets(settings):
        text = text.replace(secret, "***")
    return text
