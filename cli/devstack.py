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
from pathlib import Path
from types import FrameType

import redis

from cli.listener import WebhookReceiver, print_event
from cli.processes import (
    ManagedProcess,
    RedisServer,
    api_argv,
    beat_argv,
    emulator_argv,
    wait_for_port,
    worker_argv,
)
from core.clients import ClientStore
from core.settings import SettingsError, load_settings
from core.store import connect_redis

RUN_DIR = Path(".run")
DEV_REDIS_PORT = 6390
EMULATOR_TOKEN = "emulator-local-token"
SAMPLE_PROMPT = "Turn the sky into a vivid red sunset"
RUNCOMFY_SAMPLE_IMAGE = (
    "https://playgrounds-storage-public.runcomfy.net/tools/7294/media-files/input-1-1.png"
)
RUNCOMFY_SAMPLE_MASK = (
    "https://playgrounds-storage-public.runcomfy.net/tools/7294/media-files/mask.png"
)
RESTART_BACKOFF_S = 2.0


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


def _redis_url(env: dict[str, str]) -> tuple[str, RedisServer | None]:
    """Use REDIS_URL if given; otherwise start a private redis-server with AOF in .run/redis."""
    if "REDIS_URL" in env:
        if not _reachable(env["REDIS_URL"]):
            raise SystemExit(
                f"[make run] Redis is not reachable at REDIS_URL={env['REDIS_URL']}: start it, "
                "or unset REDIS_URL to let `make run` start its own (needs redis-server installed)."
            )
        return env["REDIS_URL"], None
    if shutil.which("redis-server") is None:
        fallback = "redis://localhost:6379/0"
        if _reachable(fallback):
            say(f"redis-server not installed; using the Redis at {fallback} (is AOF on there?)")
            return fallback, None
        raise SystemExit(
            "[make run] No Redis: redis-server is not installed and nothing answers on localhost:6379. "
            "Fix: apt-get install redis-server (or brew install redis), or set REDIS_URL."
        )
    server = RedisServer(RUN_DIR / "redis", port=DEV_REDIS_PORT, log_path=RUN_DIR / "redis.log")
    if _reachable(server.url):  # a previous run's server is still up: reuse it
        return server.url, None
    return server.start().url, server


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


def run_dev_stack(
    *, api_port: int, listener_port: int, emulator_port: int, worker_concurrency: int
) -> int:
    """Start everything, print how to use it, supervise until Ctrl-C; returns the exit code."""
    RUN_DIR.mkdir(exist_ok=True)
    env = dict(os.environ)
    emulated = {} if env.get("RUNCOMFY_API_TOKEN") else {"emulator": emulator_port}
    _ports_free(api=api_port, listener=listener_port, **emulated)
    redis_url, own_redis = _redis_url(env)
    env["REDIS_URL"] = redis_url
    env.setdefault("WEBHOOK_ALLOWED_NETWORKS", "127.0.0.0/8,::1/128")
    processes: list[ManagedProcess] = []
    if not env.get("RUNCOMFY_API_TOKEN"):
        env["RUNCOMFY_BASE_URL"] = f"http://127.0.0.1:{emulator_port}"
        env["RUNCOMFY_API_TOKEN"] = EMULATOR_TOKEN
        processes.append(
            ManagedProcess(
                "emulator",
                emulator_argv(emulator_port, EMULATOR_TOKEN),
                env=env,
                log_path=RUN_DIR / "emulator.log",
            )
        )
        say(f"RUNCOMFY_API_TOKEN is unset: using the bundled emulator on port {emulator_port}")
    os.environ.update(env)
    try:
        load_settings()
    except SettingsError as exc:
        raise SystemExit(f"[make run] {exc}") from None
    processes += [
        ManagedProcess(
            "api", api_argv(f"127.0.0.1:{api_port}"), env=env, log_path=RUN_DIR / "api.log"
        ),
        ManagedProcess(
            "worker",
            worker_argv(concurrency=worker_concurrency, queues=None),
            env=env,
            log_path=RUN_DIR / "worker.log",
        ),
        ManagedProcess(
            "beat", beat_argv(RUN_DIR / "beat-schedule"), env=env, log_path=RUN_DIR / "beat.log"
        ),
    ]
    client_id, api_key, secret = _local_client(ClientStore(connect_redis(redis_url)))
    receiver = WebhookReceiver(secret=secret, port=listener_port, on_event=print_event).start()
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        for process in processes:
            process.start()
        if not env.get("RUNCOMFY_API_TOKEN") or env["RUNCOMFY_API_TOKEN"] == EMULATOR_TOKEN:
            wait_for_port(emulator_port, process=processes[0].process)
        wait_for_port(api_port, timeout_s=30)
        _print_welcome(api_port, env, client_id, api_key, secret, receiver.url)
        while not stopping:
            if own_redis is not None and not own_redis.running and not stopping:
                say("redis exited; restarting it on its AOF; see .run/redis.log")
                time.sleep(RESTART_BACKOFF_S)
                own_redis.start()
            for process in processes:
                if not process.running and not stopping:
                    say(
                        f"{process.name} exited ({process.process.returncode if process.process else '?'}); restarting it; see .run/{process.name}.log"
                    )
                    time.sleep(RESTART_BACKOFF_S)
                    process.start()
            time.sleep(0.5)
    finally:
        say("stopping ...")
        for process in reversed(processes):
            process.stop()
        receiver.stop()
        if own_redis is not None:
            own_redis.stop()
        say("stopped")
    return 0


def _print_welcome(
    api_port: int, env: dict[str, str], client_id: str, api_key: str, secret: str, webhook_url: str
) -> None:
    base = f"http://127.0.0.1:{api_port}"
    upstream = env["RUNCOMFY_BASE_URL"]
    if env["RUNCOMFY_API_TOKEN"] == EMULATOR_TOKEN:
        image, mask = f"{upstream}/samples/image.png", f"{upstream}/samples/mask.png"
    else:
        image, mask = RUNCOMFY_SAMPLE_IMAGE, RUNCOMFY_SAMPLE_MASK
    body = json.dumps(
        {
            "prompt": SAMPLE_PROMPT,
            "image_url": image,
            "mask_image_url": mask,
            "webhook_url": webhook_url,
        }
    )
    auth = f"Authorization: Bearer {api_key}"
    print(flush=True)
    say(f"API:            {base}   (docs: {base}/docs, metrics: {base}/metrics)")
    say(f"upstream:       {upstream}")
    say(f"client_id:      {client_id}")
    say(f"api_key:        {api_key}")
    say(f"webhook secret: {secret}")
    say(f"listener:       {webhook_url}  (verified events are printed below)")
    say(f"redis:          {env['REDIS_URL']}  (for the CLI: export REDIS_URL={env['REDIS_URL']})")
    say("logs:           .run/*.log      Ctrl-C stops everything")
    print("\nSubmit the sample job:\n", flush=True)
    print(
        f"curl -sS -X POST {base}/v1/jobs -H {shlex.quote(auth)} -H 'Content-Type: application/json' \\\n  -d {shlex.quote(body)}\n",
        flush=True,
    )
    print(f"Then: curl -sS {base}/v1/jobs/<id> -H {shlex.quote(auth)}\n", flush=True)
