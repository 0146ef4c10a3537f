"""`make run`: the whole stack in the foreground — Redis (AOF on), emulator, API, worker, beat,
and a webhook listener — with a local client and a ready-to-paste curl. Ctrl-C stops everything.

A process that dies is restarted (as compose or Kubernetes would), so a worker that exits
non-zero after losing its broker comes back by itself.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import redis

from cli.listener import WebhookReceiver, print_event, print_refusal
from cli.stack import Stack, sample_job_body
from core.clients import ClientStore
from core.settings import SettingsError
from core.store import connect_redis

RUN_DIR = Path(".run")
DEV_REDIS_PORT = 6390
RUNCOMFY_SAMPLE = {
    # RunComfy's own example for this model (its model page): the mask covers the girl's top.
    "prompt": "Replace the girl's current top with a short red polka-dot swimsuit top",
    "image_url": "https://playgrounds-storage-public.runcomfy.net/tools/7294/media-files/input-1-1.png",
    "mask_image_url": "https://playgrounds-storage-public.runcomfy.net/tools/7294/media-files/mask.png",
}


def say(text: str) -> None:
    """One line for the person at the terminal."""
    print(f"[make run] {text}", flush=True)


def _reachable(url: str) -> bool:
    client = connect_redis(url, socket_timeout_s=2)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _ports_free(**ports: int) -> None:
    """Stop with one line if a port is taken: the API's would be answered by whatever holds it
    (the welcome printed, gunicorn restarted every 2 s behind it)."""
    for name, port in ports.items():
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                raise SystemExit(
                    f"[make run] port {port} ({name}) is in use: stop what holds it, or choose "
                    f"another with `inpaint-gateway up --{name}-port N` (API_PORT for make run)."
                ) from None


def _existing_redis() -> str | None:
    """The Redis to use if `make run` should not start its own: REDIS_URL if given, a previous
    run's server still up, or (without redis-server) one on localhost:6379. Stops with one line
    when there is none to use and none to start."""
    given = os.environ.get("REDIS_URL")
    if given:
        if not _reachable(given):
            raise SystemExit(
                f"[make run] Redis is not reachable at REDIS_URL={given}: start it, "
                "or unset REDIS_URL to let `make run` start its own (needs redis-server installed)."
            )
        return given
    if shutil.which("redis-server") is None:
        fallback = "redis://localhost:6379/0"
        if _reachable(fallback):
            say(f"redis-server not installed; using the Redis at {fallback} (is AOF on there?)")
            return fallback
        raise SystemExit(
            "[make run] No Redis: redis-server is not installed and nothing answers on localhost:6379. "
            "Fix: apt-get install redis-server (or brew install redis), or set REDIS_URL."
        )
    previous_run = f"redis://127.0.0.1:{DEV_REDIS_PORT}/0"
    return previous_run if _reachable(previous_run) else None


def _local_client(store: ClientStore) -> tuple[str, str, str]:
    """The dev client kept in .run/client.json (created on first run or if revoked)."""
    path = RUN_DIR / "client.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if store.authenticate(saved["api_key"]) is not None:
            return saved["client_id"], saved["api_key"], saved["webhook_secret"]
    creds = store.create("local-dev")
    path.write_text(json.dumps(creds.__dict__))
    path.chmod(0o600)
    return creds.client_id, creds.api_key, creds.webhook_secret


def describe_failed_attempt(log_line: str) -> str | None:
    """The console line for a worker log line recording a webhook attempt that failed, or None
    for any other line."""
    try:
        record = json.loads(log_line)
    except ValueError:
        return None
    if not isinstance(record, dict) or record.get("message") != "webhook attempt":
        return None
    if not record.get("error"):
        return None
    then = {"pending": "will retry", "exhausted": "no attempts left", "gone": "stopped (410)"}
    return (
        f"webhook {record.get('event_type')} for {record.get('job_id')}: attempt "
        f"{record.get('attempt')} failed ({record['error']}); "
        f"{then.get(str(record.get('state')), str(record.get('state')))}"
    )


class FailedAttemptReporter:
    """Shows the failed webhook attempts the worker logs: the listener sees only those that
    reach it, so a webhook_url that is down or refuses would otherwise fail in silence."""

    def __init__(self, worker_log: Path, show: Callable[[str], None]) -> None:
        self.worker_log = worker_log
        self.show = show
        # Attempts of earlier runs, already in the log, are not this run's news.
        self._offset = worker_log.stat().st_size if worker_log.exists() else 0
        self._partial = b""

    def poll(self) -> None:
        """Show the failed attempts logged since the last poll."""
        try:
            with self.worker_log.open("rb") as log:
                if log.seek(0, os.SEEK_END) < self._offset:  # a new log: read it from its start
                    self._offset, self._partial = 0, b""
                log.seek(self._offset)
                chunk = log.read()
        except FileNotFoundError:
            return
        self._offset += len(chunk)
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        for line in lines:
            text = describe_failed_attempt(line.decode(errors="replace"))
            if text is not None:
                self.show(text)


def run_dev_stack(
    *, api_port: int, listener_port: int, emulator_port: int, worker_concurrency: int
) -> int:
    """Start everything, print how to use it, supervise until Ctrl-C; returns the exit code."""
    RUN_DIR.mkdir(exist_ok=True)
    emulated = not os.environ.get("RUNCOMFY_API_TOKEN")
    _ports_free(
        api=api_port, listener=listener_port, **({"emulator": emulator_port} if emulated else {})
    )
    existing_redis = _existing_redis()
    stack = Stack(RUN_DIR, log_dir=RUN_DIR, name="make run")
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    receiver: WebhookReceiver | None = None
    try:
        if existing_redis is not None:
            stack.use_redis(existing_redis)
        else:
            stack.start_redis(port=DEV_REDIS_PORT)
        if emulated:
            say(f"RUNCOMFY_API_TOKEN is unset: using the bundled emulator on port {emulator_port}")
            stack.start_emulator(port=emulator_port)
        try:
            stack.settings()
        except SettingsError as exc:
            raise SystemExit(f"[make run] {exc}") from None
        client_id, api_key, secret = _local_client(ClientStore(connect_redis(stack.redis_url)))
        receiver = WebhookReceiver(
            secret=secret, port=listener_port, on_event=print_event, on_refusal=print_refusal
        ).start()
        stack.start_api(port=api_port)
        # Before the worker starts: its first failed attempts are news too.
        failed_attempts = FailedAttemptReporter(stack.logs / "worker.log", say)
        stack.start_worker(concurrency=worker_concurrency, queues=None)
        stack.start_beat()
        _print_welcome(stack, client_id, api_key, secret, receiver.url)
        while not stopping:
            stack.restart_exited(say)
            failed_attempts.poll()
            time.sleep(0.5)
    finally:
        say("stopping ...")
        stack.stop()
        if receiver is not None:
            receiver.stop()
        say("stopped")
    return 0


def _print_welcome(
    stack: Stack, client_id: str, api_key: str, secret: str, webhook_url: str
) -> None:
    base = stack.api_url
    upstream = stack.settings().runcomfy_base_url
    if stack.emulator_url:
        sample = sample_job_body(upstream, webhook_url)
    else:
        sample = RUNCOMFY_SAMPLE | {"webhook_url": webhook_url}
    auth = f"Authorization: Bearer {api_key}"
    print(flush=True)
    say(f"API:            {base}   (docs: {base}/docs, metrics: {base}/metrics)")
    say(f"upstream:       {upstream}")
    say(f"client_id:      {client_id}")
    say(f"api_key:        {api_key}")
    say(f"webhook secret: {secret}")
    say(
        f"listener:       {webhook_url}  (verified events, refused deliveries and failed attempts below)"
    )
    say(f"redis:          {stack.redis_url}  (for the CLI: export REDIS_URL={stack.redis_url})")
    say(f"logs:           {RUN_DIR}/*.log      Ctrl-C stops everything")
    print("\nSubmit the sample job:\n", flush=True)
    print(
        f"curl -sS -X POST {base}/v1/jobs -H {shlex.quote(auth)} -H 'Content-Type: application/json' \\\n  -d {shlex.quote(json.dumps(sample))}\n",
        flush=True,
    )
    print(f"Then: curl -sS {base}/v1/jobs/<id> -H {shlex.quote(auth)}\n", flush=True)
    picture = f"{stack.emulator_url}/samples/image.png" if stack.emulator_url else None
    print(
        "Upload a picture of your own (its ref, upload:upl_..., goes in image_url):\n", flush=True
    )
    print(_upload_curl(base, auth, picture) + "\n", flush=True)


def _upload_curl(base: str, auth: str, picture_url: str | None) -> str:
    """The curl that uploads `picture_url` (piped from a GET), or a file of the user's."""
    post = (
        f"curl -sS -X POST {base}/v1/uploads -H {shlex.quote(auth)} "
        "-H 'Content-Type: image/png' --data-binary"
    )
    if picture_url is None:
        return f"{post} @picture.png"
    return f"curl -sS {picture_url} | {post} @-"
