"""Prometheus metrics of a worker process, served on BULKGEN_METRICS_PORT (+ the pool child's index).

Each pool child serves its own registry on its own port (port + index), so no multiprocess mode is needed
with one child per GPU; scrape every port.

The reconciler's metrics (queue depth per model, lapsed leases, re-sends) are another registry,
reconciler.metrics, served by the process that runs the reconciler.
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
RETRIES = Counter(
    "bulkgen_retries",
    "Requests tried again, by reason: store_unreachable (their message is retried by Celery: the store stayed down), "
    "restarted (started before without finishing: its worker was lost, its lease lapsed; re-run alone), "
    "engine_error (handed back after the engine raised; re-run alone).",
    ["model", "reason"], registry=REGISTRY,
)
STORE_WRITE = Histogram(
    "bulkgen_store_write_seconds", "One transaction writing a job's finished results to the store (each attempt).",
    ["model"], registry=REGISTRY, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
GPU_MEMORY = Gauge(
    "bulkgen_gpu_memory_bytes",
    "GPU memory after the last engine step that finished requests: allocated (this process's tensors), "
    "reserved (held by torch's caching allocator), total (the device's).",
    ["model", "device", "kind"], registry=REGISTRY,
)

def observe_gpu_memory(model: str, device: str) -> None:
    """Set GPU_MEMORY from torch's allocator (on a cuda device only; torch is loaded there already)."""
    if not device.startswith("cuda"):
        return
    import torch

    GPU_MEMORY.labels(model, device, "allocated").set(torch.cuda.memory_allocated(device))
    GPU_MEMORY.labels(model, device, "reserved").set(torch.cuda.memory_reserved(device))
    GPU_MEMORY.labels(model, device, "total").set(torch.cuda.get_device_properties(device).total_memory)


def serve(port: int, offset: int = 0, registry: CollectorRegistry = REGISTRY) -> int | None:
    """Start this process's metrics endpoint (of registry) on port + offset; None when metrics are off (port 0) or
    the port is taken."""
    if port <= 0:
        return None
    actual = port + offset
    try:
        start_http_server(actual, addr="0.0.0.0", registry=registry)
    except OSError as exc:  # a busy port must not stop a worker from generating
        log.warning("metrics endpoint not started on port %d: %s", actual, exc)
        return None
    log.info("metrics on :%d/metrics", actual)
    return actual
