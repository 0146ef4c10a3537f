"""Phase 2, pipeline: jobs/s from POST to verified webhook with zero upstream latency.

The whole stack on one worker host: Redis (AOF), the emulator answering at once (--queue-s 0
--run-s 0), gunicorn, ONE Celery worker process (-c 4), beat, and a webhook receiver that
verifies every Standard Webhooks signature with the client's secret. RUNCOMFY_MAX_IN_FLIGHT and
RUNCOMFY_MAX_RPS are raised out of the way (3000). Jobs are POSTed over real HTTP from a thread
pool; the clock runs from the first POST to the last verified webhook.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench.common import (
    Collector,
    Poster,
    Row,
    Sizes,
    cpu_meter,
    cpu_rows,
    explain_missing,
    fmt,
    judged,
    phase_stack,
    post_jobs,
    say,
    start_receiver,
)
from cli.stack import sample_job_body
from core.clients import ClientStore


def run(sizes: Sizes, base: Path) -> list[Row]:
    n = sizes.pipeline_jobs
    # The caps toward RunComfy (defaults: 32 in flight, 50 calls/s) are operator settings
    # that would be the figure here (~25 jobs/s at two calls a job); out of the way, as in
    # the scale phase, this measures the gateway itself.
    with phase_stack(
        "pipeline", base, run_s=0, RUNCOMFY_MAX_IN_FLIGHT="3000", RUNCOMFY_MAX_RPS="3000"
    ) as stack:
        stack.start_api()
        stack.start_beat()  # boots while the worker does: its start-up is not counted
        worker = stack.start_worker(concurrency=sizes.pipeline_concurrency, log_level=None)
        stack.wait_for_worker(worker)
        client = stack.redis()
        creds = ClientStore(client).create("bench-pipeline")
        client.close()
        collector = Collector()
        receiver = start_receiver(creds.webhook_secret, collector)
        try:
            poster = Poster(stack.api_url, {"Authorization": f"Bearer {creds.api_key}"})
            bodies = [sample_job_body(stack.emulator_url, receiver.url) for _ in range(n)]
            cpu = cpu_meter(stack)
            cpu.start()
            say(f"pipeline: POST {n} jobs (worker -c {sizes.pipeline_concurrency}, run 0 s)")
            started = time.time()
            posted = post_jobs(poster, bodies)
            posted_in = time.time() - started
            job_ids = [job_id for job_id, _ in posted]
            all_came = collector.wait_for(job_ids, sizes.pipeline_cap_s)
            events = collector.events(job_ids)
            cpu.stop()
            calls: dict[str, int] = stack.emulator("/_emulator/stats").json()["calls"]
            last = max((e.received_at for e in events), default=time.time())
            rejected = len(receiver.rejected)
            if not all_came:
                say(f"{stack.name}: " + explain_missing(poster, job_ids, collector))
        finally:
            receiver.stop()
    if not all_came:
        say(f"pipeline: only {len(events)} of {n} webhooks within {sizes.pipeline_cap_s:.0f} s")
    succeeded = sum(1 for e in events if e.payload.get("type") == "job.succeeded")
    elapsed = last - started
    return [
        Row("pipeline", f"jobs/s, first POST → last verified webhook ({n} jobs, upstream 0 s, "
            f"1 worker -c {sizes.pipeline_concurrency}, caps toward RunComfy raised)",
            fmt(n / elapsed, "jobs/s", 1)),
        Row("pipeline", "upstream calls per job (submit + status + result)",
            f"{fmt(sum(calls.values()) / n, '', 2)} ({calls.get('submit', 0)} + "
            f"{calls.get('status', 0)} + {calls.get('result', 0)})"),
        Row("pipeline", "verified job.succeeded webhooks / jobs", f"{succeeded} / {n}",
            "all", judged(succeeded == n)),
        Row("pipeline", "rejected signatures / duplicate deliveries",
            f"{rejected} / {collector.duplicates}", "0 / 0",
            judged(rejected == 0 and collector.duplicates == 0)),
        Row("pipeline", f"time to POST all {n} (while the worker runs)", fmt(posted_in, "s", 1)),
        *cpu_rows("pipeline", cpu, n),
    ]  # fmt: skip
