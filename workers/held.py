"""What a worker holds between claiming a request and recording it: Held (one claimed request) and Work (an
inbox item). The task puts them in, the engine thread runs them, the recorder lets them go (workers.worker)."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from models.tables import Request
from workers.types import GenerationRequest


@dataclass
class Held:
    """A request this worker claimed and has not recorded yet."""

    job_id: int
    request: Request
    generation: GenerationRequest
    claimed_at: datetime
    started_at: datetime | None = None
    """When it entered the engine."""
    occupancy_mark: tuple[float, int] = (0.0, 0)
    """The worker's (occupancy sum, decode steps) when the request entered the engine."""


@dataclass
class Work:
    """An inbox item: a claim's requests, to run with the others or alone; or ids to claim again one by one."""

    job_id: int
    held: list[Held] = field(default_factory=list)
    alone: bool = False
    reclaim: list[int] = field(default_factory=list)
