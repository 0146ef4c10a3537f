"""What every phase shares: /proc readings, HTTP helpers, result rows.

Each phase starts its own private processes with cli.stack.Stack (the production commands) and
stops them all when it ends, also on an error or Ctrl-C (`Stack` is a context manager).
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import math
import os
import platform
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis
import requests

from cli.stack import ManagedProcess, Stack

_STARTED = time.monotonic()


def say(text: str) -> None:
    """One progress line on stderr."""
    print(f"[bench +{time.monotonic() - _STARTED:6.1f}s] {text}", file=sys.stderr, flush=True)


# --- result rows -------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the results table."""

    phase: str
    figure: str
    value: str
    target: str = "—"
    met: str = "—"


def judged(ok: bool) -> str:
    return "yes" if ok else "**NO**"


def fmt(value: float, unit: str = "", digits: int = 1) -> str:
    """A number with its unit; `n/a` for NaN or infinity."""
    if value is None or not math.isfinite(value):
        return "n/a"
    text = f"{value:,.{digits}f}"
    return f"{text} {unit}".strip()


def per_call(
    n: int, call: Callable[[], object], *, cpu_clock: Callable[[], float], warm_up: int
) -> tuple[float, float]:
    """CPU seconds (by cpu_clock) and wall seconds per call of n calls, after warm_up calls."""
    for _ in range(warm_up):
        call()
    cpu, wall = cpu_clock(), time.perf_counter()
    for _ in range(n):
        call()
    return (cpu_clock() - cpu) / n, (time.perf_counter() - wall) / n


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (nearest rank) of `values`; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


# --- the machine and /proc ---------------------------------------------------------------------


def machine_line() -> str:
    """nproc, CPU model and Python version."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0))
    return f"nproc={cores}, CPU: {model}, Python {platform.python_version()}"


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # fields from `state` (field 3) on


def group_pids(pgid: int) -> list[int]:
    """Every live process whose process group is `pgid` (a ManagedProcess and its children)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and int(fields[2]) == pgid:
                pids.append(int(entry))
    return pids


def group_cpu_s(process: ManagedProcess) -> float:
    """CPU seconds of the group: every live process's own, plus what its reaped children used.

    cutime/cstime keep the CPU of children that exited and were waited for (a gunicorn worker
    restarted after max_requests, a replaced prefork child), which would otherwise be lost.
    """
    if process.process is None:
        return math.nan
    total = 0
    for pid in group_pids(process.process.pid):
        fields = _stat_fields(pid)
        if fields is not None:
            total += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    return total / _CLK_TCK


