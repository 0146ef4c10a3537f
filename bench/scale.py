"""Phase 3, scale: thousands of jobs in flight at once, each 20 s upstream, on one worker host.

Same stack as the pipeline phase, but the emulator's runs take 20 s (--queue-s 0 --run-s 20),
RUNCOMFY_MAX_IN_FLIGHT / RUNCOMFY_MAX_RPS are raised out of the way (3000), and the one worker
process runs -c 2 (one per core; the issue allows up to 8).

First a few warm-up jobs of the same shape run to the end, as on a gateway that has been serving
this model: it has learned the run time and polls when a run should be done. Their own latency is
reported as the cold start (nothing learned yet: 2 s polling).

Then two batches of N jobs, each waited for to its last verified webhook:
- steady: POSTed evenly over SCALE_POST_S (15 s, shorter than a run), so all N are in flight at
  once at the end of it, arriving — and finishing — at N / 15 s, a little above the N / 20 s that
  keeping N jobs of 20 s in flight takes (Little's law). The targets are held against this batch.
- burst: all N POSTed as fast as the API takes them, so they all finish within a second or two of
  each other: the worst case, what the naive baseline is compared with, and what PRODUCT §8's
  burst targets are held against (time to result p99 ≤ 3 s, ≤ 5 ms of worker CPU per job, the
  CPU measured over this batch alone).

The added latency of a job is when its webhook arrived minus when the emulator finished its run
(`finished_at` of the request's /result, on the same clock).
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.common import (
    Collector,
    InFlightSampler,
    Poster,
    Row,
    Sizes,
    cpu_meter,
    cpu_rows,
    explain_missing,
    fmt,
    group_rss_bytes,
    group_size,
    judged,
    percentile,
    phase_stack,
    post_jobs,
    say,
    start_receiver,
    used_memory,
)
from cli.stack import Stack, sample_job_body
from core.clients import ClientStore
from core.metrics import Counters
from core.settings import Settings

TARGET_P50_S = 0.5
TARGET_P99_S = 1.5
# PRODUCT §8's burst: 2,000 jobs finishing within seconds of each other on one worker host.
BURST_TARGET_P99_S = 3.0
BURST_TARGET_CPU_MS = 5.0
MAX_CONCURRENCY = 8
FIXED_POLL_S = 2.0  # RunComfy's own clients


@dataclass
class ScaleOutcome:
    """What the baseline phase compares against."""

    jobs: int
    all_done_s: float


@dataclass
class Batch:
    """One batch of jobs run to their webhooks, and what it measured."""

    posted_in_s: float
    last_webhook_s: float  # first POST -> last webhook
    all_came: bool
    succeeded: int
    peak_in_progress: int
    calls: dict[str, int]
    after_finish: list[float]  # webhook received - upstream finished_at
    seen_after: list[float]  # the gateway saw it final - upstream finished_at
    delivered_after: list[float]  # webhook received - the gateway saw it final
    end_to_end: list[float]  # received - posted - upstream queue+run
    to_upstream: list[float]  # upstream created_at - posted: accepted, dispatched, submitted


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _upstream_results(stack: Stack, events: list[Any]) -> list[dict[str, Any]]:
    """The emulator's /result of each event's request (its created_at and finished_at)."""
    with ThreadPoolExecutor(8) as pool:
        return list(
            pool.map(
                lambda e: stack.emulator(
                    f"/v1/requests/{e.payload['data']['upstream']['request_id']}/result"
                ).json(),
                events,
            )
        )


def after_finish(stack: Stack, events: list[Any]) -> list[float]:
    """Webhook received minus upstream finished_at, per event."""
    results = _upstream_results(stack, events)
    return [e.received_at - _ts(r["finished_at"]) for e, r in zip(events, results, strict=True)]


def run(sizes: Sizes, base: Path) -> tuple[list[Row], ScaleOutcome]:
    n, conc = sizes.scale_jobs, sizes.scale_concurrency
    # Preflight off (INPUT_FORWARD=url): this phase compares how each design follows runs to
    # their end, and the naive design it is set beside fetches no pictures; what the preflight
    # adds is the preflight phase's figure.
    with phase_stack(
        "scale", base, run_s=sizes.scale_run_s,
        RUNCOMFY_MAX_IN_FLIGHT="3000", RUNCOMFY_MAX_RPS="3000", INPUT_FORWARD="url",
    ) as stack:  # fmt: skip
        stack.start_api()
        stack.start_beat()  # boots while the worker does: its start-up is not counted
        worker = stack.start_worker(concurrency=conc, log_level=None)
        stack.wait_for_worker(worker)
        client = stack.redis()
        creds = ClientStore(client).create("bench-scale")
        collector = Collector()
        receiver = start_receiver(creds.webhook_secret, collector)
        try:
            poster = Poster(stack.api_url, {"Authorization": f"Bearer {creds.api_key}"})

            def bodies(count: int) -> list[dict[str, Any]]:
                return [sample_job_body(stack.emulator_url, receiver.url) for _ in range(count)]

            warmup = post_jobs(poster, bodies(sizes.scale_warmup_jobs), threads=4)
            say(f"scale: warm-up, {len(warmup)} jobs to the end (learns the run time)")
            warmup_ids = [job_id for job_id, _ in warmup]
            if not collector.wait_for(warmup_ids, sizes.scale_run_s + 60):
                raise RuntimeError("scale: warm-up jobs did not finish")
            cold = after_finish(stack, collector.events(warmup_ids))

            memory_before = used_memory(client)
            cpu = cpu_meter(stack)
            cpu.start()
            say(f"scale: steady, {n} jobs POSTed over {sizes.scale_post_s:.0f} s, each "
                f"{sizes.scale_run_s:.0f} s upstream, worker -c {conc}")  # fmt: skip
            steady = run_batch(stack, poster, collector, bodies(n), sizes, sizes.scale_post_s)
            cpu.stop()
            rss, processes = group_rss_bytes(worker), group_size(worker)
            time.sleep(2)  # client and AOF buffers of the last burst drain (MBs at 2,000 jobs)
            memory_after = used_memory(client)

            say(f"scale: burst, {n} jobs POSTed as fast as the API takes them")
            burst_cpu = cpu_meter(stack)
            burst_cpu.start()
            burst = run_batch(stack, poster, collector, bodies(n), sizes, None)
            burst_cpu.stop()
            rejected = len(receiver.rejected)
            counts = Counters(client).read()
        finally:
            receiver.stop()
            client.close()

    # The worker's environment is this process's (bench.common passes it through).
    receiver_cap = os.environ.get("WEBHOOK_RECEIVER_CONCURRENCY") or (
        f"{Settings.webhook_receiver_concurrency} (default)"
    )
    fixed_poll_calls = 1 + math.ceil(sizes.scale_run_s / FIXED_POLL_S) + 1
    per_job_calls = sum(steady.calls.values()) / n
    p50, p99 = percentile(steady.after_finish, 50), percentile(steady.after_finish, 99)
    burst_p99 = percentile(burst.after_finish, 99)
    burst_done = burst.all_came and burst.succeeded == n
    outcome = ScaleOutcome(n, burst.last_webhook_s if burst_done else float("nan"))
    both_finished = burst_done and steady.all_came and steady.succeeded == n
    return [
        Row("scale", f"jobs finished (verified job.succeeded), steady / burst, "
            f"{sizes.scale_run_s:.0f} s upstream each", f"{steady.succeeded} / {burst.succeeded}"
            f" of {n} each", f"all, worker -c ≤ {MAX_CONCURRENCY}",
            judged(both_finished and conc <= MAX_CONCURRENCY)),
        Row("scale", "worker concurrency vs peak in flight at RunComfy (in_progress), steady / "
            "burst", f"{conc} vs {steady.peak_in_progress} / {burst.peak_in_progress}",
            f"{n} in flight at once", judged(min(steady.peak_in_progress,
                                                  burst.peak_in_progress) >= n)),
        Row("scale", f"steady: time to POST all {n} / first POST → last webhook",
            f"{fmt(steady.posted_in_s, 's', 1)} / {fmt(steady.last_webhook_s, 's', 1)}"),
        Row("scale", "steady: added latency p50 (webhook received - upstream finished_at)",
            fmt(p50, "s", 2), f"≤ {TARGET_P50_S} s", judged(p50 <= TARGET_P50_S)),
        Row("scale", "steady: added latency p99", fmt(p99, "s", 2), f"≤ {TARGET_P99_S} s",
            judged(p99 <= TARGET_P99_S)),
        Row("scale", "steady: added latency max",
            fmt(max(steady.after_finish, default=math.nan), "s", 2)),
        Row("scale", "steady: of it, p50 / p99 until the gateway saw it final (poll)",
            _p50_p99(steady.seen_after)),
        Row("scale", "steady: of it, p50 / p99 from then to the webhook received (delivery)",
            _p50_p99(steady.delivered_after)),
        Row("scale", "steady: end to end added p50 / p99 (received - posted - upstream "
            "queue+run)", _p50_p99(steady.end_to_end)),
        Row("scale", "steady: of it, p50 / p99 from the POST sent to RunComfy's created_at "
            "(the API's answer, dispatch, the submit call)", _p50_p99(steady.to_upstream)),
        Row("scale", "steady: upstream calls per job (submit + status + result)",
            f"{fmt(per_job_calls, '', 2)} ({steady.calls.get('submit', 0)} + "
            f"{steady.calls.get('status', 0)} + {steady.calls.get('result', 0)})",
            f"≤ {fixed_poll_calls:.0f} (fixed 2 s polling)",
            judged(per_job_calls <= fixed_poll_calls)),
        Row("scale", "steady: Redis bytes per job, finished jobs kept: used_memory delta "
            "(of it dataset)", f"{fmt((memory_after[0] - memory_before[0]) / n, 'B', 0)} "
            f"({fmt((memory_after[1] - memory_before[1]) / n, 'B', 0)})"),
        Row("scale", f"steady: worker RSS at the end ({processes} processes)",
            fmt(rss / 2**20, "MiB", 1)),
        *cpu_rows("scale", cpu, n, prefix="steady: "),
        Row("scale", f"burst: time to POST all {n} / first POST → last webhook",
            f"{fmt(burst.posted_in_s, 's', 1)} / {fmt(burst.last_webhook_s, 's', 1)}"),
        Row("scale", "burst: added latency p50 / p99 (all finish within "
            f"~{fmt(burst.posted_in_s, 's', 0)} of each other)", _p50_p99(burst.after_finish)),
        Row("scale", "burst: time to result p99 (PRODUCT §8)",
            fmt(burst_p99, "s", 2), f"≤ {BURST_TARGET_P99_S:g} s",
            judged(burst_p99 <= BURST_TARGET_P99_S)),
        Row("scale", "burst: of it, p50 / p99 until the gateway saw it final / to the webhook",
            f"{_p50_p99(burst.seen_after)}; {_p50_p99(burst.delivered_after)}"),
        *cpu_rows("scale", burst_cpu, n, prefix="burst: "),
        Row("scale", "burst: worker CPU per job (PRODUCT §8)",
            fmt(burst_cpu.per_job_ms(n)["worker"], "ms", 2), f"≤ {BURST_TARGET_CPU_MS:g} ms",
            judged(burst_cpu.per_job_ms(n)["worker"] <= BURST_TARGET_CPU_MS)),
        Row("scale", f"cold start: added latency p50 / p99 of the {len(cold)} warm-up jobs "
            "(nothing learned yet: 2 s polling)", _p50_p99(cold)),
        Row("scale", "webhook attempts made / times one waited in the receiver's line first / "
            "places handed straight to the next in line (all batches; one receiver, "
            f"WEBHOOK_RECEIVER_CONCURRENCY={receiver_cap})",
            f"{counts['webhook_attempts']} / {counts['webhook_attempts_waited']} / "
            f"{counts['webhook_places_handed_over']}"),
        Row("scale", "rejected signatures / duplicate deliveries (all batches)",
            f"{rejected} / {collector.duplicates}", "0 / 0",
            judged(rejected == 0 and collector.duplicates == 0)),
    ], outcome  # fmt: skip


def run_batch(
    stack: Stack,
    poster: Poster,
    collector: Collector,
    bodies: list[dict[str, Any]],
    sizes: Sizes,
    over_s: float | None,
) -> Batch:
    """POST `bodies` (evenly over `over_s`, or as fast as taken), wait for every webhook."""
    stack.emulator("/_emulator/reset", method="POST")  # per-batch call counts
    with InFlightSampler(stack) as sampler:
        started = time.time()
        posted = post_jobs(poster, bodies, threads=32, over_s=over_s)
        posted_in = time.time() - started
        say(f"scale: {len(posted)} accepted in {posted_in:.1f} s; waiting for the webhooks")
        job_ids = [job_id for job_id, _ in posted]
        all_came = collector.wait_for(job_ids, sizes.scale_cap_s)
    calls: dict[str, int] = stack.emulator("/_emulator/stats").json()["calls"]
    if not all_came:
        say(f"{stack.name}: " + explain_missing(poster, job_ids, collector))
    events = collector.events(job_ids)
    results = _upstream_results(stack, events)
    posted_at = dict(posted)
    batch = Batch(
        posted_in_s=posted_in,
        last_webhook_s=max((e.received_at for e in events), default=math.nan) - started,
        all_came=all_came,
        succeeded=sum(1 for e in events if e.payload.get("type") == "job.succeeded"),
        peak_in_progress=sampler.peak_in_progress,
        calls=calls,
        after_finish=[],
        seen_after=[],
        delivered_after=[],
        end_to_end=[],
        to_upstream=[],
    )
    for event, result in zip(events, results, strict=True):
        finished, created = _ts(result["finished_at"]), _ts(result["created_at"])
        seen = _ts(event.payload["data"]["finished_at"])  # the gateway's own clock
        batch.after_finish.append(event.received_at - finished)
        batch.seen_after.append(seen - finished)
        batch.delivered_after.append(event.received_at - seen)
        job_id = event.payload["data"]["id"]
        batch.end_to_end.append(event.received_at - posted_at[job_id] - (finished - created))
        batch.to_upstream.append(created - posted_at[job_id])
    return batch


def _p50_p99(values: list[float]) -> str:
    return f"{fmt(percentile(values, 50), 's', 2)} / {fmt(percentile(values, 99), 's', 2)}"
