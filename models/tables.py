"""The results store: jobs, their requests, and one result row per (request, sample)."""
from __future__ import annotations

from datetime import datetime
from enum import StrEnum, nonmember
from typing import Any, Optional

from sqlalchemy import (
    JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint, text,
)
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, BigId


class JobStatus(StrEnum):
    """A job's states, stored as their values (a member equals its string: `job.status == "queued"`)."""

    SUBMITTING = "submitting"  # rows being written / messages being sent by `producer submit`
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    FINAL = nonmember(("completed", "failed", "cancelled"))


class RequestStatus(StrEnum):
    """A request's states, stored as their values."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"  # its job was cancelled before it ran; `producer retry` queues it again
    FINAL = nonmember(("done", "failed"))


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[Optional[str]] = mapped_column(String(200))
    model: Mapped[str] = mapped_column(String(500))
    source: Mapped[Optional[str]] = mapped_column(Text)
    """The submitted file's path."""
    status: Mapped[str] = mapped_column(String(20), default=JobStatus.SUBMITTING, index=True)
    defaults: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    """Job-level sampling defaults from the submit flags; a request's own params override them."""
    input_columns: Mapped[Optional[dict[str, Any]]] = mapped_column(JSON(none_as_null=True))
    """For a table input (Parquet, CSV, a saved dataset, a DataFrame): {"fields": {field: column}, "schema": the
    input's Arrow schema, base64 IPC}; NULL for JSONL and rows of dicts. `submit --resume` reads the mapping
    from here and `results --join` the columns (producer.inputs.TableInput.record). Kept out of `defaults`,
    which workers merge into every request's sampling parameters."""
    total_requests: Mapped[int] = mapped_column(Integer, default=0)
    total_samples: Mapped[int] = mapped_column(BigInteger, default=0)
    """Expected result rows: the sum of n over the requests."""
    done_count: Mapped[int] = mapped_column(Integer, default=0)
    result_count: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    """Result rows (samples) of its done requests, counted when each request moves to done."""
    failed_count: Mapped[int] = mapped_column(Integer, default=0)
    rejected_count: Mapped[int] = mapped_column(Integer, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    enqueued_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))
    """Set once every request's message is on the queue; NULL means the submit did not finish."""
    started_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))

    def __repr__(self) -> str:
        return f"Job(id={self.id}, model={self.model!r}, status={self.status!r}, total={self.total_requests})"


RETRIED = "attempts > 1"
"""The predicate of the partial index ix_requests_retried; a query that wants the index spells it the same."""


class Request(Base):
    __tablename__ = "requests"
    __table_args__ = (
        UniqueConstraint("job_id", "custom_id"),
        Index("ix_requests_job_id_status", "job_id", "status"),
        # only requests started more than once: status counts them without reading the whole job
        Index("ix_requests_retried", "job_id", postgresql_where=text(RETRIED), sqlite_where=text(RETRIED)),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    line_no: Mapped[int] = mapped_column(Integer)
    custom_id: Mapped[str] = mapped_column(String(512))
    prompt: Mapped[Optional[str]] = mapped_column(Text)
    messages: Mapped[Optional[list[dict[str, str]]]] = mapped_column(JSON)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    """Only the sampling values set on this request's line."""
    meta: Mapped[Optional[dict[str, Any]]] = mapped_column("metadata", JSON)
    constraint_key: Mapped[Optional[str]] = mapped_column(String(64))
    """The structured output it asks for: the key of its job's OutputConstraint (NULL: free text)."""
    status: Mapped[str] = mapped_column(String(20), default=RequestStatus.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    """Times a worker started generating it; capped by the max_attempts setting."""
    error: Mapped[Optional[str]] = mapped_column(Text)
    """Why it failed; on a request handed back for another attempt, why the last attempt did not finish."""
    worker: Mapped[Optional[str]] = mapped_column(String(300))
    """host:pid of the worker process that holds (or last held) it."""
    lease_until: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))
    """While running: its worker renews this; once it has passed, the holder is taken to be gone."""
    enqueued_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))
    """When a message with this request was last sent by resume, retry or the reconciler (NULL: with the submit)."""
    started_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))

    def __repr__(self) -> str:
        return f"Request(id={self.id}, job_id={self.job_id}, custom_id={self.custom_id!r}, status={self.status!r})"


class Result(Base):
    __tablename__ = "results"
    __table_args__ = (UniqueConstraint("request_id", "sample_index"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    request_id: Mapped[int] = mapped_column(ForeignKey("requests.id", ondelete="CASCADE"))
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    sample_index: Mapped[int] = mapped_column(Integer, default=0)
    text: Mapped[str] = mapped_column(Text)
    finish_reason: Mapped[str] = mapped_column(String(20))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    """The sampling parameters actually used, with this sample's seed."""
    seed: Mapped[Optional[int]] = mapped_column(BigInteger)
    model: Mapped[str] = mapped_column(String(500))
    dtype: Mapped[str] = mapped_column(String(20))
    quantization: Mapped[str] = mapped_column(String(20))
    worker_host: Mapped[str] = mapped_column(String(300))
    device: Mapped[str] = mapped_column(String(50))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    generation_seconds: Mapped[float] = mapped_column(Float)
    logprobs: Mapped[Optional[list[dict[str, Any]]]] = mapped_column(JSON(none_as_null=True))
    """SQL NULL unless the request asked for them; then one entry per generated token,
    {"token", "logprob", "top_logprobs": [{"token", "logprob"}, ...]} (workers.types.Sample.logprobs)."""
    batch_occupancy: Mapped[Optional[float]] = mapped_column(Float)
    """Mean share of the engine's batch slots in use over the decode steps while this request ran (None: no
    decode steps, e.g. the stand-in engine or beam search)."""
    cached_prompt_tokens: Mapped[Optional[int]] = mapped_column(Integer)
    """Of prompt_tokens, those whose K/V this sample copied from the worker's prefix cache instead of computing
    them (0: none; None: written before the column existed)."""
    draft_tokens: Mapped[Optional[int]] = mapped_column(Integer)
    """Tokens speculative decoding proposed for this sample (0: none; None: written before the column existed or
    by an engine that does not say)."""
    accepted_draft_tokens: Mapped[Optional[int]] = mapped_column(Integer)
    """Of draft_tokens, those kept: each one saved a decode step (None with draft_tokens)."""
    reasoning_content: Mapped[Optional[str]] = mapped_column(Text)
    """A reasoning model's thinking, when its chat template marks it (text is then the answer alone); None
    otherwise (workers.reasoning)."""
    constrained: Mapped[Optional[bool]] = mapped_column(Boolean)
    """Its text was constrained while decoding to its request's schema, regex or choices (None: written before the
    column existed)."""

    def __repr__(self) -> str:
        return f"Result(request_id={self.request_id}, sample={self.sample_index}, finish={self.finish_reason!r})"


class OutputConstraint(Base):
    """A structured-output constraint (contract.structured.Constraint) that requests of a job ask for, stored once
    per job under its key however many requests ask for it."""

    __tablename__ = "output_constraints"

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    """sha256 of kind and spec."""
    kind: Mapped[str] = mapped_column(String(20))
    """json_schema, json_object, regex or choice."""
    spec: Mapped[str] = mapped_column(Text)
    """The schema as compact JSON, the regex, or the choices as a JSON array."""

    def __repr__(self) -> str:
        return f"OutputConstraint(job_id={self.job_id}, key={self.key[:12]!r}, kind={self.kind!r})"


class Reject(Base):
    """A line that `submit --skip-invalid` left out, with why."""

    __tablename__ = "rejects"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    line_no: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)
