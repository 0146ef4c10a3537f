"""Phase 9, variance: time to result when run times vary, at 40, 200 and 2,000 jobs in flight.

PRODUCT §8's runs: half take 20 s plus a random 0-2 s, half 5 s plus 0-1 s (the emulator's
`run-spread` directive), two shapes (20 and 8 steps) the poller learns apart. Two designs on the
same stack settings, one after the other: the gateway, and the gateway polling every 2 s like
RunComfy's own clients (`bench/fixed_polling.py`: the same code but for its two timing
decisions). Each first runs warm-up jobs of both shapes to the end (the gateway learns their
windows, as one that has been serving this model has), then, per size, POSTs the jobs evenly
over a few seconds — shorter than the shortest run, so they are all in flight at once — and
waits for every verified webhook. Time to result is the webhook received minus RunComfy's
`finished_at`; calls per job are the emulator's counts.

Then the naive design (`bench/naive.py`: a task per job, sleeping 2 s between polls) at the same
worker concurrency, on the same runs: it holds one job per worker slot however many are sent, so
it runs for a window (it would take hours); the figures are the jobs finished in it, their time
to result and calls, and how long each size would take at that pace.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.baseline import run_naive_window
from bench.common import (
    Collector,
    Poster,
    Row,
    Sizes,
    fmt,
    percentile,
    phase_stack,
    post_jobs,
    say,
    start_receiver,
)
from bench.scale import after_finish, run_batch
from cli.stack import sample_job_body
from core.clients import ClientStore, new_webhook_secret

# (steps, run s, spread s): the shapes and runs PRODUCT §8 names.
SHAPES = ((20, 20.0, 2.0), (8, 5.0, 1.0))
DESIGNS = (("gateway", "workers"), ("fixed 2 s polling", "bench.fixed_polling"))
TARGET_P50_S, TARGET_P99_S, TARGET_AT = 0.3, 1.0, 200


@dataclass(frozen=True)
class Outcome:
    """One design at one size."""

    design: str
    in_flight: int
    after_finish: list[float]
    calls_per_job: float
    succeeded: int


def _body(
    emulator_url: str, receiver_url: str, index: int, tag: str, time_scale: float
) -> dict[str, Any]:
    steps, run_s, spread_s = SHAPES[index % len(SHAPES)]
    prompt = (
        f"variance {tag} {index} [emulator:queue=0][emulator:run={run_s * time_scale:g}]"
        f"[emulator:run-spread={spread_s * time_scale:g}]"
    )
    return sample_job_body(emulator_url, receiver_url, prompt) | {"num_inference_steps": steps}


def _design(sizes: Sizes, base: Path, design: str, app: str) -> list[Outcome]:
    with phase_stack(
        f"variance-{app}",
        base,
        run_s=0,
        RUNCOMFY_MAX_IN_FLIGHT="3000",
        RUNCOMFY_MAX_RPS="3000",
        INPUT_FORWARD="url",
    ) as stack:
        stack.start_api()
        stack.start_beat()
        worker = stack.start_worker(concurrency=sizes.scale_concurrency, app=app, log_level=None)
        stack.wait_for_worker(worker)
        client = stack.redis()
        creds = ClientStore(client).create(f"bench-variance-{app}")
        client.close()
        collector = Collector()
        receiver = start_receiver(creds.webhook_secret, collector)
        outcomes = []
        try:
            poster = Poster(stack.api_url, {"Authorization": f"Bearer {creds.api_key}"})

            def bodies(count: int, tag: str) -> list[dict[str, Any]]:
                return [
                    _body(stack.emulator_url, receiver.url, i, tag, sizes.variance_time_scale)
                    for i in range(count)
                ]

            warmup = post_jobs(poster, bodies(sizes.variance_warmup_jobs, "warm-up"), threads=8)
            say(f"variance: {design}: {len(warmup)} warm-up jobs to the end")
            if not collector.wait_for([j for j, _ in warmup], 60):
                raise RuntimeError("variance: warm-up jobs did not finish")
            for in_flight in sizes.variance_in_flight:
                say(f"variance: {design}: {in_flight} in flight")
                batch = run_batch(
                    stack,
                    poster,
                    collector,
                    bodies(in_flight, f"n{in_flight}"),
                    sizes,
                    sizes.variance_post_s,
                )
                calls = sum(batch.calls.values()) / in_flight
                outcomes.append(
                    Outcome(design, in_flight, batch.after_finish, calls, batch.succeeded)
                )
        finally:
            receiver.stop()
    return outcomes


@dataclass(frozen=True)
class NaiveOutcome:
    """The naive design's window: what finished in it, of `sent`."""

    sent: int
    window_s: float
    after_finish: list[float]
    calls: list[int]
    peak_in_progress: int


