"""Starting and stopping the stack's processes: used by `make run` and by the test suite alike."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import redis


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    port: int,
    *,
    host: str = "127.0.0.1",
    timeout_s: float = 20.0,
    process: subprocess.Popen[bytes] | None = None,
) -> None:
    """Block until something accepts connections on (host, port)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"process exited with {process.returncode} before listening on {port}"
            )
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout_s} s")


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
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int) -> None:
        """Send `sig` to the whole process group."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)

    def stop(self, timeout_s: float = 15.0) -> int | None:
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
    _process: ManagedProcess | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start (or restart) on the same port and data."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed (Debian: apt-get install redis-server)"
            )
        self.port = self.port or free_port()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._process is not None:
            self._process.stop()  # the previous run's handle (closes its log)
        argv = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "everysec",
            "--protected-mode",
            "no",
        ]
        self._process = ManagedProcess("redis", argv, log_path=self.log_path).start()
        wait_for_port(self.port, process=self._process.process)
        client = redis.Redis.from_url(self.url)
        try:
            deadline = time.monotonic() + 20
            while True:  # the port opens before an AOF is loaded
                try:
                    client.ping()
                    break
                except redis.BusyLoadingError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
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


def python_module_argv(module: str, *args: str) -> list[str]:
    """argv for `python -m module args` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def venv_script(name: str) -> str:
    """Path of a console script installed beside this interpreter (celery, gunicorn, ...)."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


# --- the stack's commands, as deployed (docker-compose.yml, deploy/), for every launcher --------


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
