"""The one launcher of the stack's processes: Redis, the emulator, the API (gunicorn), Celery
worker(s) and beat, each with its log, and the waits between them.

`make run` (cli/devstack.py), the test suite (tests/support/stack.py) and the benchmarks (bench/)
all start them through `Stack`, with the commands docker-compose.yml and deploy/ run, and the
environment `Stack.env` builds for every process.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import redis
import requests
from celery import Celery

from core.settings import Settings, load_settings
from core.store import connect_redis

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent
# The bearer token the bundled emulator accepts, and the one every stack gives its processes.
EMULATOR_TOKEN = "emulator-local-token"
# The emulator's /samples/mask.png is white over the house of /samples/image.png.
EMULATOR_SAMPLE_PROMPT = "Repaint the red house as a blue wooden cabin with a white door"
# Defaults that this process's environment overrides: a local stack calls back loopback receivers
# and fetches input pictures from loopback (the emulator's samples).
LOCAL_DEFAULTS = {
    "PYTHONUNBUFFERED": "1",
    "WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8,::1/128",
    "INPUT_ALLOWED_NETWORKS": "127.0.0.0/8,::1/128",
}
STOP_TIMEOUT_S = 15.0
RESTART_BACKOFF_S = 2.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], T],
    timeout_s: float = 20.0,
    what: str = "condition",
    every_s: float = 0.05,
) -> T:
    """Call `predicate` until it returns something truthy, and return that; TimeoutError after
    `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not met within {timeout_s} s")
        time.sleep(every_s)


def wait_for_port(
    port: int,
    *,
    host: str = "127.0.0.1",
    timeout_s: float = 20.0,
    process: subprocess.Popen[bytes] | None = None,
) -> None:
    """Block until something accepts connections on (host, port); fail at once if `process`,
    which should be listening there, exits."""

    def listening() -> bool:
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"process exited with {process.returncode} before listening on {port}"
            )
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return True
        return False

    wait_until(listening, timeout_s, what=f"something listening on {host}:{port}")


def sample_job_body(
    emulator_url: str, webhook_url: str | None = None, prompt: str = EMULATOR_SAMPLE_PROMPT
) -> dict[str, Any]:
    """A valid POST /v1/jobs body on the emulator's sample image and mask."""
    body: dict[str, Any] = {
        "prompt": prompt,
        "image_url": f"{emulator_url}/samples/image.png",
        "mask_image_url": f"{emulator_url}/samples/mask.png",
    }
    if webhook_url is not None:
        body["webhook_url"] = webhook_url
    return body


@dataclass
class ManagedProcess:
    """A child process in its own process group, so it and its children stop together."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str] | None = None
    log_path: Path | None = None
    cwd: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _log_file: BinaryIO | None = field(default=None, init=False, repr=False)

    def start(self) -> ManagedProcess:
        """Start it (stdout and stderr to log_path, or inherited)."""
        self._close_log()  # a restart after a crash appends to the same log
        out = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115 (closed in stop)
        self._log_file = out
        self.process = subprocess.Popen(
            list(self.argv),
            env=dict(self.env) if self.env is not None else None,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            cwd=self.cwd,
            start_new_session=True,
        )
        return self

    @property
    def running(self) -> bool:
        """Started and not exited since."""
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int) -> None:
        """Send `sig` to the whole process group."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, then SIGKILL after `timeout_s`; returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.process.wait(5)
        self.signal(signal.SIGKILL)  # stragglers in the group (prefork children)
        self._close_log()
        return self.process.returncode

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def kill(self) -> None:
        """SIGKILL the whole group at once (a crash, on purpose)."""
        self.signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(10)
        self._close_log()


@dataclass
class RedisServer:
    """A private redis-server with AOF on, in `data_dir`; can be stopped and restarted."""

    data_dir: Path
    port: int = 0
    appendonly: bool = True
    log_path: Path | None = None
    replica_of: int = 0  # a replica of the redis-server on this port of 127.0.0.1
    _process: ManagedProcess | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        """Where its clients connect (database 0)."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start (or restart) on the same port and data; returns once it answers."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed (Debian: apt-get install redis-server)"
            )
        self.port = self.port or free_port()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._process is not None:
            self._process.stop()  # the previous run's handle (closes its log)
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.data_dir), "--save", "",
                "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec",
                "--protected-mode", "no"]  # fmt: skip
        if self.replica_of:
            argv += ["--replicaof", "127.0.0.1", str(self.replica_of)]
        self._process = ManagedProcess("redis", argv, log_path=self.log_path).start()
        wait_for_port(self.port, process=self._process.process)
        client = redis.Redis.from_url(self.url)

        def loaded() -> bool:  # the port opens before an AOF is loaded
            try:
                return bool(client.ping())
            except redis.BusyLoadingError:
                return False

        try:
            wait_until(loaded, what=f"redis on port {self.port} loaded")
        finally:
            client.close()
        return self

    def stop(self) -> None:
        """Stop cleanly (AOF flushed)."""
        if self._process is not None:
            self._process.stop()

    @property
    def running(self) -> bool:
        """Started and not exited since."""
        return self._process is not None and self._process.running

    def kill(self) -> None:
        """SIGKILL: lose whatever AOF had not synced (at most ~1 s with everysec)."""
        if self._process is not None:
            self._process.kill()

    def signal(self, sig: int) -> None:
        """Send `sig` (SIGSTOP: connected yet answering nothing; SIGCONT: on again)."""
        if self._process is not None:
            self._process.signal(sig)


@dataclass
class SentinelServer:
    """A private redis-sentinel watching the master on `master_port` of 127.0.0.1 as
    `master_name`, with failover timings short enough for a test to wait for."""

    data_dir: Path
    master_name: str
    master_port: int
    quorum: int = 2
    down_after_ms: int = 1000
    failover_timeout_ms: int = 3000
    port: int = 0
    log_path: Path | None = None
    _process: ManagedProcess | None = field(default=None, init=False)

    @property
    def address(self) -> str:
        """host:port, as REDIS_SENTINELS lists it."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> SentinelServer:
        """Start it; returns once it answers. (It rewrites its config file as it learns.)"""
        binary = shutil.which("redis-sentinel")
        if binary is None:
            raise RuntimeError(
                "redis-sentinel is not installed (Debian: apt-get install redis-sentinel)"
            )
        self.port = self.port or free_port()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "sentinel.conf"
        name = self.master_name
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\nprotected-mode no\ndir {self.data_dir}\n"
            f"sentinel monitor {name} 127.0.0.1 {self.master_port} {self.quorum}\n"
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}\n"
            f"sentinel failover-timeout {name} {self.failover_timeout_ms}\n"
            f"sentinel parallel-syncs {name} 1\n"
        )
        self._process = ManagedProcess("sentinel", [binary, str(config)], log_path=self.log_path)
        self._process.start()
        wait_for_port(self.port, process=self._process.process)
        return self

    def master_port_now(self) -> int | None:
        """The port of the master this sentinel names now (None if it cannot say)."""
        client = redis.Redis(port=self.port, socket_timeout=2, decode_responses=True)
        try:
            address = client.sentinel_get_master_addr_by_name(self.master_name)
        except redis.RedisError:
            return None
        finally:
            client.close()
        # redis-py types the answer loosely; it is (host, port), or None for a name not watched.
        return int(address[1]) if isinstance(address, tuple | list) else None

    def stop(self) -> None:
        """Stop it."""
        if self._process is not None:
            self._process.stop()


def python_module_argv(module: str, *args: str) -> list[str]:
    """argv for `python -m module args` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def venv_script(name: str) -> str:
    """Path of a console script installed beside this interpreter (celery, gunicorn, ...)."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


# --- the stack's commands, as deployed (docker-compose.yml, deploy/) -----------------------------


def api_argv(bind: str, app: str = "service:create_app()") -> list[str]:
    """`gunicorn` with the production settings, bound to `bind` (host:port)."""
    return [venv_script("gunicorn"), "-c", "python:service.gunicorn_conf", "-b", bind, app]


def worker_argv(
    *,
    concurrency: int,
    name: str | None = None,
    queues: str | None = "jobs,webhooks",
    app: str = "workers",
    log_level: str | None = "INFO",
) -> list[str]:
    """`celery -A workers worker` (gossip and mingle off: workers share nothing but Redis)."""
    argv = [venv_script("celery"), "-A", app, "worker", "-c", str(concurrency),
            "--without-gossip", "--without-mingle"]  # fmt: skip
    if queues:
        argv += ["-Q", queues]
    if log_level:
        argv += ["-l", log_level]
    if name:
        argv += ["-n", f"{name}@%h"]
    return argv


def beat_argv(schedule_path: Path, log_level: str | None = "INFO") -> list[str]:
    """`celery -A workers beat`, its schedule file at `schedule_path`."""
    argv = [venv_script("celery"), "-A", "workers", "beat", "-s", str(schedule_path)]
    return argv + (["-l", log_level] if log_level else [])


def emulator_argv(port: int, token: str, *options: str) -> list[str]:
    """`python -m emulator` on 127.0.0.1:`port`, answering `token`."""
    return python_module_argv("emulator", "--port", str(port), "--token", token, *options)


# --- the stack -------------------------------------------------------------------------------------


@dataclass
class Stack:
    """The processes of one stack, files under `base` (logs in `log_dir`, default base/logs).

    Once the API is started, the processes started from then on get its URL as their
    PUBLIC_BASE_URL (start the API before the workers: their webhooks name media by it).

    Start what is needed (`start_redis` or `use_redis`, `start_emulator`, `start_api`,
    `start_worker`, `start_beat`); `stop()`, or leaving `with Stack(...) as stack:`, stops them
    all, newest first and Redis last. `settings_env` holds settings every process gets over the
    environment inherited from this one.
    """

    base: Path
    settings_env: Mapping[str, str] = field(default_factory=dict)
    log_dir: Path | None = None
    name: str = "stack"
    processes: list[ManagedProcess] = field(default_factory=list, init=False)
    workers: list[ManagedProcess] = field(default_factory=list, init=False)
    redis_url: str = field(default="", init=False)
    emulator_url: str = field(default="", init=False)
    api_url: str = field(default="", init=False)
    _own_redis: RedisServer | None = field(default=None, init=False)
    # A snapshot, so that every process of the stack, started now or later, sees the same.
    _inherited: dict[str, str] = field(default_factory=lambda: dict(os.environ), init=False)

    def __post_init__(self) -> None:
        self.base = self.base.resolve()
        self.logs.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def logs(self) -> Path:
        """The folder of the processes' logs, one `<name>.log` each."""
        return (self.log_dir or self.base / "logs").resolve()

    @property
    def env(self) -> dict[str, str]:
        """The environment of every process: the local defaults, this process's environment,
        the addresses of the Redis and emulator this stack runs, then `settings_env`."""
        env = {**LOCAL_DEFAULTS, **self._inherited}
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )  # bench.naive, not an installed package, is a Celery app too
        if self.redis_url:
            env["REDIS_URL"] = self.redis_url
        if self.emulator_url:
            env["RUNCOMFY_BASE_URL"] = self.emulator_url
            env["RUNCOMFY_API_TOKEN"] = EMULATOR_TOKEN
        # Uploads and outputs beside the stack's other files (.run/media for `make run`).
        env.setdefault("MEDIA_STORE_URL", (self.base / "media").resolve().as_uri())
        if self.api_url:  # webhooks then carry whole media URLs, not bare paths
            env.setdefault("PUBLIC_BASE_URL", self.api_url)
        return env | dict(self.settings_env)

    def settings(self, **overrides: str) -> Settings:
        """Settings as the processes read them, with overrides (e.g. for an API replica)."""
        saved = os.environ.copy()
        try:
            os.environ.update(self.env | overrides)
            return load_settings()
        finally:
            os.environ.clear()
            os.environ.update(saved)

    @property
    def redis_server(self) -> RedisServer:
        """The redis-server this stack started (tests stop, kill and restart it)."""
        if self._own_redis is None:
            raise RuntimeError(f"{self.name} did not start its Redis ({self.redis_url or 'none'})")
        return self._own_redis

    def start_redis(self, port: int = 0) -> str:
        """A private redis-server with AOF, its data in base/redis; returns its URL."""
        server = RedisServer(self.base / "redis", port=port, log_path=self.logs / "redis.log")
        self._own_redis = server  # before it starts: a failed start is stopped too
        server.start()
        self.redis_url = server.url
        return self.redis_url

    def use_redis(self, url: str) -> str:
        """Use a Redis this stack does not run (and so neither restarts nor stops)."""
        self.redis_url = url
        return url

    def redis(self) -> redis.Redis:
        """A new client on the stack's Redis (the caller closes it)."""
        return connect_redis(self.redis_url)

    def start_emulator(self, *options: str, port: int = 0) -> str:
        """The RunComfy emulator as every process's upstream; returns its URL once it listens."""
        port = port or free_port()
        process = self._start("emulator", emulator_argv(port, EMULATOR_TOKEN, *options))
        wait_for_port(port, process=process.process)
        self.emulator_url = f"http://127.0.0.1:{port}"
        return self.emulator_url

    def emulator(self, path: str, *, method: str = "GET", **kwargs: Any) -> requests.Response:
        """Call the emulator (its control API, or /v1 as RunComfy); raises on an error answer."""
        headers = {"Authorization": f"Bearer {EMULATOR_TOKEN}"} | kwargs.pop("headers", {})
        response = requests.request(
            method, self.emulator_url + path, headers=headers, timeout=10, **kwargs
        )
        response.raise_for_status()
        return response

    def start_api(
        self, *, port: int = 0, name: str = "api", app: str = "service:create_app()"
    ) -> ManagedProcess:
        """gunicorn with the production settings; returns once it answers /healthz."""
        port = port or free_port()
        self.api_url = f"http://127.0.0.1:{port}"  # before it starts: its PUBLIC_BASE_URL
        process = self._start(name, api_argv(f"127.0.0.1:{port}", app))
        wait_for_port(port, process=process.process, timeout_s=30)

        def healthy() -> bool:
            with contextlib.suppress(requests.RequestException):
                return requests.get(self.api_url + "/healthz", timeout=2).status_code == 200
            return False

        wait_until(healthy, timeout_s=30, what="gunicorn answering /healthz", every_s=0.1)
        return process

    def start_worker(
        self,
        *,
        name: str = "worker",
        concurrency: int = 2,
        queues: str | None = "jobs,webhooks",
        app: str = "workers",
        log_level: str | None = "INFO",
    ) -> ManagedProcess:
        """`celery -A app worker`, node `name@host`, log `name.log` (it need not be up yet)."""
        argv = worker_argv(
            concurrency=concurrency, name=name, queues=queues, app=app, log_level=log_level
        )
        process = self._start(name, argv)
        self.workers.append(process)
        return process

    @property
    def worker(self) -> ManagedProcess:
        """The first worker."""
        return self.workers[0]

    def wait_for_worker(self, process: ManagedProcess, timeout_s: float = 60) -> None:
        """Block until a worker answers a remote-control ping (it consumes from then on)."""
        env = self.env
        if env.get("REDIS_SENTINELS"):  # the broker's master is the one the sentinels name
            from workers.celery_app import create_celery_app

            app = create_celery_app(self.settings())
        else:
            app = Celery("stack-ping", broker=env.get("CELERY_BROKER_URL") or self.redis_url)
        app.conf.broker_connection_retry_on_startup = True

        def answers() -> bool:
            if not process.running:
                raise RuntimeError(f"the celery worker exited; see {process.log_path}")
            return bool(app.control.ping(timeout=0.5))

        try:
            wait_until(answers, timeout_s, what="a celery worker answering a ping", every_s=0)
        finally:
            app.close()

    def start_beat(self, log_level: str | None = "INFO") -> ManagedProcess:
        """`celery -A workers beat`, its schedule in base/beat-schedule."""
        return self._start("beat", beat_argv(self.base / "beat-schedule", log_level))

    def process(self, name: str) -> ManagedProcess:
        """The running process called `name`."""
        return next(p for p in self.processes if p.name == name)

    def stop_process(self, name: str) -> None:
        """Stop one process of the stack before the others."""
        process = self.process(name)
        self.processes.remove(process)
        process.stop()

    def restart_exited(self, report: Callable[[str], None]) -> None:
        """Start again, after a short pause, each process that exited (as a supervisor would)."""
        if self._own_redis is not None and not self._own_redis.running:
            report(f"redis exited; restarting it on its AOF; see {self.logs / 'redis.log'}")
            time.sleep(RESTART_BACKOFF_S)
            self._own_redis.start()
        for process in self.processes:
            if not process.running:
                code = process.process.returncode if process.process else "?"
                report(f"{process.name} exited ({code}); restarting it; see {process.log_path}")
                time.sleep(RESTART_BACKOFF_S)
                process.start()

    def stop(self) -> None:
        """Stop every process, newest first (Redis last); each is tried even if one fails."""
        interrupted: BaseException | None = None
        while self.processes:
            process = self.processes.pop()
            try:
                process.stop()
            except Exception as exc:
                print(f"[{self.name}] stopping {process.name} failed: {exc}", file=sys.stderr)
            except BaseException as exc:  # Ctrl-C while stopping: stop the rest all the same
                interrupted = interrupted or exc
                process.kill()
        if self._own_redis is not None:
            with contextlib.suppress(Exception):
                self._own_redis.stop()
        if interrupted is not None:
            raise interrupted

    def _start(self, name: str, argv: Sequence[str]) -> ManagedProcess:
        process = ManagedProcess(name, argv, env=self.env, log_path=self.logs / f"{name}.log")
        self.processes.append(process)  # before it starts: a failed start is stopped too
        return process.start()
