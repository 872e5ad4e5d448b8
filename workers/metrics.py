"""Prometheus metrics of a worker process, served on BULKGEN_METRICS_PORT (+ the pool child's index).

Each pool child serves its own registry on its own port (port + index), so no multiprocess mode is needed
with one child per GPU; scrape every port.
"""
from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("bulkgen.metrics")

REGISTRY = CollectorRegistry()
TOKENS = Counter("bulkgen_tokens_generated", "Completion tokens generated.", ["model"], registry=REGISTRY)
PROMPT_TOKENS = Counter("bulkgen_prompt_tokens", "Prompt tokens processed.", ["model"], registry=REGISTRY)
CACHED_PROMPT_TOKENS = Counter(
    "bulkgen_cached_prompt_tokens",
    "Of the prompt tokens, those whose K/V came from the prefix cache (hit rate: this / bulkgen_prompt_tokens).",
    ["model"], registry=REGISTRY,
)
DRAFT_TOKENS = Counter("bulkgen_draft_tokens", "Tokens speculative decoding proposed.", ["model"], registry=REGISTRY)
ACCEPTED_DRAFT_TOKENS = Counter(
    "bulkgen_accepted_draft_tokens",
    "Of the draft tokens, those kept (acceptance rate: this / bulkgen_draft_tokens); each saved a decode step.",
    ["model"], registry=REGISTRY,
)
REQUESTS = Counter("bulkgen_requests", "Requests finished, by outcome (done or failed).", ["model", "outcome"], registry=REGISTRY)
BATCH_SIZE = Histogram(
    "bulkgen_batch_requests", "Requests per claim (what one queue message handed to the engine).", ["model"], registry=REGISTRY,
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
QUEUE_WAIT = Histogram(
    "bulkgen_queue_wait_seconds", "From a request's enqueue to a worker claiming it.", ["model"], registry=REGISTRY,
    buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600),
)
GENERATION = Histogram(
    "bulkgen_generation_seconds", "From a request entering the engine to its last row finishing.", ["model"], registry=REGISTRY,
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800),
)
RUNNING_ROWS = Gauge("bulkgen_running_rows", "Rows in the engine's running batch at its last decode step.", ["model"], registry=REGISTRY)
OCCUPANCY = Histogram(
    "bulkgen_batch_occupancy", "Running rows / rows the KV cache allows, per decode step.", ["model"], registry=REGISTRY,
    buckets=(0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0),
)
MODEL_LOAD = Gauge("bulkgen_model_load_seconds", "How long this process took to load its model.", ["model", "device"], registry=REGISTRY)


def serve(port: int, offset: int = 0) -> int | None:
    """Start this process's metrics endpoint on port + offset; None when metrics are off (port 0) or the port is taken."""
    if port <= 0:
        return None
    actual = port + offset
    try:
        start_http_server(actual, addr="0.0.0.0", registry=REGISTRY)
    except OSError as exc:  # a busy port must not stop a worker from generating
        log.warning("metrics endpoint not started on port %d: %s", actual, exc)
        return None
    log.info("metrics on :%d/metrics", actual)
    return actual
