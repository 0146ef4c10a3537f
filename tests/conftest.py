"""The real stack for integration tests: redis-server, the emulator, Celery worker and beat.

Each is started as a process with the same commands docker-compose.yml and deploy/ run, on free
ports, once per test session; tests talk to the API through Flask's test client (the same app
gunicorn serves) and receive webhooks on a real receiver that verifies signatures.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from cli.listener import WebhookReceiver
from cli.processes import (
    ManagedProcess,
    RedisServer,
    beat_argv,
    emulator_argv,
    free_port,
    wait_for_port,
    worker_argv,
)
from core.clients import ClientStore, NewClientCredentials
from core.metrics import Counters
from core.settings import Settings, load_settings
from core.store import JobStore, connect_redis
from service import create_app
from workers.pipeline import JobPipeline
from workers.run_times import RunTimes
from workers.runcomfy import RunComfyClient
from workers.throttle import UpstreamThrottle

EMULATOR_TOKEN = "emulator-test-token"


@dataclass
class Stack:
    """Handles on the running processes, for tests that break them on purpose."""

    base: Path
    redis_server: RedisServer
    emulator_url: str
    env: dict[str, str]
    workers: list[ManagedProcess]
    beat: ManagedProcess
    emulator_process: ManagedProcess
    logs: Path

    @property
    def worker(self) -> ManagedProcess:
        return self.workers[0]

    def emulator(self, path: str, **kwargs: Any) -> requests.Response:
        """Call the emulator's control API."""
        return requests.request(
            kwargs.pop("method", "GET"), self.emulator_url + path, timeout=10, **kwargs
        )

    def settings(self, **overrides: str) -> Settings:
        """Settings as the processes see them, with overrides (e.g. for an API replica)."""
        saved = os.environ.copy()
        try:
            os.environ.update(self.env | overrides)
            return load_settings()
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def stop(self) -> None:
        """Stop every process (beat and workers first, Redis last)."""
        for process in (self.beat, *self.workers, self.emulator_process):
            process.stop()
        self.redis_server.stop()


STACK_ENV = {
    "WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
    "WEBHOOK_RETRY_SCHEDULE": "0,0.5,1,1,1",
    "WEBHOOK_TIMEOUT_S": "3",
    "DISPATCH_INTERVAL_S": "0.2",
    "RUNCOMFY_TIMEOUT_S": "5",
    "STEP_LEASE_S": "15",
    "LOG_LEVEL": "INFO",
    "PYTHONUNBUFFERED": "1",
}


def worker_process(
    env: dict[str, str], logs: Path, name: str, concurrency: int = 2
) -> ManagedProcess:
    """`celery -A workers worker`, as deployed."""
    argv = worker_argv(concurrency=concurrency, name=name)
    return ManagedProcess(name, argv, env=env, log_path=logs / f"{name}.log")


def start_stack(
    base: Path,
    *,
    workers: int = 1,
    env: dict[str, str] | None = None,
    emulator_args: tuple[str, ...] = ("--queue-s", "0.3", "--run-s", "0.5"),
    concurrency: int = 2,
) -> Stack:
    """redis-server (AOF), the emulator, Celery worker(s) and beat, each its own process."""
    logs = base / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    redis_server = RedisServer(base / "redis", log_path=logs / "redis.log").start()
    emulator_port = free_port()
    emulator_url = f"http://127.0.0.1:{emulator_port}"
    full_env = {
        **os.environ,
        **STACK_ENV,
        "REDIS_URL": redis_server.url,
        "RUNCOMFY_BASE_URL": emulator_url,
        "RUNCOMFY_API_TOKEN": EMULATOR_TOKEN,
        **(env or {}),
    }
    emulator = ManagedProcess(
        "emulator",
        emulator_argv(emulator_port, EMULATOR_TOKEN, *emulator_args),
        env=full_env,
        log_path=logs / "emulator.log",
    ).start()
    worker_processes = [
        worker_process(full_env, logs, f"worker{i + 1}", concurrency) for i in range(workers)
    ]
    beat = ManagedProcess(
        "beat", beat_argv(base / "beat-schedule"), env=full_env, log_path=logs / "beat.log"
    )
    stack = Stack(
        base, redis_server, emulator_url, full_env, worker_processes, beat, emulator, logs
    )
    try:
        wait_for_port(emulator_port, process=emulator.process)
        for process in (*worker_processes, beat):
            process.start()
    except BaseException:
        stack.stop()
        raise
    return stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = start_stack(tmp_path_factory.mktemp("stack"))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def redis_client(stack: Stack) -> Iterator[redis.Redis]:
    client = connect_redis(stack.redis_server.url)
    yield client
    client.close()


