"""One team's burst of 2,000 jobs does not starve another team's single job.

Bound, stated and measured: with the in-flight cap full of the burst, the other client's job is
admitted when the next slot frees (round-robin: it is next in line) and so ends within
FAIRNESS_BOUND_S of being posted — one burst job's run (1 s here) plus its own run and polls. In
FIFO order it would wait for the 2,000 jobs ahead of it: 2,000 / 20 slots x ~2 s = ~200 s.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.stack import Stack, wait_until
from core.clients import ClientStore
from core.jobs import new_job
from core.store import JobStore, connect_redis
from service import create_app
from tests.support.api import ApiClient
from tests.support.stack import start_stack
from tests.test_end_to_end import job_body, unique

pytestmark = pytest.mark.integration
BURST = 2000
MAX_IN_FLIGHT = 20
FAIRNESS_BOUND_S = 8.0


@pytest.fixture
def fair_stack(tmp_path: Path) -> Iterator[Stack]:
    env = {"RUNCOMFY_MAX_IN_FLIGHT": str(MAX_IN_FLIGHT), "RUNCOMFY_MAX_RPS": "500"}
    stack = start_stack(tmp_path, env=env, emulator_args=("--queue-s", "0", "--run-s", "1"))
    try:
        yield stack
    finally:
        stack.stop()


def test_a_burst_does_not_delay_another_clients_job(fair_stack: Stack) -> None:
    stack = fair_stack
    settings = stack.settings()
    redis_client = connect_redis(stack.redis_server.url)
    clients = ClientStore(redis_client)
    big = clients.create("big-team")
    small = ApiClient(
        clients.create("small-team"),
        create_app({"TESTING": True, "SETTINGS": settings}).test_client(),
    )
    store = JobStore(redis_client, retention_s=settings.job_retention_s)
    burst_body = job_body(stack, unique("burst"))
    # The burst goes in through the store (the API's accept path, minus HTTP), fast enough that
    # all 2,000 wait at once.
    for _ in range(BURST):
        store.create(
            new_job(
                client_id=big.client_id,
                input=burst_body,
                webhook_url=None,
                webhook_events=(),
                metadata=None,
                deadline_s=settings.job_deadline_s,
            )
        )
    wait_until(lambda: store.admission.in_flight() == MAX_IN_FLIGHT, timeout_s=20, what="cap full")
    posted = time.monotonic()
    job = small.post("/v1/jobs", json=job_body(stack, unique("small"))).get_json()
    final = small.wait_final(job["id"], timeout_s=60)
    waited = time.monotonic() - posted
    waiting = store.admission.waiting()
    print(
        f"\nfairness: other client's job final after {waited:.2f} s with {waiting} burst jobs still waiting (bound {FAIRNESS_BOUND_S} s)"
    )
    assert final["status"] == "succeeded"
    assert waiting > BURST / 2  # the burst was still there: the job really jumped the line
    assert waited < FAIRNESS_BOUND_S
    redis_client.close()
