"""The workers' autoscaling signal, read the way KEDA reads it, from the gateway's /metrics.

deploy/worker-scaledobject.yaml asks Prometheus for the due work: job steps and webhook
attempts whose time has come and that no worker has taken. These tests seed the real schedules
in a Redis database no worker watches, scrape the real /metrics, and work the ScaledObject's
own query out over that scrape: it must count exactly the due, untaken members.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from cli.stack import Stack
from core.store import JobStore

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
# The shape the due-work query keeps: a sum of `max(gauge)` terms, one per schedule. `max`, as
# every API replica reports the same figures (they live in Redis).
SUM_OF_MAXIMA = re.compile(r"max\((\w+)\)(?:\s*\+\s*max\((\w+)\))*")


def due_work_trigger() -> dict[str, Any]:
    """The ScaledObject trigger on due work."""
    scaled = yaml.safe_load((DEPLOY / "worker-scaledobject.yaml").read_text())
    (trigger,) = [t for t in scaled["spec"]["triggers"] if t.get("name") == "due-work"]
    return dict(trigger)


def query_value(query: str, scrape: str) -> float:
    """`query` (a sum of maxima over gauges) worked out over one /metrics scrape."""
    assert SUM_OF_MAXIMA.fullmatch(query.strip()), query
    samples: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(scrape):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample.value)
    names = re.findall(r"max\((\w+)\)", query)
    missing = [name for name in names if name not in samples]
    assert not missing, f"/metrics has no {missing}: the scaler would see no value"
    return sum(max(samples[name]) for name in names)


@pytest.fixture
def gateway(stack: Stack, scratch: redis.Redis, make_app: Callable[..., Any]) -> Any:
    """An API app whose store is the scratch database (no worker or beat takes its work)."""
    kwargs = scratch.connection_pool.connection_kwargs
    url = stack.redis_server.url.rsplit("/", 1)[0] + f"/{kwargs['db']}"
    return make_app(REDIS_URL=url, CELERY_BROKER_URL=url)


def test_due_work_query_counts_due_untaken_steps_and_attempts(
    gateway: Any, scratch: redis.Redis
) -> None:
    store: JobStore = gateway.extensions["inpaint_gateway"].store
    http = gateway.test_client()
    query = due_work_trigger()["metadata"]["query"]

    def scaler_reads() -> float:
        resp = http.get("/metrics")
        assert resp.status_code == 200
        return query_value(query, resp.get_data(as_text=True))

    assert scaler_reads() == 0
    now = time.time()
    for n in range(5):
        store.job_schedule.put(scratch, f"job_due_{n}", now - 1 - n)
    store.job_schedule.put(scratch, "job_later", now + 600)
    for n in range(3):
        store.outbox.schedule.put(scratch, f"whk_due_{n}", now - 1)
    store.outbox.schedule.put(scratch, "whk_later", now + 600)
    assert scaler_reads() == 5 + 3, "due steps and attempts count; those due later do not"

    # A worker's claim holds members under a lease: taken work is no longer waiting for one.
    store.job_schedule.claim(limit=2, lease_s=60)
    store.outbox.schedule.claim(limit=3, lease_s=60)
    assert scaler_reads() == 3
