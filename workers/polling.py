"""When to look at RunComfy again: poll timing and retry backoff, as plain functions.

RunComfy has no webhooks on the Model API, so we poll — but not blindly. A turbo model's run time
for a given step count and size varies within a window, so once a request is running we look when
the earliest runs of its shape end, a few times across the window where they end (learned from
finished jobs, see RunTimes), then briefly more often if it is later than all of them.
Until something is learned, and while a request is queued, we poll at the official clients' 2 s.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

FIRST_POLL_S = 1.0  # a turbo model can finish within about a second of leaving the queue
MIN_FIRST_POLL_S = 0.25  # even a run learned to take no time: give the queue a moment
QUEUED_POLL_S = 2.0  # RunComfy's own clients poll at a fixed 2 s
# Queue position 1 — or 0, should RunComfy count from 0 (unconfirmed: fal's API, which this
# one's shape follows, does): it starts any moment, and its start time matters.
NEXT_IN_LINE_POLL_S = 0.5
RUNNING_POLL_S = 2.0
LATE_POLL_MIN_S = 0.25  # a run past its expected end: look again soon, then back off to 2 s
# Runs of one shape end within a window (a 20 s run may take 20-22 s): looks this far apart
# across it, so that no run ending in it is seen later than this — about as many looks as fixed
# 2 s polling makes over its whole run, for a run that varies by seconds.
WINDOW_STEP_S = 0.5
TRANSIENT_BACKOFF_BASE_S = 1.0
TRANSIENT_BACKOFF_MAX_S = 60.0
MAX_RETRY_AFTER_S = 600.0  # a longer Retry-After is taken as this: the job deadline decides
# A status word not known may be RunComfy's new word for "running": its end should not wait out
# a minute's backoff.
UNKNOWN_STATUS_MAX_POLL_S = 10.0


@dataclass(frozen=True)
class RunEstimate:
    """How long runs of a job's shape take lately: they end between `earliest_s` and
    `latest_s` after they start (one figure twice while only a typical run is known)."""

    earliest_s: float
    latest_s: float

    @classmethod
    def exactly(cls, run_s: float) -> RunEstimate:
        """Runs that all take `run_s`, as far as is known."""
        return cls(run_s, run_s)


def first_poll_at(submitted_at: float, expected_run: RunEstimate | None = None) -> float:
    """When to first look at a request just submitted: after FIRST_POLL_S, or sooner if runs
    of this shape are learned to end sooner (the look also tells whether it is queued)."""
    if expected_run is None:
        return submitted_at + FIRST_POLL_S
    return submitted_at + min(FIRST_POLL_S, max(MIN_FIRST_POLL_S, expected_run.earliest_s))


def next_poll_at(
    *,
    now: float,
    running: bool,
    queue_position: int | None = None,
    running_since: float | None = None,
    expected_run: RunEstimate | None = None,
) -> float:
    """When to look next at a request RunComfy holds.

    A run of a learned shape: first when the earliest runs of its shape end, then every
    WINDOW_STEP_S across the window in which they end, then — later than its latest — soon,
    backing off to RUNNING_POLL_S. One look at the typical end would be late by up to the whole
    window for half the runs; a look every LATE_POLL_MIN_S throughout, calls for nothing."""
    if not running:
        next_in_line = queue_position is not None and queue_position <= 1
        return now + (NEXT_IN_LINE_POLL_S if next_in_line else QUEUED_POLL_S)
    if running_since is None or expected_run is None:
        return now + RUNNING_POLL_S
    earliest_end = running_since + expected_run.earliest_s
    if earliest_end > now + LATE_POLL_MIN_S:
        return earliest_end
    latest_end = running_since + expected_run.latest_s
    if latest_end > now + LATE_POLL_MIN_S:
        return min(now + WINDOW_STEP_S, latest_end)
    late_by = max(0.0, now - latest_end)
    return now + min(RUNNING_POLL_S, max(LATE_POLL_MIN_S, late_by))


def estimated_start(
    *, last_seen_queued_at: float, first_seen_running_at: float, seen_queued: bool = True
) -> float:
    """When a run began: between the last look that saw it queued and the first that saw it run.

    Running at the very first look means there was no queue: it began at the submit (passed as
    `last_seen_queued_at`). Otherwise the midpoint — used both to learn run times and to predict
    ends, so its bias cancels.
    """
    if not seen_queued:
        return last_seen_queued_at
    return (last_seen_queued_at + first_seen_running_at) / 2


def backoff_s(
    failures: int,
    *,
    retry_after_s: float | None = None,
    retry_after_is_when: bool = False,
    rng: random.Random | None = None,
) -> float:
    """How long to wait after `failures` consecutive failures (>= 1) of a call to RunComfy.

    Exponential backoff with full jitter, capped at TRANSIENT_BACKOFF_MAX_S; a Retry-After
    (a 503 may send one) is a floor under it. With `retry_after_is_when` (a 408 or 429: RunComfy
    asks to be called again later, at its Retry-After if it gives one), Retry-After is when to
    come back — at least TRANSIENT_BACKOFF_BASE_S, plus up to as much again of jitter, so jobs
    told the same moment do not all call at once — however many failures came before: as a
    floor under the growing backoff, it would make a job whose result is ready wait up to a
    minute after a run of 429s that each asked for 1 s.
    """
    uniform = (rng or random).uniform
    told = None if retry_after_s is None else min(max(retry_after_s, 0.0), MAX_RETRY_AFTER_S)
    if retry_after_is_when and told is not None:
        return max(told, TRANSIENT_BACKOFF_BASE_S) + uniform(0, TRANSIENT_BACKOFF_BASE_S)
    ceiling = min(TRANSIENT_BACKOFF_MAX_S, TRANSIENT_BACKOFF_BASE_S * 2 ** max(0, failures - 1))
    return max(uniform(ceiling / 2, ceiling), told or 0.0)


def unknown_status_poll_at(now: float, looks: int, *, rng: random.Random | None = None) -> float:
    """When to look again at a request that answered a status word not known `looks` times in
    a row: backing off as after failures, up to UNKNOWN_STATUS_MAX_POLL_S."""
    return now + min(UNKNOWN_STATUS_MAX_POLL_S, backoff_s(looks, rng=rng))
