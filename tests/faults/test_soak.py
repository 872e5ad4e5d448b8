"""The chaos soak's short version (tests/faults/soak.py; `make soak` runs it for 30 minutes): two jobs on three real
workers with the tiny model, a random fault every few seconds for two minutes, then every result exactly once.
Its seed is fixed, so that a failure in `make test` (or CI) replays; new seeds are `make soak`'s, which prints its own."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import ROOT

SEED = 20261204
"""The faults' order and the input; `python -m tests.faults.soak --minutes 2 --requests 600 --seed 20261204` replays it."""


@pytest.mark.slow
def test_a_short_soak_loses_nothing_and_doubles_nothing() -> None:
    seed = SEED
    done = subprocess.run(
        [sys.executable, "-m", "tests.faults.soak", "--minutes", "2", "--requests", "600", "--seed", str(seed)],
        cwd=ROOT, capture_output=True, text=True, timeout=1200,
    )
    assert done.returncode == 0, f"seed {seed}\n{done.stdout[-8000:]}\n{done.stderr[-4000:]}"
    assert "PASSED" in done.stdout
    assert "faults injected: " in done.stdout and "faults injected: 0 " not in done.stdout