def _naive(sizes: Sizes, base: Path) -> NaiveOutcome:
    n, window = min(sizes.variance_in_flight), sizes.variance_naive_window_s
    secret = new_webhook_secret()
    with phase_stack("variance-naive", base, run_s=0, NAIVE_WEBHOOK_SECRET=secret) as stack:
        say(f"variance: naive design: {n} jobs sent, worker -c {sizes.scale_concurrency}, "
            f"window {window:.0f} s")  # fmt: skip
        bodies = [
            _body(stack.emulator_url, "", i, "naive", sizes.variance_time_scale) for i in range(n)
        ]
        for body in bodies:
            body.pop("webhook_url")  # the task is given it apart: not a model field
        done = run_naive_window(
            stack, secret, bodies, concurrency=sizes.scale_concurrency, window_s=window
        )
        finished = after_finish(stack, done.events)
    calls = [int(e.payload["data"]["upstream_calls"]) for e in done.events]
    return NaiveOutcome(n, window, finished, calls, done.peak_in_progress)


def _naive_rows(sizes: Sizes, outcome: NaiveOutcome) -> list[Row]:
    done = len(outcome.after_finish)
    p50, p99 = percentile(outcome.after_finish, 50), percentile(outcome.after_finish, 99)
    calls = sum(outcome.calls) / done if done else math.nan
    pace = ", ".join(
        f"{size}: {fmt(size / done * outcome.window_s if done else math.inf, 's', 0)}"
        for size in sizes.variance_in_flight
    )
    return [
        Row("variance", f"naive design (-c {sizes.scale_concurrency}), {outcome.sent} sent: at "
            f"most {outcome.peak_in_progress} in flight; of the {done} finished in "
            f"{outcome.window_s:.0f} s, time to result p50 / p99, upstream calls per job",
            f"{fmt(p50, '', 2)} / {fmt(p99, 's', 2)}; {fmt(calls, '', 2)} calls"),
        Row("variance", "naive design: time all of each size would take at that pace", pace),
    ]  # fmt: skip


def run(sizes: Sizes, base: Path) -> list[Row]:
    outcomes = [
        outcome
        for design, app in DESIGNS
        for outcome in _design(sizes, base / app.replace(".", "-"), design, app)
    ]
    naive_outcome = _naive(sizes, base / "naive")
    rows = []
    for o in outcomes:
        p50, p99 = percentile(o.after_finish, 50), percentile(o.after_finish, 99)
        judged_here = o.design == "gateway" and o.in_flight == TARGET_AT
        rows.append(
            Row(
                "variance",
                f"{o.design}, {o.in_flight} in flight: time to result p50 / p99 (webhook - "
                f"RunComfy's finished_at), upstream calls per job; succeeded {o.succeeded} / "
                f"{o.in_flight}",
                f"{fmt(p50, '', 2)} / {fmt(p99, 's', 2)}; {fmt(o.calls_per_job, '', 2)} calls",
                f"≤ {TARGET_P50_S} / {TARGET_P99_S} s; < fixed 2 s polling" if judged_here else "—",
                (
                    "yes"
                    if p50 <= TARGET_P50_S
                    and p99 <= TARGET_P99_S
                    and o.calls_per_job < _calls_of(outcomes, "fixed 2 s polling", o.in_flight)
                    else "**NO**"
                )
                if judged_here
                else "—",
            )
        )
    return rows + _naive_rows(sizes, naive_outcome)


def _calls_of(outcomes: list[Outcome], design: str, in_flight: int) -> float:
    found = [o.calls_per_job for o in outcomes if o.design == design and o.in_flight == in_flight]
    return found[0] if found else math.inf