def pid_cpu_s(pid: int) -> float:
    """utime+stime of one process, in seconds."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK if fields else math.nan


def self_cpu_s() -> float:
    """CPU of this process (the load generator threads and the webhook receiver)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_busy_s() -> float:
    """CPU seconds every core of the machine spent busy so far (all processes, /proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


class CpuMeter:
    """CPU seconds used by each of several processes between start() and stop()."""

    def __init__(self, readers: dict[str, Callable[[], float]]) -> None:
        self.readers = readers
        self.used: dict[str, float] = {}
        self._before: dict[str, float] = {}
        self._started = self.wall_s = self.machine_s = self._machine_before = 0.0

    def start(self) -> None:
        self._before = {name: read() for name, read in self.readers.items()}
        self._machine_before = machine_busy_s()
        self._started = time.monotonic()

    def stop(self) -> dict[str, float]:
        self.used = {name: read() - self._before[name] for name, read in self.readers.items()}
        self.wall_s = time.monotonic() - self._started
        self.machine_s = machine_busy_s() - self._machine_before
        return self.used

    def per_job_ms(self, jobs: int) -> dict[str, float]:
        return {name: seconds / jobs * 1e3 for name, seconds in self.used.items()}


def group_rss_bytes(process: ManagedProcess) -> int:
    """Sum of VmRSS of every live process in the group."""
    if process.process is None:
        return 0
    total = 0
    for pid in group_pids(process.process.pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def group_size(process: ManagedProcess) -> int:
    return len(group_pids(process.process.pid)) if process.process else 0


# --- the stack's CPU ------------------------------------------------------------------------------


# A phase's processes log warnings only: their INFO lines would cost CPU the figures count.
BENCH_SETTINGS = {"LOG_LEVEL": "WARNING", "WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8"}


def phase_stack(name: str, base: Path, *, run_s: float, **settings: str) -> Stack:
    """A phase's stack, its Redis and emulator (runs of `run_s`, no queue) running; use it as
    `with phase_stack(...) as stack:`, so that every process stops with the phase."""
    stack = Stack(base, settings_env=BENCH_SETTINGS | settings, name=name)
    try:
        stack.start_redis()
        stack.start_emulator("--queue-s", "0", "--run-s", str(run_s), "--quiet")
    except BaseException:
        stack.stop()
        raise
    return stack


def cpu_meter(stack: Stack) -> CpuMeter:
    """CPU of every process of the stack (gateway and harness alike) and of this one."""
    readers: dict[str, Callable[[], float]] = {
        p.name: functools.partial(group_cpu_s, p) for p in stack.processes
    }
    client = stack.redis()
    redis_pid = int(client.info("server")["process_id"])
    client.close()
    readers["redis"] = lambda: pid_cpu_s(redis_pid)
    readers["bench"] = self_cpu_s
    return CpuMeter(readers)


# --- HTTP ----------------------------------------------------------------------------------------


class Poster:
    """POSTs JSON over one kept-alive http.client connection per thread."""

    def __init__(self, base_url: str, headers: dict[str, str]) -> None:
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.headers = {"Content-Type": "application/json", **headers}
        self._local = threading.local()

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return self.request("POST", path, json.dumps(body).encode())

    def get(self, path: str) -> tuple[int, dict[str, Any]]:
        return self.request("GET", path)

    def request(
        self, method: str, path: str, data: bytes | None = None
    ) -> tuple[int, dict[str, Any]]:
        for attempt in (1, 2):
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = http.client.HTTPConnection(
                    self.host, self.port, timeout=30
                )
            try:
                conn.request(method, path, body=data, headers=self.headers)
                response = conn.getresponse()
                payload = response.read()
                return response.status, json.loads(payload) if payload else {}
            except (OSError, http.client.HTTPException):
                conn.close()
                self._local.conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


def post_jobs(
    poster: Poster,
    bodies: Sequence[dict[str, Any]],
    threads: int = 16,
    over_s: float | None = None,
) -> list[tuple[str, float]]:
    """POST /v1/jobs for every body concurrently — as fast as taken, or evenly over `over_s`;
    (job id, time.time() sent) of each, in order. Raises if any answer is not 202.
    """
    from concurrent.futures import ThreadPoolExecutor

    start = time.time()
    gap_s = (over_s or 0.0) / max(1, len(bodies))

    def one(index_body: tuple[int, dict[str, Any]]) -> tuple[str, float]:
        index, body = index_body
        while (wait := start + index * gap_s - time.time()) > 0:
            time.sleep(wait)
        sent = time.time()
        status, job = poster.post("/v1/jobs", body)
        if status != 202:
            raise RuntimeError(f"POST /v1/jobs answered {status}: {job}")
        return str(job["id"]), sent

    with ThreadPoolExecutor(threads, thread_name_prefix="post") as pool:
        return list(pool.map(one, enumerate(bodies)))


class InFlightSampler:
    """Samples the emulator's live requests every `interval_s` in a thread; keeps the peaks."""

    def __init__(self, stack: Stack, interval_s: float = 0.5) -> None:
        self.stack, self.interval_s = stack, interval_s
        self.peak_in_progress = 0
        self.peak_in_flight = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="sampler")

    def __enter__(self) -> InFlightSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with contextlib.suppress(requests.RequestException):
                states = self.stack.emulator("/_emulator/stats").json()["requests"]
                in_progress = int(states.get("in_progress", 0))
                self.peak_in_progress = max(self.peak_in_progress, in_progress)
                self.peak_in_flight = max(
                    self.peak_in_flight, in_progress + int(states.get("in_queue", 0))
                )
                self.samples += 1


