"""A RabbitMQ broker for tests: a virtual host of their own on the machine's RabbitMQ.

The server is shared (CI starts one at localhost:5672); a vhost per test session keeps its queues,
its messages and its connections apart from anyone else's, and is deleted afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from kombu import Connection

# Where tests look for RabbitMQ; guest may connect only over loopback, which is all we need.
AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@localhost:5672/")
RABBITMQCTL_TIMEOUT_S = 60


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


def close_connections(vhost_url: str) -> None:
    """Cut every client connection to the URL's vhost, as a broker restart would."""
    vhost = unquote(urlsplit(vhost_url).path.lstrip("/"))
    rabbitmqctl("close_all_connections", "-p", vhost, "the test cuts the broker off")
