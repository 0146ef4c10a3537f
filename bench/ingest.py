"""Phase 1, ingest: how fast gunicorn (production settings) accepts jobs, against a trivial route.

gunicorn runs `service/gunicorn_conf.py` as deployed (gthread, a process per core, 4 threads) on
its own Redis; no Celery worker (accepted jobs just wait, queued). The load comes from separate
processes: wrk for the maximum (closed loop), then a paced Python generator at half the POST
maximum, its latency measured from each request's scheduled send time.

The two maxima are measured in alternating rounds (healthz, POST, healthz, POST, …) and the best
of each is kept, and so is the best of the paced rounds: on a shared VM a neighbour can take a
core for seconds, and short rounds keep one such window from deciding a figure. Every round's
figure is printed.

Then a bench-only app (bench/ingest_probe.py) takes parts of a POST out, in the same rounds
against its own /healthz: what is left of the ratio without the Redis write, and without the
schema too, says where a POST's cost goes; and bench/ingest_inprocess.py times its pieces inside
the app (no gunicorn).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import ingest_inprocess, ingest_probe
from bench.common import Row, Sizes, cpu_meter, fmt, judged, phase_stack, say
from bench.loadgen import LoadResult, max_throughput, run_python
from cli.stack import Stack, sample_job_body
from core.clients import ClientStore
from core.limits import ClientLimits
from service import gunicorn_conf

# PRODUCT §8: accepted jobs/s on 2 cores. The ratio to a trivial endpoint is reported, not a
# target (decided: a route that does nothing is no peer of a validated, durable accept).
TARGET_ACCEPTED_PER_S = 1000
TARGET_HALF_RATE_P99_MS = 25.0


def run(sizes: Sizes, base: Path) -> list[Row]:
    with phase_stack("ingest", base, run_s=0) as stack:
        stack.start_api()
        client = stack.redis()
        clients = ClientStore(client)
        creds = clients.create("bench-ingest")
        # The same POSTs from a client with every limit set, none of them reached: what
        # checking them costs the accept path.
        limited = clients.create("bench-ingest-limited")
        clients.set_limits(limited.client_id, UNREACHED_LIMITS)
        client.close()
        body = json.dumps(sample_job_body(stack.emulator_url))
        auth = {"Authorization": f"Bearer {creds.api_key}", "Content-Type": "application/json"}
        auth_limited = auth | {"Authorization": f"Bearer {limited.api_key}"}
        load = functools.partial(
            max_throughput,
            duration_s=sizes.ingest_s,
            threads=sizes.ingest_threads,
            connections=sizes.ingest_connections,
            script_dir=base,
        )

        log = stack.logs / "api.log"
        _wait_for_boots(log, gunicorn_conf.workers)
        cpu = cpu_meter(stack)
        cpu.start()
        boots = [_boots(log)]
        metered_trivial: list[MeteredRound] = []
        metered_post: list[MeteredRound] = []
        metered_limited: list[MeteredRound] = []
        for round_no in range(1, sizes.ingest_rounds + 1):
            say(f"ingest: round {round_no}: GET /healthz, closed loop for {sizes.ingest_s:.0f} s")
            metered_trivial.append(_metered(stack, "api", lambda: load(stack.api_url + "/healthz")))
            say(f"ingest: round {round_no}: POST /v1/jobs, closed loop for {sizes.ingest_s:.0f} s")
            metered_post.append(_metered(
                stack, "api", lambda: load(stack.api_url + "/v1/jobs", body=body, headers=auth)
            ))  # fmt: skip
            say(f"ingest: round {round_no}: POST /v1/jobs, limits set, closed loop for "
                f"{sizes.ingest_s:.0f} s")  # fmt: skip
            metered_limited.append(_metered(
                stack, "api",
                lambda: load(stack.api_url + "/v1/jobs", body=body, headers=auth_limited),
            ))  # fmt: skip
            say(f"ingest: round {round_no}: /healthz {metered_trivial[-1].result.rps:.0f} req/s, "
                f"POST {metered_post[-1].result.rps:.0f} req/s, with limits "
                f"{metered_limited[-1].result.rps:.0f} req/s")  # fmt: skip
        trivial_rounds = [m.result for m in metered_trivial]
        post_rounds = [m.result for m in metered_post]
        limited_rounds = [m.result for m in metered_limited]
        boots.append(_boots(log))
        best_trivial, best_post = _best(metered_trivial), _best(metered_post)
        trivial, post = best_trivial.result, best_post.result
        half = post.rps / 2
        paced_rounds: list[LoadResult] = []
        for round_no in range(1, sizes.ingest_paced_rounds + 1):
            say(f"ingest: round {round_no}: POST /v1/jobs paced at {half:.0f} req/s for "
                f"{sizes.ingest_paced_s:.0f} s")  # fmt: skip
            paced_rounds.append(
                run_python(
                    stack.api_url + "/v1/jobs",
                    duration_s=sizes.ingest_paced_s,
                    connections=sizes.ingest_connections,
                    processes=2,
                    method="POST",
                    body=body,
                    headers=auth,
                    rate=half,
                )
            )
        paced = min(paced_rounds, key=lambda r: r.p99_ms)
        time.sleep(0.5)  # the log line of a restart at the very end
        boots.append(_boots(log))
        cpu.stop()
        stack.stop_process("api")
        step_rounds = _post_steps(stack, sizes, load, body, auth)
        say("ingest: a POST's pieces, timed in-process")
        in_process = ingest_inprocess.rows(
            sizes, stack.env["REDIS_URL"], stack.emulator_url, creds.api_key, body
        )
    steps = [_best(rounds) for rounds in step_rounds]
    every_round = [
        *trivial_rounds, *post_rounds, *limited_rounds, *paced_rounds,
        *(m.result for m in itertools.chain(*step_rounds)),
    ]  # fmt: skip
    cores = len(os.sched_getaffinity(0))
    api_share = (cpu.used["api"] + cpu.used["redis"]) / (cpu.wall_s * cores)
    restarts = [later - earlier for earlier, later in itertools.pairwise(boots)]
    return [
        Row("ingest", "each round, req/s: GET /healthz, then POST /v1/jobs",
            " / ".join(fmt(r.rps, "", 0) for r in trivial_rounds) + "; then "
            + " / ".join(fmt(r.rps, "", 0) for r in post_rounds)),
        *_limits_rows(post, _best(metered_limited).result, limited_rounds),
        Row("ingest", "each paced round at half max: p99 ms",
            " / ".join(fmt(r.p99_ms, "", 2) for r in paced_rounds)),
        *rows(sizes, trivial, post, paced, half,
              errors=sum(r.errors for r in every_round)),
        *_step_rows(sizes, [s.result for s in steps], post),
        *_cpu_rows(best_trivial, best_post, steps),
        *in_process,
        Row("ingest", "gunicorn worker restarts (max_requests) in the max / paced runs",
            " / ".join(str(r) for r in restarts)),
        Row("ingest", f"CPU busy over {cpu.wall_s:.0f} s x {cores} cores: gunicorn + Redis / "
            "whole machine (with the load generator)",
            f"{fmt(api_share * 100, '', 0)} / {fmt(cpu.machine_s / (cpu.wall_s * cores) * 100, '%', 0)}"),
    ]  # fmt: skip


# Set on the limited client, none reached by a closed-loop bench run: each is checked in full.
UNREACHED_LIMITS = ClientLimits(
    max_in_flight=1000,
    max_queued=10**9,
    rate_per_min=10**9,
    budget_usd=10.0**9,
    budget_period="month",
)


def _limits_rows(post: LoadResult, limited: LoadResult, rounds: list[LoadResult]) -> list[Row]:
    """POSTs of a client with every limit set beside those of one with none, same rounds."""
    return [
        Row("ingest", "each round, req/s: POST /v1/jobs by a client with every limit set",
            " / ".join(fmt(r.rps, "", 0) for r in rounds)),
        Row("ingest", "POST with limits set / without: max throughput (best rounds), ratio",
            f"{fmt(limited.rps, 'req/s', 0)} / {fmt(post.rps, 'req/s', 0)} = "
            f"{fmt(limited.rps / post.rps * 100, '%', 0)}"),
        Row("ingest", "POST with limits set: latency p50 / p99 at max",
            f"{fmt(limited.p50_ms, 'ms', 2)} / {fmt(limited.p99_ms, 'ms', 2)}"),
    ]  # fmt: skip


POST_STEPS = (
    ("GET /healthz", "/healthz"),
    ("POST, JSON parsed without the schema, not stored", ingest_probe.UNVALIDATED_PATH),
    ("POST /v1/jobs (schema), not stored", "/v1/jobs"),
)


def _post_steps(
    stack: Stack,
    sizes: Sizes,
    load: Callable[..., LoadResult],
    body: str,
    auth: dict[str, str],
) -> list[list[MeteredRound]]:
    """Where a POST's throughput goes: each of bench/ingest_probe.py's steps, in alternating
    rounds (every round, per step)."""
    stack.start_api(name="api-probe", app="bench.ingest_probe:create_app()")
    _wait_for_boots(stack.logs / "api-probe.log", gunicorn_conf.workers)
    rounds: list[list[MeteredRound]] = [[] for _ in POST_STEPS]
    for round_no in range(1, sizes.ingest_rounds + 1):
        for (label, path), results in zip(POST_STEPS, rounds, strict=True):
            say(f"ingest: probe round {round_no}: {label}, closed loop for {sizes.ingest_s:.0f} s")
            url = stack.api_url + path
            if path == "/healthz":
                run = functools.partial(load, url)
            else:
                run = functools.partial(load, url, body=body, headers=auth)
            results.append(_metered(stack, "api-probe", run))
    return rounds


@dataclass(frozen=True)
class MeteredRound:
    """One closed-loop round and the CPU seconds it took: gunicorn's, Redis's, the machine's."""

    result: LoadResult
    api_s: float
    redis_s: float
    machine_s: float

    def ms_per_request(self) -> str:
        """gunicorn / Redis / whole machine, CPU ms per answered request."""
        n = max(self.result.requests, 1)
        return " / ".join(
            fmt(s / n * 1e3, "", 2) for s in (self.api_s, self.redis_s, self.machine_s)
        )


