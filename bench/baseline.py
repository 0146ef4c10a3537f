"""Phase 4, baseline: the scale run against the naive design (bench/naive.py), same concurrency.

Its own Redis and emulator (runs of 20 s), `celery -A bench.naive worker -c N` (N = the scale phase's worker concurrency), and the same
number of jobs enqueued at once. It would take hours to finish, so it runs for a fixed
window; the figures are what finished in it, the peak in flight at the emulator, and the time
all the jobs would take at that pace.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

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
from cli.stack import sample_job_body
from core.clients import new_webhook_secret


def run(sizes: Sizes, base: Path, gateway: ScaleOutcome | None) -> list[Row]:
    n, conc, window = sizes.scale_jobs, sizes.scale_concurrency, sizes.baseline_window_s
    secret = new_webhook_secret()
    with phase_stack(
        "baseline", base, run_s=sizes.scale_run_s, NAIVE_WEBHOOK_SECRET=secret
    ) as stack:
        broker_url = stack.redis_url
        worker = stack.start_worker(
            app="bench.naive", concurrency=conc, queues=None, log_level=None
        )
        stack.wait_for_worker(worker)
        collector = Collector()
        receiver = start_receiver(secret, collector)
        celery = naive.create_app(broker_url)
        try:
            body = sample_job_body(stack.emulator_url)
            stack.emulator("/_emulator/reset", method="POST")
            say(f"baseline: enqueue {n} naive jobs, worker -c {conc}, window {window:.0f} s")
            with InFlightSampler(stack) as sampler:
                started = time.time()
                with celery.producer_or_acquire() as producer:
                    for i in range(n):
                        celery.send_task(
                            naive.TASK_NAME, args=(f"naive{i}", body, receiver.url),
                            producer=producer,
                        )  # fmt: skip
                enqueued_in = time.time() - started
                time.sleep(max(0.0, started + window - time.time()))
            worker.stop(timeout_s=1)  # the held jobs are abandoned: the window is over
            events = [
                e for e in collector.events(f"naive{i}" for i in range(n))
                if e.received_at <= started + window
            ]  # fmt: skip
            rejected = len(receiver.rejected)
        finally:
            receiver.stop()
            celery.close()
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
            fmt(sampler.peak_in_progress, "", 0), f"= {conc} (one per slot)",
            "yes" if sampler.peak_in_progress == conc else "no"),
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
