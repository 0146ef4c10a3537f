"""Phase 8, waiters: how many `GET /v1/jobs/{id}?wait=60` one 2-core API host holds at once
while `/healthz` stays fast, and how soon after a job turns final its waiter hears of it.

gunicorn with the production settings (service/gunicorn_conf.py: 2 processes per core, each
API_THREADS + API_WAIT_SLOTS threads), a worker and the emulator. Each round POSTs as many jobs
as it has waiters, evenly over half a run (so every waiter is in place before the first end, and
the ends come as steady traffic), then opens one waiting
request per job, each on a connection of its own, and reads `/healthz` over and over while they
wait. A waiter is *held* when its answer is the final job without `Retry-After` (beyond the
process's slots a wait is answered at once, with it). Lateness: the answer received minus the
job's `finished_at` (the commit that made it final).
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

from bench.common import Poster, Row, Sizes, fmt, percentile, phase_stack, post_jobs, say
from cli.stack import sample_job_body
from core.clients import ClientStore
from core.settings import DEFAULT_API_WAIT_SLOTS

WAIT_S = 60
API_PROCESSES = 2 * (os.cpu_count() or 1)  # gunicorn_conf's default WEB_CONCURRENCY
HEALTH_EVERY_S = 0.02


@dataclass
class Answer:
    """One waiter's answer."""

    status: int
    held: bool  # waited (no Retry-After) and got the job final
    lateness_s: float | None  # received - the job's finished_at, when held
    error: str | None = None  # no answer: what went wrong


@dataclass(frozen=True)
class Round:
    """One round's figures."""

    slots: int
    waiters: int
    answers: list[Answer]
    health_ms: list[float]  # /healthz latency while the waiters waited


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _wait_on(host: str, port: int, path: str, headers: dict[str, str], into: list[Answer]) -> None:
    connection = http.client.HTTPConnection(host, port, timeout=WAIT_S + 30)
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        body = json.loads(response.read() or b"{}")
        received = time.time()
    except (OSError, http.client.HTTPException, ValueError) as exc:
        into.append(Answer(0, False, None, type(exc).__name__))
        return
    finally:
        connection.close()
    final = body.get("finished_at")
    held = response.getheader("Retry-After") is None and final is not None
    into.append(Answer(response.status, held, received - _epoch(final) if held else None))


def _health_latencies(host: str, port: int, stop: threading.Event) -> list[float]:
    connection = http.client.HTTPConnection(host, port, timeout=10)
    taken: list[float] = []
    while not stop.is_set():
        sent = time.perf_counter()
        connection.request("GET", "/healthz")
        connection.getresponse().read()
        taken.append((time.perf_counter() - sent) * 1000)
        stop.wait(HEALTH_EVERY_S)
    connection.close()
    return taken


def _round(sizes: Sizes, base: Path, slots: int, waiters: int) -> Round:
    with phase_stack(
        f"waiters-{slots}",
        base,
        run_s=sizes.waiters_run_s,
        API_WAIT_SLOTS=str(slots),
        INPUT_FORWARD="url",
        RUNCOMFY_MAX_IN_FLIGHT="3000",
        RUNCOMFY_MAX_RPS="3000",
    ) as stack:
        stack.start_api()
        stack.start_beat()
        worker = stack.start_worker(concurrency=2, log_level=None)
        stack.wait_for_worker(worker)
        client = stack.redis()
        creds = ClientStore(client).create(f"bench-waiters-{slots}")
        client.close()
        headers = {"Authorization": f"Bearer {creds.api_key}"}
        poster = Poster(stack.api_url, headers)
        say(f"waiters: {waiters} jobs of {sizes.waiters_run_s:g} s, API_WAIT_SLOTS={slots}")
        # Evenly over half the run: the ends come as steady traffic, not all in one instant.
        bodies = [sample_job_body(stack.emulator_url) for _ in range(waiters)]
        posted = post_jobs(poster, bodies, over_s=sizes.waiters_run_s / 2)
        parts = urlsplit(stack.api_url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        answers: list[Answer] = []
        threads = [
            threading.Thread(
                target=_wait_on,
                args=(host, port, f"/v1/jobs/{job_id}?wait={WAIT_S}", headers, answers),
                daemon=True,
            )
            for job_id, _ in posted
        ]
        for thread in threads:
            thread.start()
        stop = threading.Event()
        health: list[float] = []
        sampler = threading.Thread(
            target=lambda: health.extend(_health_latencies(host, port, stop)), daemon=True
        )
        sampler.start()
        for thread in threads:
            thread.join(WAIT_S + 40)
        stop.set()
        sampler.join(15)
    return Round(slots, waiters, answers, health)


def run(sizes: Sizes, base: Path) -> list[Row]:
    rows: list[Row] = []
    for slots, waiters in sizes.waiters_rounds:
        r = _round(sizes, base / f"slots-{slots}", slots, waiters)
        held = [a for a in r.answers if a.held]
        late = [a.lateness_s for a in held if a.lateness_s is not None]
        label = f"API_WAIT_SLOTS={slots}" + (
            " (default)" if slots == DEFAULT_API_WAIT_SLOTS else ""
        )
        errors = Counter(a.error or f"HTTP {a.status}" for a in r.answers if a.status != 200)
        if errors:
            say(f"waiters: {label}: errors {dict(errors)}")
        rows += [
            Row(
                "waiters",
                f"{label}, {r.waiters} waiters on one host ({API_PROCESSES} API processes): held "
                "until the end / "
                "answered at once with Retry-After / errors",
                f"{len(held)} / {sum(1 for a in r.answers if not a.held and a.status == 200)} / "
                f"{sum(1 for a in r.answers if a.status != 200) + r.waiters - len(r.answers)}",
            ),
            Row(
                "waiters",
                f"{label}: /healthz p50 / p99 while they waited ({len(r.health_ms)} reads)",
                f"{fmt(percentile(r.health_ms, 50), '', 2)} / {fmt(percentile(r.health_ms, 99), 'ms', 2)}",
            ),
            Row(
                "waiters",
                f"{label}: a held waiter's answer after the job turned final, p50 / p99 / max",
                " / ".join(fmt(percentile(late, p) * 1000, "", 1) for p in (50, 99))
                + f" / {fmt(max(late, default=0.0) * 1000, 'ms', 1)}",
                "≤ 50 ms",
                "yes" if late and percentile(late, 99) <= 0.05 else "**NO**",
            ),
        ]
    return rows