def _metered(stack: Stack, api: str, run: Callable[[], LoadResult]) -> MeteredRound:
    meter = cpu_meter(stack)
    meter.start()
    result = run()
    meter.stop()
    return MeteredRound(result, meter.used[api], meter.used["redis"], meter.machine_s)


def _best(rounds: list[MeteredRound]) -> MeteredRound:
    return max(rounds, key=lambda m: m.result.rps)


def _cpu_rows(trivial: MeteredRound, post: MeteredRound, steps: list[MeteredRound]) -> list[Row]:
    """What one request costs in CPU, in the best round of each: the POST's extra over
    /healthz, split by the probe's steps, shows where it goes."""
    what = (
        "CPU ms per request in the best round: gunicorn / Redis / whole machine (load generator in)"
    )
    labelled = [("GET /healthz", trivial), ("POST /v1/jobs", post)] + [
        (f"probe: {label}", step) for (label, _), step in zip(POST_STEPS, steps, strict=True)
    ]
    return [Row("ingest", f"{what}: {label}", m.ms_per_request()) for label, m in labelled]


def _step_rows(sizes: Sizes, steps: list[LoadResult], post: LoadResult) -> list[Row]:
    """Each step's best rate and its share of /healthz's, the real POST last (its own rounds)."""
    trivial = steps[0]
    cells = [f"{fmt(r.rps, '', 0)} ({fmt(r.rps / trivial.rps * 100, '%', 0)})" for r in steps[1:]]
    labels = [label for label, _ in POST_STEPS[1:]]
    return [
        Row("ingest", "where a POST's throughput goes (bench/ingest_probe.py, same gunicorn "
            f"settings, best of {sizes.ingest_rounds} x {sizes.ingest_s:.0f} s): req/s "
            f"(share of its /healthz {fmt(trivial.rps, 'req/s', 0)}): " + "; ".join(labels)
            + "; then the real POST with its Redis write (above)",
            "; ".join(cells) + f"; {fmt(post.rps, '', 0)}"),
    ]  # fmt: skip