def used_memory(client: redis.Redis) -> tuple[int, int]:
    """INFO memory: used_memory and used_memory_dataset (without buffers and overhead)."""
    info = client.info("memory")
    return int(info["used_memory"]), int(info["used_memory_dataset"])


@dataclass(frozen=True)
class Sizes:
    """How big each phase is: the full run, or --smoke (tiny, every code path once)."""

    smoke: bool
    ingest_s: float  # each max-throughput run
    ingest_rounds: int  # alternating healthz / POST maximum runs; the best of each counts
    ingest_paced_s: float
    ingest_paced_rounds: int  # the best p99 counts
    ingest_threads: int
    ingest_connections: int
    ingest_inprocess_calls: int  # each piece of a POST timed in-process
    pipeline_jobs: int
    pipeline_concurrency: int
    pipeline_cap_s: float
    scale_jobs: int
    scale_warmup_jobs: int  # run to the end first, so the run time is learned
    scale_post_s: float  # the steady batch is POSTed evenly over this long (< the run time)
    scale_run_s: float
    scale_concurrency: int
    scale_cap_s: float
    baseline_window_s: float
    delivery_attempts: int  # https webhook attempts, each way
    upload_count: int  # different ~2 MiB PNGs uploaded
    upload_threads: int
    preflight_jobs: int  # each round: preflight off, then on
    preflight_post_s: float  # POSTed evenly over this long
    preflight_run_s: float  # the emulator's run of each job
    waiters_run_s: float  # long enough for every waiter to be in place before the end
    waiters_rounds: tuple[tuple[int, int], ...]  # (API_WAIT_SLOTS, waiters) each
    variance_warmup_jobs: int  # both shapes, run to the end first (their windows learned)
    variance_in_flight: tuple[int, ...]
    variance_post_s: float  # each size POSTed evenly over this (shorter than the shortest run)
    variance_time_scale: float  # PRODUCT §8's run times times this (smoke: a tenth)
    variance_naive_window_s: float  # the naive design runs this long (it would take hours)


FULL = Sizes(
    smoke=False,
    ingest_s=5,  # short rounds, more of them: a neighbour's burst spoils one, not the figure
    ingest_rounds=4,
    ingest_paced_s=10,
    ingest_paced_rounds=2,
    ingest_threads=2,
    ingest_connections=32,
    ingest_inprocess_calls=2000,
    pipeline_jobs=1000,
    pipeline_concurrency=4,
    pipeline_cap_s=120,
    scale_jobs=2000,
    scale_warmup_jobs=20,
    scale_post_s=15,
    scale_run_s=20,
    scale_concurrency=2,
    scale_cap_s=240,
    baseline_window_s=90,
    delivery_attempts=300,
    upload_count=100,
    upload_threads=4,
    preflight_jobs=200,
    preflight_post_s=10,
    preflight_run_s=2,
    waiters_run_s=20,
    waiters_rounds=((28, 150), (250, 1000)),
    variance_warmup_jobs=40,
    variance_in_flight=(40, 200, 2000),
    variance_post_s=4,
    variance_time_scale=1.0,
    variance_naive_window_s=60,
)
SMOKE = Sizes(
    smoke=True,
    ingest_s=1,
    ingest_rounds=1,
    ingest_paced_s=1.5,
    ingest_paced_rounds=1,
    ingest_threads=2,
    ingest_connections=8,
    ingest_inprocess_calls=50,
    pipeline_jobs=20,
    pipeline_concurrency=4,
    pipeline_cap_s=30,
    scale_jobs=30,
    scale_warmup_jobs=3,
    scale_post_s=0.5,
    scale_run_s=1,
    scale_concurrency=8,
    scale_cap_s=30,
    baseline_window_s=4,
    delivery_attempts=10,
    upload_count=4,
    upload_threads=2,
    preflight_jobs=6,
    preflight_post_s=0.5,
    preflight_run_s=0.5,
    waiters_run_s=3,
    waiters_rounds=((1, 6),),
    variance_warmup_jobs=20,
    variance_in_flight=(6,),
    variance_post_s=0.2,
    variance_time_scale=0.1,
    variance_naive_window_s=4,
)


