"""Phase 4, baseline: the scale run against the naive design (bench/naive.py), same concurrency.

Its own Redis and emulator (runs of 20 s), `celery -A bench.naive worker -c N` (N = the scale phase's worker concurrency), and the same
number of jobs enqueued at once. It would take hours to finish, so it runs for a fixed
window; the figures are what finished in it, the peak in flight at the emulator, and the time
all the jobs would take at that pace.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import naive
from bench.common import (
    Collector,
    InFlightSampler,
    Row,
    Sizes,
    fmt,
    phase_stack,
    say,
    start_receiver,
)
from bench.scale import ScaleOutcome
from cli.listener import ReceivedEvent
from cli.stack import Stack, sample_job_body
from core.clients import new_webhook_secret


@dataclass(frozen=True)
class NaiveWindow:
    """What the naive design did with jobs sent to it, within a window."""

    events: list[ReceivedEvent]  # the verified webhooks received within the window
    enqueued_in_s: float
    peak_in_progress: int  # at the emulator
    rejected: int  # webhooks whose signature failed


def run_naive_window(
    stack: Stack, secret: str, bodies: list[dict[str, Any]], *, concurrency: int, window_s: float
) -> NaiveWindow:
    """Send one naive job per model input in `bodies` to `celery -A bench.naive worker -c
    concurrency` on `stack` (started with NAIVE_WEBHOOK_SECRET=`secret`), and stop it after
    `window_s`: it would take hours to finish them."""
    worker = stack.start_worker(
        app="bench.naive", concurrency=concurrency, queues=None, log_level=None
    )
    stack.wait_for_worker(worker)
    collector = Collector()
    receiver = start_receiver(secret, collector)
    celery = naive.create_app(stack.redis_url)
    job_ids = [f"naive{i}" for i in range(len(bodies))]
    try:
        stack.emulator("/_emulator/reset", method="POST")
        with InFlightSampler(stack) as sampler:
            started = time.time()
            with celery.producer_or_acquire() as producer:
                for job_id, body in zip(job_ids, bodies, strict=True):
                    celery.send_task(
                        naive.TASK_NAME, args=(job_id, body, receiver.url), producer=producer
                    )
            enqueued_in = time.time() - started
            time.sleep(max(0.0, started + window_s - time.time()))
        worker.stop(timeout_s=1)  # the held jobs are abandoned: the window is over
        events = [e for e in collector.events(job_ids) if e.received_at <= started + window_s]
        rejected = len(receiver.rejected)
    finally:
        receiver.stop()
        celery.close()
    return NaiveWindow(events, enqueued_in, sampler.peak_in_progress, rejected)


def run(sizes: Sizes, base: Path, gateway: ScaleOutcome | None) -> list[Row]:
    n, conc, window = sizes.scale_jobs, sizes.scale_concurrency, sizes.baseline_window_s
    secret = new_webhook_secret()
    with phase_stack(
        "baseline", base, run_s=sizes.scale_run_s, NAIVE_WEBHOOK_SECRET=secret
    ) as stack:
        say(f"baseline: enqueue {n} naive jobs, worker -c {conc}, window {window:.0f} s")
        done = run_naive_window(
            stack, secret, [sample_job_body(stack.emulator_url)] * n,
            concurrency=conc, window_s=window,
        )  # fmt: skip
    events, enqueued_in, rejected = done.events, done.enqueued_in_s, done.rejected
    finished = len(events)
    projected = n / finished * window if finished else math.inf
    cycle = [e.received_at - e.payload["data"]["started_at"] for e in events]
    mean_cycle = sum(cycle) / len(cycle) if cycle else math.nan
    cross_check = math.ceil(n / conc) * mean_cycle
    calls = [e.payload["data"]["upstream_calls"] for e in events]
    rows = [
        Row("baseline", f"naive: jobs finished in a {window:.0f} s window ({n} enqueued in "
            f"{enqueued_in:.1f} s, -c {conc}, {sizes.scale_run_s:.0f} s upstream)",
            f"{finished} / {n}"),
        Row("baseline", "naive: peak in flight at RunComfy (in_progress)",
            fmt(done.peak_in_progress, "", 0), f"= {conc} (one per slot)",
            "yes" if done.peak_in_progress == conc else "no"),
        Row("baseline", f"naive: projected time for all {n} ({n} / finished x window)",
            fmt(projected, "s", 0)),
        Row("baseline", f"naive: cross-check ⌈{n}/{conc}⌉ x mean job time ({fmt(mean_cycle, 's', 1)})",
            fmt(cross_check, "s", 0)),
        Row("baseline", "naive: upstream calls per finished job",
            fmt(sum(calls) / len(calls) if calls else math.nan, "", 2)),
        Row("baseline", "naive: rejected signatures", fmt(rejected, "", 0), "0",
            "yes" if rejected == 0 else "no"),
    ]  # fmt: skip
    speed_up = (
        fmt(projected / gateway.all_done_s, "x", 1)
        if gateway is not None and math.isfinite(gateway.all_done_s)
        else "n/a (the scale phase did not finish every job)"
    )
    rows.append(
        Row("baseline", f"gateway speed-up for {n} jobs (naive projected / gateway burst batch, "
            "first POST → last webhook)",
            speed_up)
    )  # fmt: skip
    return rows
