"""The gateway polling every 2 s, as RunComfy's own clients do: the peer the variance phase sets
the gateway's poller beside. Bench only, never deployed: `celery -A bench.fixed_polling worker`.

The same Celery app, tasks, store and pipeline as `workers`; only the two timing decisions are
replaced — the first look 2 s after the submit, and every look after it 2 s after the last —
so the figures differ by the poller alone.
"""

from __future__ import annotations

from typing import Any

from workers import decisions
from workers.polling import RunEstimate

FIXED_POLL_S = 2.0


def first_poll_every_2_s(submitted_at: float, expected_run: RunEstimate | None = None) -> float:
    """The first look, FIXED_POLL_S after the submit, whatever was learned."""
    return submitted_at + FIXED_POLL_S


def next_poll_every_2_s(*, now: float, **_: Any) -> float:
    """Every look FIXED_POLL_S after the last, queued or running."""
    return now + FIXED_POLL_S


decisions.first_poll_at = first_poll_every_2_s
decisions.next_poll_at = next_poll_every_2_s


def __getattr__(name: str) -> Any:
    if name == "app":  # `celery -A bench.fixed_polling` looks for it
        import workers

        return workers.app
    raise AttributeError(f"module 'bench.fixed_polling' has no attribute {name!r}")