@pytest.fixture
def scratch(stack: Stack) -> Iterator[redis.Redis]:
    """A Redis database no worker looks at, empty for each test."""
    client = connect_redis(stack.redis_server.url.rsplit("/", 1)[0] + "/4")
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def make_app(stack: Stack) -> Iterator[Callable[..., Any]]:
    """An API app on the stack's Redis and broker (overrides: env-style settings); each app's
    Redis connections are closed at the end, not left to the garbage collector (whose
    ResourceWarning would fail whichever test it happened in)."""
    built: list[Any] = []

    def build(**overrides: str) -> Any:
        built.append(create_app({"TESTING": True, "SETTINGS": stack.settings(**overrides)}))
        return built[-1]

    yield build
    for each in built:
        each.extensions["inpaint_gateway"].redis.close()


@pytest.fixture(scope="session")
def app(make_app: Callable[..., Any]) -> Any:
    return make_app()


@dataclass
class ApiClient:
    """A registered client and a Flask test client that sends its key."""

    creds: NewClientCredentials
    http: Any

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.creds.api_key}"}

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.http.post(path, headers=self.headers() | kwargs.pop("headers", {}), **kwargs)

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.http.get(path, headers=self.headers() | kwargs.pop("headers", {}), **kwargs)

    def wait_for(
        self, job_id: str, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 30.0
    ) -> dict[str, Any]:
        """Poll our own API until the job satisfies `predicate`; fail with its last state."""
        deadline = time.monotonic() + timeout_s
        job: dict[str, Any] = {}
        while time.monotonic() < deadline:
            job = self.get(f"/v1/jobs/{job_id}").get_json()
            if predicate(job):
                return job
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} did not get there in {timeout_s} s; last: {job}")

    def wait_final(self, job_id: str, timeout_s: float = 30.0) -> dict[str, Any]:
        return self.wait_for(
            job_id,
            lambda j: j["status"] in {"succeeded", "failed", "cancelled", "expired"},
            timeout_s,
        )


@pytest.fixture
def api_client(app: Any, redis_client: redis.Redis) -> ApiClient:
    """A fresh client (own key, own secret) per test: tests never see each other's jobs."""
    return ApiClient(ClientStore(redis_client).create("test-client"), app.test_client())


@pytest.fixture
def receiver(api_client: ApiClient) -> Iterator[WebhookReceiver]:
    """A real webhook receiver verifying with the test client's secret."""
    rx = WebhookReceiver(secret=api_client.creds.webhook_secret).start()
    yield rx
    rx.stop()


def wait_until(
    predicate: Callable[[], Any], timeout_s: float = 20.0, what: str = "condition"
) -> Any:
    """Poll `predicate` until truthy; return its value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} not met within {timeout_s} s")


@contextlib.contextmanager
def raw_peer(
    answer: Callable[[socket.socket, threading.Event], None], *, connections: int = 1
) -> Iterator[int]:
    """A TCP peer on 127.0.0.1 for answers no HTTP server would send (dripped, cut short,
    flooded): each accepted connection, up to `connections`, goes to `answer(connection, stop)`
    on a thread of its own, and is closed after. `stop` is set when the block ends; an OSError
    in `answer` (the client went away) ends it quietly. Yields the port."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def serve(connection: socket.socket) -> None:
        with connection, contextlib.suppress(OSError):
            answer(connection, stop)

    def accept() -> None:
        while not stop.is_set() and len(threads) < connections:
            with contextlib.suppress(TimeoutError):
                connection, _ = listener.accept()
                connection.settimeout(None)
                threads.append(threading.Thread(target=serve, args=(connection,), daemon=True))
                threads[-1].start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        acceptor.join(timeout=10)
        listener.close()
        for thread in threads:
            thread.join(timeout=10)


