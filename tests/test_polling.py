"""Poll timing and retry backoff."""

from __future__ import annotations

import random

from workers.polling import (
    FIRST_POLL_S,
    TRANSIENT_BACKOFF_MAX_S,
    backoff_s,
    next_poll_delay_s,
)


def test_first_poll_comes_soon_then_no_faster_than_official_clients() -> None:
    assert next_poll_delay_s(upstream_status="in_queue", polls=0) == FIRST_POLL_S
    for status in ("in_queue", "in_progress"):
        assert 1.0 <= next_poll_delay_s(upstream_status=status, polls=3) <= 2.0


def test_backoff_grows_with_failures_and_is_capped() -> None:
    rng = random.Random(1)
    samples = {n: [backoff_s(n, rng=rng) for _ in range(200)] for n in (1, 2, 4, 10, 30)}
    assert max(samples[1]) <= 1.0
    assert min(samples[4]) >= 4.0 and max(samples[4]) <= 8.0
    assert all(s <= TRANSIENT_BACKOFF_MAX_S for s in samples[30])
    assert len(set(samples[10])) > 100  # jittered, not lock-step


def test_retry_after_is_a_floor() -> None:
    assert backoff_s(1, retry_after_s=30.0) >= 30.0
    assert backoff_s(6, retry_after_s=0.0) >= 16.0
