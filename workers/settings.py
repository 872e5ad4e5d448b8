"""Settings shared by the producer and the workers, read from BULKGEN_* environment variables.

Torch-free on purpose: the producer imports this module and must start fast.
"""
from __future__ import annotations

from functools import lru_cache

from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "BULKGEN_"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    database_url: str = "sqlite:///bulkgen.db"
    """SQLAlchemy URL of the results store (SQLite file by default, postgresql+psycopg://... for PostgreSQL)."""
    broker_url: str = "redis://127.0.0.1:6379/0"
    """Celery broker URL (redis://, rediss:// or redis+socket://)."""
    model: str = "smollm2-135m-instruct"
    """Default model for `producer submit` and `workers start`."""
    device: str = "cpu"
    """Device a worker generates on: cpu or cuda:N."""
    dtype: str = "float32"
    quantize: str = "none"
    batch_size: int = 64
    """Most rows (requests x samples) one engine batch holds."""
    ids_per_message: int = 32
    """Request ids carried by one queue message."""
    metrics_port: int = 9400
    """Prometheus endpoint of a worker (0 = off); pool child i of a worker on cuda:N serves on port + N + i."""


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def redact(url: str) -> str:
    """Hide the password in a URL, for logs and output."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1] if "@" in url else url
