"""schemathesis against a live API: `python -m tests.fuzzing [schemathesis run options]`.

`make fuzz` runs it with many examples; tests/test_fuzz.py with a few. The API is the app gunicorn
serves, on Werkzeug's threaded server (what `flask run` uses) over a real redis-server; no worker
runs, so accepted jobs stay queued: the run is about what the document promises of each answer.

Two rules of the API cannot be written in JSON Schema, and are met here rather than weakened:
- a webhook URL's host must resolve to an address webhooks may reach (checked at submit): the app
  under test resolves every name (to 127.0.0.1, and allows every network), so each URL the
  document's pattern allows is judged on its form alone;
- control_start must not exceed control_end (hooks in tests/fuzz_hooks.py keep positive cases so).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from werkzeug.serving import make_server

from cli.stack import Stack
from core.clients import ClientStore
from core.http.egress import EgressPolicy
from core.http.names import NameLookup
from core.settings import load_settings
from core.store import connect_redis
from service import create_app

REPO = Path(__file__).resolve().parent.parent
HOOKS_MODULE = "tests.fuzz_hooks"
SCHEMATHESIS_CONFIG = REPO / "tests" / "schemathesis.toml"
# What must hold of every answer: no 5xx; every schema-valid request accepted and every invalid
# one refused; each status, content type and body as the document declares them.
CHECKS = (
    "not_a_server_error",
    "positive_data_acceptance",
    "negative_data_rejection",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
)
PHASES = "examples,coverage,fuzzing,stateful"


class EveryNameResolves(NameLookup):
    """A resolver answering 127.0.0.1 for any name, without a name server."""

    def addresses(self, host: str, port: int, timeout_s: float) -> list[str]:
        return ["127.0.0.1"]


@dataclass(frozen=True)
class LiveApi:
    base_url: str
    api_key: str


@contextlib.contextmanager
def live_api(redis_url: str) -> Iterator[LiveApi]:
    """The API on 127.0.0.1 (a free port) over `redis_url` (flushed first), with a client;
    uploads in a media folder of its own, removed at the end."""
    with (
        tempfile.TemporaryDirectory(prefix="fuzz-media-") as media,
        _live_api(redis_url, Path(media).as_uri()) as api,
    ):
        yield api


@contextlib.contextmanager
def _live_api(redis_url: str, media_store_url: str) -> Iterator[LiveApi]:
    env = {
        "MEDIA_STORE_URL": media_store_url,
        "REDIS_URL": redis_url,
        "CELERY_BROKER_URL": redis_url,
        "RUNCOMFY_BASE_URL": "http://127.0.0.1:9",  # never called: no worker runs
        "WEBHOOK_ALLOWED_NETWORKS": "0.0.0.0/0,::/0",
        "LOG_LEVEL": "WARNING",
    }
    saved = os.environ.copy()
    try:
        os.environ.update(env)
        settings = load_settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    client = connect_redis(redis_url)
    client.flushdb()
    app = create_app({"SETTINGS": settings})
    commands = app.extensions["inpaint_gateway"].commands
    commands.egress = replace(commands.egress, names=EveryNameResolves())
    assert isinstance(commands.egress, EgressPolicy)
    api_key = ClientStore(client).create("fuzz").api_key
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request, thousands
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield LiveApi(f"http://127.0.0.1:{server.server_port}", api_key)
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()
        client.flushdb()
        client.close()
        app.extensions["inpaint_gateway"].redis.close()


def schemathesis_argv(api: LiveApi, *options: str) -> list[str]:
    """`schemathesis run` of every phase and CHECKS against `api`, plus `options`."""
    return [
        str(Path(sys.executable).parent / "schemathesis"),
        "--config-file",
        str(SCHEMATHESIS_CONFIG),
        "run",
        f"{api.base_url}/openapi.json",
        "--url",
        api.base_url,
        "--header",
        f"Authorization: Bearer {api.api_key}",
        "--phases",
        PHASES,
        "--checks",
        ",".join(CHECKS),
        "--workers",
        "1",
        *options,
    ]


def run_schemathesis(
    api: LiveApi, *options: str, timeout_s: float | None = None, hooks: bool = True
) -> str:
    """Run schemathesis; its whole output. Raises CalledProcessError (with the output) if a
    check failed. `hooks=False` leaves tests/fuzz_hooks.py out (for a control)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_COLOR": "1"}
    if hooks:
        env["SCHEMATHESIS_HOOKS"] = HOOKS_MODULE
    done = subprocess.run(
        schemathesis_argv(api, *options),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, done.args, output=done.stdout)
    return done.stdout


def main() -> int:
    """`make fuzz`: a redis-server of its own, the live API, and schemathesis' report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("options", nargs=argparse.REMAINDER, help="passed to schemathesis run")
    args, unknown = parser.parse_known_args()
    args.options = [*unknown, *args.options]
    with contextlib.ExitStack() as held:
        tmp = held.enter_context(tempfile.TemporaryDirectory(prefix="fuzz-"))
        stack = held.enter_context(Stack(Path(tmp), name="fuzz"))
        api = held.enter_context(live_api(stack.start_redis()))
        argv = schemathesis_argv(api, *args.options)
        env = {**os.environ, "SCHEMATHESIS_HOOKS": HOOKS_MODULE, "PYTHONPATH": str(REPO)}
        return subprocess.run(argv, cwd=REPO, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
