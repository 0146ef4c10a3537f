"""When to look at RunComfy again: poll timing and retry backoff, as plain functions."""

from __future__ import annotations

import random

FIRST_POLL_S = 1.0  # a turbo model can finish within about a second of leaving the queue
QUEUED_POLL_S = 2.0  # RunComfy's own clients poll at a fixed 2 s
RUNNING_POLL_S = 2.0
TRANSIENT_BACKOFF_BASE_S = 1.0
TRANSIENT_BACKOFF_MAX_S = 60.0


def next_poll_delay_s(*, upstream_status: str | None, polls: int) -> float:
    """Seconds until the next look at a request RunComfy holds."""
    if polls == 0:
        return FIRST_POLL_S
    return QUEUED_POLL_S if upstream_status in (None, "in_queue", "queued") else RUNNING_POLL_S


def backoff_s(
    failures: int, *, retry_after_s: float | None = None, rng: random.Random | None = None
) -> float:
    """Exponential backoff with full jitter after `failures` consecutive failures (>= 1).

    A server's Retry-After is a floor: we never come back earlier than asked.
    """
    ceiling = min(TRANSIENT_BACKOFF_MAX_S, TRANSIENT_BACKOFF_BASE_S * 2 ** max(0, failures - 1))
    delay = (rng or random).uniform(ceiling / 2, ceiling)
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, TRANSIENT_BACKOFF_MAX_S * 10))
    return delay
