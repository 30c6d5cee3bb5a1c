"""A deliberately slow stage, to saturate the filter workers in benchmarks."""

from __future__ import annotations

import time
from typing import Any


def busy(ms: float = 2.0) -> Any:
    """A stage that burns ``ms`` of CPU in Python per message (holding the GIL,
    the worst case for the reactor) and keeps every message."""
    seconds = ms / 1000.0

    def stage(env: Any) -> None:
        end = time.perf_counter() + seconds
        n = 0
        while time.perf_counter() < end:
            n += 1
        return None

    return stage
