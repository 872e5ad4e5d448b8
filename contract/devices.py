"""The devices a worker generates on, by name: cpu, cuda (the first GPU) or cuda:N. Torch-free: the CLI checks a
name before any worker process loads torch."""
from __future__ import annotations

import re

DEVICE_NAME = re.compile(r"cpu|cuda(:\d+)?")
"""The names a worker takes."""


def is_device_name(device: str) -> bool:
    """cpu, cuda or cuda:N."""
    return DEVICE_NAME.fullmatch(device) is not None


def device_index(device: str) -> int:
    """N for cuda:N, else 0: the GPU a cuda name means, and the offset of its worker's metrics ports."""
    return int(device[5:]) if device.startswith("cuda:") and device[5:].isdigit() else 0
