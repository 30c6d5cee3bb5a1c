"""Exponential backoff with jitter, for every retry loop: bundle uploads,
notices and per-message outputs."""

from __future__ import annotations

import random


def backoff(
    initial: float,
    maximum: float,
    attempt: int,
    rng: random.Random,
    jitter: tuple[float, float] = (0.5, 1.0),
) -> float:
    """Seconds to wait after failed try ``attempt`` (from 1): ``initial``
    doubling up to ``maximum``, times a random factor in ``jitter`` so that
    many sets, outputs and nodes do not retry against a recovering far end
    in step. (The exponent stops at 60, where any ``maximum`` is reached.)"""
    base = min(maximum, initial * 2.0 ** min(attempt - 1, 60))
    return base * rng.uniform(*jitter)
