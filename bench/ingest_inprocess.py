"""Where a POST's CPU goes inside the app: the ingest phase's last step, in the bench process.

The production app is called as a WSGI application, without gunicorn, against the phase's Redis
(jobs are really stored), and so are the pieces of a POST on their own: the job store's one write
(`JobStore.create`, the Lua call through redis-py), the marshmallow schema's load, the job and its
stored JSON, and the answer's JSON. CPU is this process's (`time.process_time`) per call, after
a warm-up — no server, no load generator, no other request in between. What is left of a POST
after the pieces is the framework around them (Flask, webargs, flask-smorest, Werkzeug).
"""

from __future__ import annotations

import io
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.common import Row, Sizes, fmt, per_call
from cli.stack import EMULATOR_TOKEN
from core.jobs import new_job
from core.settings import Settings
from core.wakeups import DISPATCH_JOBS_TASK
from service import create_app, warm_up
from service.context import ServiceContext
from service.schemas import INPUT_FIELDS, JobCreateSchema


def rows(sizes: Sizes, redis_url: str, emulator_url: str, api_key: str, body: str) -> list[Row]:
    settings = Settings(
        redis_url=redis_url,
        celery_broker_url=redis_url,
        runcomfy_base_url=emulator_url,
        runcomfy_api_token=EMULATOR_TOKEN,
        log_level="WARNING",
    )
    app = create_app({"SETTINGS": settings, "TESTING": True})  # TESTING: keep our logging
    warm_up(app)
    ctx: ServiceContext = app.extensions["inpaint_gateway"]
    raw = body.encode()

    def call(method: str, path: str, payload: bytes = b"") -> None:
        statuses: list[str] = []
        environ = {
            "REQUEST_METHOD": method, "PATH_INFO": path, "SCRIPT_NAME": "", "QUERY_STRING": "",
            "SERVER_NAME": "bench", "SERVER_PORT": "8000", "SERVER_PROTOCOL": "HTTP/1.1",
            "HTTP_HOST": "bench:8000", "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(payload),
            "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": True,
            "wsgi.run_once": False, "CONTENT_TYPE": "application/json",
            "CONTENT_LENGTH": str(len(payload)), "HTTP_AUTHORIZATION": f"Bearer {api_key}",
        }  # fmt: skip

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Callable[[bytes], object]:
            statuses.append(status)
            return lambda _data: None

        for _ in app(environ, start_response):
            pass
        if not statuses or not statuses[0].startswith(("200", "202")):
            raise RuntimeError(f"{method} {path} answered {statuses}")

    schema = JobCreateSchema()
    loaded = schema.load(json.loads(body))

    def job() -> Any:
        return new_job(
            client_id="cli_bench",
            input={name: loaded[name] for name in INPUT_FIELDS},
            webhook_url=None,
            webhook_events=tuple(loaded["webhook_events"]),
            metadata=None,
            deadline_s=settings.job_deadline_s,
        )

    wakeup = ctx.commands.wakeups.pending(DISPATCH_JOBS_TASK)
    one = job()
    links = ctx.store.media_links(time.time())
    n = sizes.ingest_inprocess_calls
    us = {
        "healthz": _cpu_us(n, lambda: call("GET", "/healthz")),
        "post": _cpu_us(n, lambda: call("POST", "/v1/jobs", raw)),
        "create": _cpu_us(n, lambda: ctx.store.create(job(), wakeup=wakeup)),
        "schema": _cpu_us(n, lambda: schema.load(json.loads(body))),
        "job": _cpu_us(n, lambda: job().to_json()),
        "answer": _cpu_us(n, lambda: app.json.dumps(one.to_resource(links))),
    }
    pieces = us["create"] + us["schema"] + us["job"] + us["answer"]
    return [
        Row("ingest", f"in-process CPU per call (the app as WSGI, no gunicorn; {n} calls each): "
            "GET /healthz / POST /v1/jobs",
            f"{fmt(us['healthz'], 'µs', 0)} / {fmt(us['post'], 'µs', 0)}"),
        Row("ingest", "of a POST in-process: the write (JobStore.create) / schema (body JSON and "
            "load) / the job and its JSON / the answer's JSON / the rest (framework)",
            " / ".join(fmt(us[k], "µs", 0) for k in ("create", "schema", "job", "answer"))
            + f" / {fmt(us['post'] - pieces, 'µs', 0)}"),
    ]  # fmt: skip


def _cpu_us(n: int, call: Callable[[], object]) -> float:
    """This process's CPU microseconds per call, after a few warm-up calls."""
    cpu_s, _wall_s = per_call(n, call, cpu_clock=time.process_time, warm_up=min(n, 50))
    return cpu_s * 1e6
