"""Phase 3, scale: thousands of jobs in flight at once, each 20 s upstream, on one worker host.

Same stack as the pipeline phase, but the emulator's runs take 20 s (--queue-s 0 --run-s 20),
RUNCOMFY_MAX_IN_FLIGHT / RUNCOMFY_MAX_RPS are raised out of the way (3000), and the one worker
process runs -c 2 (one per core; the issue allows up to 8).

First a few warm-up jobs of the same shape run to the end, as on a gateway that has been serving
this model: it has learned the run time and polls when a run should be done. Their own latency is
reported as the cold start (nothing learned yet: 2 s polling). Then all jobs are POSTed as fast as
possible and the phase waits for every verified webhook. The added latency of a job is when its
webhook arrived minus when the emulator finished its run (`finished_at` of the request's /result,
on the same clock).
"""

from __future__ import annotations

import math
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
    Stack,
    cpu_rows,
    explain_missing,
    fmt,
    group_rss_bytes,
    group_size,
    job_body,
    judged,
    percentile,
    post_jobs,
    say,
    start_receiver,
    used_memory,
)
from core.clients import ClientStore

TARGET_P50_S = 0.5
TARGET_P99_S = 1.5
MAX_CONCURRENCY = 8
FIXED_POLL_S = 2.0  # RunComfy's own clients


@dataclass
class ScaleOutcome:
    """What the baseline phase compares against."""

    jobs: int
    all_done_s: float


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _upstream_results(stack: Stack, events: list[Any]) -> list[dict[str, Any]]:
    """The emulator's /result of each event's request (its created_at and finished_at)."""
    with ThreadPoolExecutor(8) as pool:
        return list(
            pool.map(
                lambda e: stack.emulator(
                    "GET", f"/v1/requests/{e.payload['data']['upstream']['request_id']}/result"
                ),
                events,
            )
        )


def _after_finish(stack: Stack, events: list[Any]) -> list[float]:
    """Webhook received minus upstream finished_at, per event."""
    results = _upstream_results(stack, events)
    return [e.received_at - _ts(r["finished_at"]) for e, r in zip(events, results, strict=True)]