class Collector:
    """The first verified final webhook of each job (on_event of a WebhookReceiver)."""

    def __init__(self) -> None:
        self.by_job: dict[str, Any] = {}  # job id -> ReceivedEvent
        self.webhook_ids: set[str] = set()
        self.duplicates = 0
        self._cond = threading.Condition()

    def __call__(self, event: Any) -> None:
        job_id = str(event.payload.get("data", {}).get("id"))
        with self._cond:
            if event.webhook_id in self.webhook_ids:
                self.duplicates += 1
                return
            self.webhook_ids.add(event.webhook_id)
            self.by_job.setdefault(job_id, event)
            self._cond.notify_all()

    def count(self, job_ids: Iterable[str] | None = None) -> int:
        with self._cond:
            if job_ids is None:
                return len(self.by_job)
            return sum(1 for j in job_ids if j in self.by_job)

    def wait_for(self, job_ids: Sequence[str], timeout_s: float, progress_s: float = 10) -> bool:
        """Block until every job in `job_ids` has its webhook, or timeout; True if all came."""
        wanted = set(job_ids)
        deadline = time.monotonic() + timeout_s
        next_note = time.monotonic() + progress_s
        with self._cond:
            while not wanted <= self.by_job.keys():
                now = time.monotonic()
                if now >= deadline:
                    return False
                if now >= next_note:
                    got = len(wanted & self.by_job.keys())
                    say(f"  ... {got} / {len(wanted)} webhooks")
                    next_note = now + progress_s
                self._cond.wait(min(deadline, next_note) - now)
            return True

    def events(self, job_ids: Iterable[str]) -> list[Any]:
        with self._cond:
            return [self.by_job[j] for j in job_ids if j in self.by_job]


def explain_missing(poster: Poster, job_ids: Sequence[str], collector: Collector) -> str:
    """For jobs without a webhook: their status and last delivery attempt, as one summary."""
    from collections import Counter

    missing = [j for j in job_ids if collector.count([j]) == 0]
    if not missing:
        return ""
    states: Counter[str] = Counter()
    examples: list[str] = []
    for job_id in missing[:50]:
        _, job = poster.get(f"/v1/jobs/{job_id}")
        _, deliveries = poster.get(f"/v1/jobs/{job_id}/deliveries")
        attempts = deliveries.get("deliveries", [])
        last = attempts[-1] if attempts else None
        states[f"{job.get('status')}, {len(attempts)} attempt(s)"] += 1
        if len(examples) < 3:
            examples.append(f"{job_id}: status={job.get('status')} error={job.get('error')} "
                            f"upstream={job.get('upstream')} last_delivery={last}")  # fmt: skip
    return f"{len(missing)} without webhook: {dict(states)}; e.g. " + " | ".join(examples)


def start_receiver(secret: str, collector: Collector) -> Any:
    """A cli.listener.WebhookReceiver verifying with `secret` (backlog 1024, as a real one)."""
    from cli.listener import WebhookReceiver

    return WebhookReceiver(secret, on_event=collector).start()


def cpu_rows(phase: str, cpu: CpuMeter, jobs: int, prefix: str = "") -> list[Row]:
    """CPU per job of the gateway's processes, of the harness's, and how busy the machine was."""
    ms = cpu.per_job_ms(jobs)
    cores = len(os.sched_getaffinity(0))
    capacity = cpu.wall_s * cores
    ours = sum(cpu.used.values()) / capacity if capacity > 0 else math.nan
    machine = cpu.machine_s / capacity if capacity > 0 else math.nan
    return [
        Row(phase, f"{prefix}CPU per job, gateway: worker / beat / API / Redis",
            " / ".join(fmt(ms[n], "", 2) for n in ("worker", "beat", "api", "redis")) + " ms"),
        Row(phase, f"{prefix}CPU per job, harness on the same cores: emulator / bench (clients, "
            "receiver)",
            f"{fmt(ms['emulator'], '', 2)} / {fmt(ms['bench'], 'ms', 2)}"),
        Row(phase, f"{prefix}CPU busy over {fmt(cpu.wall_s, 's', 0)} x {cores} cores: this run's "
            "processes / whole machine", f"{fmt(ours * 100, '', 0)} / {fmt(machine * 100, '%', 0)}"),
    ]  # fmt: skip