def _wait_for_boots(log: Path, workers: int, timeout_s: float = 30) -> None:
    """gunicorn answers once one worker is up: wait for all of them before measuring."""
    deadline = time.monotonic() + timeout_s
    while _boots(log) < workers and time.monotonic() < deadline:
        time.sleep(0.1)


def _boots(log: Path) -> int:
    """gunicorn worker processes booted so far (a restart after max_requests boots one)."""
    return log.read_text(errors="replace").count("Booting worker")


def rows(
    sizes: Sizes,
    trivial: LoadResult,
    post: LoadResult,
    paced: LoadResult,
    half: float,
    *,
    errors: int,
) -> list[Row]:
    if trivial.tool == "wrk":
        how = f"wrk -t{sizes.ingest_threads} -c{sizes.ingest_connections}"
    else:
        how = f"Python generator, {sizes.ingest_connections} connections"
    how += f", best of {sizes.ingest_rounds} x {sizes.ingest_s:.0f} s"
    ratio = post.rps / trivial.rps
    return [
        Row("ingest", f"GET /healthz max throughput ({how})", fmt(trivial.rps, "req/s", 0)),
        Row("ingest", "GET /healthz latency p50 / p99 at max",
            f"{fmt(trivial.p50_ms, 'ms', 2)} / {fmt(trivial.p99_ms, 'ms', 2)}"),
        Row("ingest", f"POST /v1/jobs max throughput ({how})", fmt(post.rps, "req/s", 0),
            f"≥ {TARGET_ACCEPTED_PER_S:,} req/s", judged(post.rps >= TARGET_ACCEPTED_PER_S)),
        Row("ingest", "POST /v1/jobs latency p50 / p99 at max",
            f"{fmt(post.p50_ms, 'ms', 2)} / {fmt(post.p99_ms, 'ms', 2)}"),
        Row("ingest", "POST / trivial throughput ratio (reported, not a target)",
            fmt(ratio * 100, "%", 0)),
        Row("ingest", f"POST paced at half max ({half:.0f} req/s asked, "
            f"{sizes.ingest_paced_s:.0f} s): achieved", fmt(paced.rps, "req/s", 0)),
        Row("ingest", "POST at half max: p50 (from scheduled send)", fmt(paced.p50_ms, "ms", 2)),
        Row("ingest", "POST at half max: p99 (from scheduled send; generator's oversleep out)",
            fmt(paced.p99_ms, "ms", 2),
            f"≤ {TARGET_HALF_RATE_P99_MS:.0f} ms",
            judged(paced.p99_ms <= TARGET_HALF_RATE_P99_MS)),
        Row("ingest", "POST at half max: p99 with the generator's oversleep in / oversleep p99",
            f"{fmt(paced.raw_p99_ms, 'ms', 2)} / {fmt(paced.oversleep_p99_ms, 'ms', 2)}"),
        Row("ingest", "errors (non-2xx, socket) over all runs", fmt(errors, "", 0),
            "0", judged(errors == 0)),
    ]  # fmt: skip