@dataclass
class DnsPeer:
    """A name server on 127.0.0.1 (UDP) for c-ares to ask: it answers A and AAAA queries from
    `records`, NXDOMAIN for other names, after `delay_s`; with `silent`, it never answers; with
    `lose_first`, the first query for each name is lost (as a UDP packet can be)."""

    address: str
    records: dict[str, list[str]]
    delay_s: float = 0.0
    silent: bool = False
    lose_first: bool = False
    asked: list[str] | None = None

    def answer(self, query: bytes) -> bytes | None:
        """The reply to one query (RFC 1035 §4.1), or None to stay silent."""
        end = 12
        while query[end]:
            end += query[end] + 1
        labels, at = [], 12
        while query[at]:
            labels.append(query[at + 1 : at + 1 + query[at]].decode("ascii"))
            at += query[at] + 1
        name = ".".join(labels).lower()
        qtype = int.from_bytes(query[end + 1 : end + 3], "big")
        question = query[12 : end + 5]
        assert self.asked is not None
        self.asked.append(name)
        if self.silent or (self.lose_first and self.asked.count(name) == 1):
            return None
        if name not in self.records:
            return query[:2] + b"\x81\x83" + b"\x00\x01\x00\x00\x00\x00\x00\x00" + question
        family = {1: socket.AF_INET, 28: socket.AF_INET6}.get(qtype)
        rdatas = [
            socket.inet_pton(family, address)
            for address in self.records[name]
            if family is not None and (":" in address) == (family == socket.AF_INET6)
        ]
        answers = b"".join(
            b"\xc0\x0c"  # the name: a pointer to the question's
            + qtype.to_bytes(2, "big")
            + b"\x00\x01"  # class IN
            + (60).to_bytes(4, "big")  # TTL
            + len(rdata).to_bytes(2, "big")
            + rdata
            for rdata in rdatas
        )
        header = query[:2] + b"\x81\x80" + b"\x00\x01" + len(rdatas).to_bytes(2, "big")
        return header + b"\x00\x00\x00\x00" + question + answers


@contextlib.contextmanager
def dns_peer(records: dict[str, list[str]] | None = None, **options: Any) -> Iterator[DnsPeer]:
    """Run a DnsPeer (options: delay_s, silent, lose_first) until the block ends; its `address` is what
    NameLookup(servers=…) takes."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(0.1)
    peer = DnsPeer(f"127.0.0.1:{udp.getsockname()[1]}", records or {}, asked=[], **options)
    stop = threading.Event()
    failures: list[Exception] = []

    def reply_later(reply: bytes, to: Any) -> None:
        if not stop.wait(peer.delay_s):
            with contextlib.suppress(OSError):
                udp.sendto(reply, to)

    def serve() -> None:
        while not stop.is_set():
            try:
                query, sender = udp.recvfrom(4096)
            except TimeoutError:
                continue
            try:
                reply = peer.answer(query)
            except Exception as exc:  # raised again when the block ends: a broken peer fails loudly
                failures.append(exc)
                continue
            if reply is not None:
                threading.Thread(target=reply_later, args=(reply, sender), daemon=True).start()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        yield peer
    finally:
        stop.set()
        server.join(timeout=10)
        udp.close()
    if failures:
        raise failures[0]


@pytest.fixture
def pipeline(stack: Stack, redis_client: redis.Redis) -> Iterator[JobPipeline]:
    """A pipeline in this process, on the stack's Redis and emulator (a second 'worker')."""
    settings = stack.settings()
    runcomfy = RunComfyClient(
        base_url=settings.runcomfy_base_url,
        token=settings.runcomfy_api_token,
        model_id=settings.runcomfy_model_id,
        timeout_s=5,
    )
    store = JobStore(redis_client, retention_s=settings.job_retention_s)
    yield JobPipeline(
        store=store,
        runcomfy=runcomfy,
        settings=settings,
        counters=Counters(redis_client),
        throttle=UpstreamThrottle(redis_client, rate_per_s=settings.runcomfy_max_rps),
        run_times=RunTimes(redis_client, job_schedule_key=store.job_schedule.key),
        on_events=lambda: None,
        on_slot_freed=lambda: None,
    )
    runcomfy.close()


def admit(pipeline: JobPipeline) -> None:
    """Do what the (stopped) worker's dispatcher would: hand out free upstream slots."""
    pipeline.store.admission.admit(
        max_in_flight=pipeline.settings.runcomfy_max_in_flight, slot_ttl_s=600
    )