def run(sizes: Sizes, base: Path) -> tuple[list[Row], ScaleOutcome]:
    n, conc = sizes.scale_jobs, sizes.scale_concurrency
    with Stack("scale", base) as stack:
        stack.start_redis()
        stack.start_emulator(0, sizes.scale_run_s)
        stack.make_env(RUNCOMFY_MAX_IN_FLIGHT="3000", RUNCOMFY_MAX_RPS="3000")
        stack.start_api()
        stack.start_beat()  # boots while the worker does: its start-up is not counted
        worker = stack.start_worker("workers", conc, "jobs,webhooks")
        client = stack.redis()
        creds = ClientStore(client).create("bench-scale")
        collector = Collector()
        receiver = start_receiver(creds.webhook_secret, collector)
        try:
            poster = Poster(stack.api_url, {"Authorization": f"Bearer {creds.api_key}"})
            bodies = [
                job_body(stack.emulator_url, receiver.url)
                for _ in range(n + sizes.scale_warmup_jobs)
            ]
            warmup = post_jobs(poster, bodies[: sizes.scale_warmup_jobs], threads=4)
            say(f"scale: warm-up, {len(warmup)} jobs to the end (learns the run time)")
            warmup_ids = [job_id for job_id, _ in warmup]
            if not collector.wait_for(warmup_ids, sizes.scale_run_s + 60):
                raise RuntimeError("scale: warm-up jobs did not finish")
            cold = _after_finish(stack, collector.events(warmup_ids))
            stack.emulator("POST", "/_emulator/reset")
            memory_before = used_memory(client)
            cpu = stack.cpu_meter()
            cpu.start()
            say(f"scale: POST {n} jobs, each {sizes.scale_run_s:.0f} s upstream, worker -c {conc}")
            with InFlightSampler(stack) as sampler:
                started = time.time()
                posted = post_jobs(poster, bodies[sizes.scale_warmup_jobs :], threads=32)
                posted_in = time.time() - started
                say(f"scale: {n} accepted in {posted_in:.1f} s; waiting for the webhooks")
                job_ids = [job_id for job_id, _ in posted]
                all_came = collector.wait_for(job_ids, sizes.scale_cap_s)
            cpu.stop()
            rss, processes = group_rss_bytes(worker), group_size(worker)
            time.sleep(2)  # client and AOF buffers of the last burst drain (MBs at 2,000 jobs)
            memory_after = used_memory(client)
            calls: dict[str, int] = stack.emulator("GET", "/_emulator/stats")["calls"]
            events = collector.events(job_ids)
            rejected = len(receiver.rejected)
            if not all_came:
                say(f"{stack.name}: " + explain_missing(poster, job_ids, collector))
            say(f"scale: {len(events)} / {n} webhooks; reading finish times from the emulator")
            results = _upstream_results(stack, events)
        finally:
            receiver.stop()
            client.close()

    posted_at = dict(posted)
    after_finish, end_to_end, seen_after, delivered_after = [], [], [], []
    for event, result in zip(events, results, strict=True):
        finished, created = _ts(result["finished_at"]), _ts(result["created_at"])
        after_finish.append(event.received_at - finished)
        seen = _ts(event.payload["data"]["finished_at"])  # the gateway's own clock
        seen_after.append(seen - finished)
        delivered_after.append(event.received_at - seen)
        job_id = event.payload["data"]["id"]
        end_to_end.append(event.received_at - posted_at[job_id] - (finished - created))
    succeeded = sum(1 for e in events if e.payload.get("type") == "job.succeeded")
    last = max((e.received_at for e in events), default=time.time())
    total_calls = sum(calls.values())
    per_job_calls = total_calls / n
    fixed_poll_calls = 1 + math.ceil(sizes.scale_run_s / FIXED_POLL_S) + 1
    p50, p99 = percentile(after_finish, 50), percentile(after_finish, 99)
    all_finished = succeeded == n and all_came
    outcome = ScaleOutcome(n, last - started if all_finished else float("nan"))
    return [
        Row("scale", f"jobs finished (verified job.succeeded), {n} posted at once, "
            f"{sizes.scale_run_s:.0f} s upstream each", f"{succeeded} / {n}",
            f"all, worker -c ≤ {MAX_CONCURRENCY}",
            judged(all_finished and conc <= MAX_CONCURRENCY)),
        Row("scale", "worker concurrency vs peak in flight at RunComfy (in_progress)",
            f"{conc} vs {sampler.peak_in_progress}"),
        Row("scale", f"time to POST all {n} / first POST → last webhook",
            f"{fmt(posted_in, 's', 1)} / {fmt(last - started, 's', 1)}"),
        Row("scale", "added latency p50 (webhook received - upstream finished_at)",
            fmt(p50, "s", 2), f"≤ {TARGET_P50_S} s", judged(p50 <= TARGET_P50_S)),
        Row("scale", "added latency p99", fmt(p99, "s", 2), f"≤ {TARGET_P99_S} s",
            judged(p99 <= TARGET_P99_S)),
        Row("scale", "added latency max", fmt(max(after_finish, default=float("nan")), "s", 2)),
        Row("scale", "of it, p50 / p99: upstream finished → gateway saw it (poll)",
            f"{fmt(percentile(seen_after, 50), 's', 2)} / {fmt(percentile(seen_after, 99), 's', 2)}"),
        Row("scale", "of it, p50 / p99: gateway saw it → webhook received (delivery)",
            f"{fmt(percentile(delivered_after, 50), 's', 2)} / "
            f"{fmt(percentile(delivered_after, 99), 's', 2)}"),
        Row("scale", f"cold start: added latency p50 / p99 of the {len(cold)} warm-up jobs "
            "(nothing learned yet: 2 s polling)",
            f"{fmt(percentile(cold, 50), 's', 2)} / {fmt(percentile(cold, 99), 's', 2)}"),
        Row("scale", "end to end added p50 / p99 (received - posted - upstream queue+run)",
            f"{fmt(percentile(end_to_end, 50), 's', 2)} / {fmt(percentile(end_to_end, 99), 's', 2)}"),
        Row("scale", "upstream calls per job (submit + status + result)",
            f"{fmt(per_job_calls, '', 2)} ({calls.get('submit', 0)} + {calls.get('status', 0)}"
            f" + {calls.get('result', 0)})",
            f"≤ {fixed_poll_calls:.0f} (fixed 2 s polling)",
            judged(per_job_calls <= fixed_poll_calls)),
        Row("scale", "Redis bytes per job, finished jobs kept: used_memory delta "
            "(of it dataset)", f"{fmt((memory_after[0] - memory_before[0]) / n, 'B', 0)} "
            f"({fmt((memory_after[1] - memory_before[1]) / n, 'B', 0)})"),
        Row("scale", f"worker RSS at the end ({processes} processes)",
            fmt(rss / 2**20, "MiB", 1)),
        Row("scale", "rejected signatures / duplicate deliveries",
            f"{rejected} / {collector.duplicates}", "0 / 0",
            judged(rejected == 0 and collector.duplicates == 0)),
        *cpu_rows("scale", cpu, n),
    ], outcome  # fmt: skip
