"""Production gunicorn settings: `gunicorn -c python:service.gunicorn_conf "service:create_app()"`."""

from __future__ import annotations

import gc
import multiprocessing
import os
from typing import Any

from core.settings import DEFAULT_API_WAIT_SLOTS

bind = os.environ.get("API_BIND", "0.0.0.0:8000")
# Requests are short and mostly wait on Redis: a few threads per process, two processes per core
# (measured: one per core left ~40% of the CPU idle at full load, the threads waiting on Redis).
worker_class = "gthread"
workers = int(os.environ.get("WEB_CONCURRENCY", 2 * multiprocessing.cpu_count()))
# Threads for ordinary requests, plus one for each `?wait` the process may hold at once (those
# wait on an event, not the CPU; beyond API_WAIT_SLOTS a wait is answered at once).
threads = int(os.environ.get("API_THREADS", 4)) + int(
    os.environ.get("API_WAIT_SLOTS", DEFAULT_API_WAIT_SLOTS)
)
timeout = 30
graceful_timeout = 20
keepalive = 5
max_requests = 200000  # a leak guard, not a routine: each restart costs about a second of CPU
max_requests_jitter = 20000
accesslog = None  # request counts and errors are in /metrics and the app's JSON logs
errorlog = "-"
control_socket_disable = True  # gunicorn 27's socket in $HOME would be shared by every instance


def post_worker_init(worker: Any) -> None:
    """Ready the loaded app before the first request, then freeze what it allocated.

    Freezing moves those objects out of the garbage collector's sight: a full collection walks
    every object (about 65,000 after start-up: ~18 ms with the worker's threads stopped) — a
    latency spike for every request in flight. They live as long as the process, so freezing
    them changes nothing but the pause.
    """
    from service import warm_up

    warm_up(worker.wsgi)
    gc.freeze()
