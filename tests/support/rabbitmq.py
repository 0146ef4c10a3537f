"""RabbitMQ for tests: a vhost of their own on the machine's server, or a node of their own.

The server at localhost:5672 is shared (CI starts one there); a vhost per test session keeps its
queues, messages and connections apart from anyone else's, and is deleted afterwards. A test that
restarts the broker runs a private node instead (its own port, data and logs), so nothing else
on the machine loses its broker.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from kombu import Connection

from cli.stack import free_port, wait_until

# Where tests look for RabbitMQ; guest may connect only over loopback, which is all we need.
AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@localhost:5672/")
RABBITMQCTL_TIMEOUT_S = 60
NODE_START_TIMEOUT_S = 60
# The Debian package's rabbitmq-server started as root runs the node as this user.
SERVER_USER = "rabbitmq"


def unreachable_reason(url: str = AMQP_URL) -> str | None:
    """Why RabbitMQ cannot be used at `url` (None when a connection opens)."""
    try:
        with Connection(url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
    except Exception as exc:
        host = urlsplit(url).hostname
        return f"no RabbitMQ reachable at {host}:{urlsplit(url).port or 5672} ({exc!r}); .ci/run installs and starts one"
    return None


def rabbitmqctl(*args: str) -> str:
    """Run `rabbitmqctl` (the server's own CLI) and return what it printed."""
    done = subprocess.run(
        ["rabbitmqctl", *args],
        capture_output=True,
        text=True,
        timeout=RABBITMQCTL_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {args[0]} failed: {done.stderr.strip() or done.stdout}")
    return done.stdout


def with_vhost(url: str, vhost: str) -> str:
    """`url` pointing at `vhost` instead of its own."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + quote(vhost, safe="")))


@contextmanager
def private_vhost(prefix: str = "inpaint-test") -> Iterator[str]:
    """A broker URL on a new vhost the URL's user may use; the vhost is deleted on leaving."""
    if shutil.which("rabbitmqctl") is None:
        raise RuntimeError("rabbitmqctl is not on PATH: cannot make a vhost of the tests' own")
    vhost = f"{prefix}-{os.getpid()}-{time.time_ns()}"
    user = urlsplit(AMQP_URL).username or "guest"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        yield with_vhost(AMQP_URL, vhost)
    finally:
        rabbitmqctl("delete_vhost", vhost)


def purge_queues(url: str, *queues: str) -> int:
    """Drop the ready messages of `queues` (those a worker holds unacked stay); how many went."""
    dropped = 0
    with Connection(url) as conn:
        channel = conn.default_channel
        for queue in queues:
            dropped += channel.queue_purge(queue) or 0
    return dropped


class RabbitMQNode:
    """A RabbitMQ node of a test's own on a free port, its data kept across restarts."""

    def __init__(self) -> None:
        # Not under pytest's tmp_path: the node runs as SERVER_USER, who cannot enter root's.
        self.base = Path(tempfile.mkdtemp(prefix="inpaint-rabbitmq-"))
        self.port = free_port()
        self.name = f"inpaint-test-{self.port}@localhost"
        self.process: subprocess.Popen[bytes] | None = None
        (self.base / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        (self.base / "enabled_plugins").write_text("[].\n")
        if os.geteuid() == 0:
            for path in (self.base, *self.base.iterdir()):
                shutil.chown(path, SERVER_USER, SERVER_USER)

    @property
    def url(self) -> str:
        """The broker URL of its default vhost (guest may connect over loopback)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    @property
    def log_path(self) -> Path:
        """What the node printed, over all its starts."""
        return self.base / "node.log"

    def start(self) -> RabbitMQNode:
        """Start the node and return once it takes connections."""
        env = os.environ | {
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_CONF_ENV_FILE": os.devnull,  # the machine's names its own node
        }
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                ["rabbitmq-server"], env=env, stdout=log, stderr=log, start_new_session=True
            )

        def takes_connections() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited; see {self.log_path}")
            return unreachable_reason(self.url) is None

        wait_until(
            takes_connections, NODE_START_TIMEOUT_S, what="RabbitMQ node started", every_s=0.2
        )
        return self

    def stop(self) -> None:
        """Shut the node down cleanly (durable queues and persistent messages are kept)."""
        if self.process is None:
            return
        try:
            rabbitmqctl("-n", self.name, "shutdown")
        except (RuntimeError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        self.process = None

    def remove(self) -> None:
        """Stop it and delete its files."""
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)
