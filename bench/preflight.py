"""Phase 7, preflight: what checking and carrying the pictures adds to a caller's wait.

The same jobs twice, side by side, each on a stack of its own: once with INPUT_FORWARD=url (the
worker passes the two URLs through untouched: no fetch, no check), once with the default
INPUT_FORWARD=data (the worker fetches both pictures, decodes and checks them, and sends their
bytes to RunComfy as data URIs). The emulator runs each job for a fixed time, so POST → verified
webhook minus that run is what the gateway added; its difference between the two rounds is the
preflight's cost. Jobs are POSTed evenly over a few seconds, as steady traffic, not a burst.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    Collector,
    Poster,
    Row,
    Sizes,
    cpu_meter,
    explain_missing,
    fmt,
    judged,
    percentile,
    phase_stack,
    post_jobs,
    say,
    start_receiver,
)
from cli.stack import sample_job_body
from core.clients import ClientStore

MODES = (("url", "off"), ("data", "on"))  # INPUT_FORWARD, and what that makes of the preflight
MODES_BY_FORWARD = dict(MODES)


@dataclass(frozen=True)
class Round:
    """One mode's figures."""

    added_s: list[float]  # per job: POST → verified webhook, less the emulator's run
    succeeded: int
    worker_cpu_ms: float  # per job
    emulator_cpu_ms: float  # per job: decoding data URIs is RunComfy's work, not ours


def _round(sizes: Sizes, base: Path, forward: str) -> Round:
    n = sizes.preflight_jobs
    with phase_stack(
        f"preflight-{forward}",
        base,
        run_s=sizes.preflight_run_s,
        INPUT_FORWARD=forward,
        RUNCOMFY_MAX_IN_FLIGHT="3000",
        RUNCOMFY_MAX_RPS="3000",
    ) as stack:
        stack.start_api()
        stack.start_beat()
        worker = stack.start_worker(concurrency=sizes.pipeline_concurrency, log_level=None)
        stack.wait_for_worker(worker)
        client = stack.redis()
        creds = ClientStore(client).create(f"bench-preflight-{forward}")
        client.close()
        collector = Collector()
        receiver = start_receiver(creds.webhook_secret, collector)
        try:
            poster = Poster(stack.api_url, {"Authorization": f"Bearer {creds.api_key}"})
            bodies = [sample_job_body(stack.emulator_url, receiver.url) for _ in range(n)]
            cpu = cpu_meter(stack)
            cpu.start()
            label = MODES_BY_FORWARD[forward]
            say(f"preflight {label}: POST {n} jobs over {sizes.preflight_post_s:g} s")
            posted = post_jobs(poster, bodies, over_s=sizes.preflight_post_s)
            all_came = collector.wait_for([j for j, _ in posted], sizes.pipeline_cap_s)
            cpu.stop()
            if not all_came:
                say(f"{stack.name}: " + explain_missing(poster, [j for j, _ in posted], collector))
        finally:
            receiver.stop()
    by_job = {e.payload["data"]["id"]: e for e in collector.events(j for j, _ in posted)}
    added = [
        by_job[job_id].received_at - sent - sizes.preflight_run_s
        for job_id, sent in posted
        if job_id in by_job
    ]
    succeeded = sum(1 for e in by_job.values() if e.payload.get("type") == "job.succeeded")
    ms = cpu.per_job_ms(n)
    return Round(added, succeeded, ms["worker"], ms["emulator"])


def run(sizes: Sizes, base: Path) -> list[Row]:
    rounds = {forward: _round(sizes, base / forward, forward) for forward, _ in MODES}
    off, on = rounds["url"], rounds["data"]
    n = sizes.preflight_jobs
    rows = [
        Row(
            "preflight",
            f"time added by the gateway, p50 / p99: POST → verified webhook less the "
            f"{sizes.preflight_run_s:g} s run ({n} jobs over {sizes.preflight_post_s:g} s), "
            f"preflight {label} (INPUT_FORWARD={forward})",
            f"{fmt(percentile(r.added_s, 50), '', 3)} / {fmt(percentile(r.added_s, 99), 's', 3)}",
        )
        for forward, label in MODES
        for r in (rounds[forward],)
    ]
    rows += [
        Row(
            "preflight",
            "p50 added by fetching, checking and sending both pictures (on - off)",
            fmt(percentile(on.added_s, 50) - percentile(off.added_s, 50), "s", 3),
        ),
        Row(
            "preflight",
            "worker CPU per job, preflight off / on",
            f"{fmt(off.worker_cpu_ms, '', 2)} / {fmt(on.worker_cpu_ms, 'ms', 2)}",
        ),
        Row(
            "preflight",
            "emulator CPU per job (decoding the data URIs it is sent), off / on",
            f"{fmt(off.emulator_cpu_ms, '', 2)} / {fmt(on.emulator_cpu_ms, 'ms', 2)}",
        ),
        Row(
            "preflight",
            "verified job.succeeded webhooks / jobs, off / on",
            f"{off.succeeded} / {n}, {on.succeeded} / {n}",
            "all",
            judged(off.succeeded == n and on.succeeded == n),
        ),
    ]
    return rows
