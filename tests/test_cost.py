"""The cost of a job: the list price shared through Redis, and costs end to end on the real stack."""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from cli.stack import EMULATOR_TOKEN, Stack, wait_until
from core.pricing import FRESH_S, LOCK_KEY, PRICE_KEY, RETRY_AFTER_FAILURE_S, ListPrice
from tests.support.api import ApiClient
from tests.test_end_to_end import job_body, unique
from workers.runcomfy import RunComfyClient, TransientUpstreamError

pytestmark = pytest.mark.integration
MODEL = "tongyi-mai/z-image/turbo/inpainting/lora"


class Fetch:
    """A stand-in for RunComfy's price route: counts its calls; slow or failing on demand."""

    def __init__(self, price: float = 0.0125, *, delay_s: float = 0.0) -> None:
        self.price: float | None = price
        self.delay_s = delay_s
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            self.calls += 1
        time.sleep(self.delay_s)
        if self.price is None:
            raise TransientUpstreamError("GET /v1/models/m: HTTP 503")
        return self.price


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def faults(stack: Stack) -> Iterator[Any]:
    def set_faults(**knobs: Any) -> None:
        assert stack.emulator("/_emulator/faults", method="POST", json=knobs).status_code == 200

    yield set_faults
    stack.emulator("/_emulator/reset", method="POST")


# --- the list price, shared -------------------------------------------------------------------


def test_a_cold_cache_under_load_makes_one_call_and_every_caller_gets_its_answer(
    scratch: redis.Redis,
) -> None:
    fetch = Fetch(0.0125, delay_s=0.3)
    answers: list[float | None] = []

    def ask() -> None:  # each its own ListPrice, as each worker and API replica has
        answers.append(ListPrice(scratch, fetch=fetch).usd_per_image(wait_s=2.0))

    threads = [threading.Thread(target=ask) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert fetch.calls == 1
    assert answers == [0.0125] * 16


def test_the_price_is_fetched_again_only_after_10_minutes_for_every_replica(
    scratch: redis.Redis,
) -> None:
    clock, fetch = Clock(), Fetch(0.0125)
    one, other = (
        ListPrice(scratch, fetch=fetch, clock=clock),
        ListPrice(scratch, fetch=fetch, clock=clock),
    )
    assert one.usd_per_image() == 0.0125 and fetch.calls == 1
    fetch.price = 0.02
    clock.now += FRESH_S - 1
    assert other.usd_per_image() == 0.0125 and fetch.calls == 1
    clock.now += 2
    assert other.usd_per_image() == 0.02 and fetch.calls == 2
    assert one.usd_per_image() == 0.02 and fetch.calls == 2


def test_a_failing_refresh_keeps_the_last_known_price_and_is_tried_once_per_30_s(
    scratch: redis.Redis,
) -> None:
    clock, fetch = Clock(), Fetch(0.0125)
    prices = ListPrice(scratch, fetch=fetch, clock=clock)
    assert prices.usd_per_image() == 0.0125
    fetch.price, clock.now = None, clock.now + FRESH_S + 1
    assert prices.usd_per_image() == 0.0125 and fetch.calls == 2
    assert ListPrice(scratch, fetch=fetch, clock=clock).usd_per_image() == 0.0125
    assert fetch.calls == 2  # not again at once, by anyone
    assert 0 < scratch.pttl(LOCK_KEY) <= RETRY_AFTER_FAILURE_S * 1000
    scratch.delete(LOCK_KEY)  # as when the 30 s are over
    fetch.price = 0.03
    assert prices.usd_per_image() == 0.03 and fetch.calls == 3


def test_with_no_price_ever_known_a_failing_fetch_gives_none_and_no_one_waits_on_it(
    scratch: redis.Redis,
) -> None:
    fetch = Fetch()
    fetch.price = None
    assert ListPrice(scratch, fetch=fetch).usd_per_image(wait_s=2.0) is None
    started = time.monotonic()
    assert ListPrice(scratch, fetch=fetch).usd_per_image(wait_s=2.0) is None
    assert time.monotonic() - started < 0.5 and fetch.calls == 1


@pytest.mark.parametrize("bad", [-0.01, math.nan, math.inf])
def test_a_price_that_is_no_price_is_a_failed_refresh(scratch: redis.Redis, bad: float) -> None:
    assert ListPrice(scratch, fetch=Fetch(bad)).usd_per_image() is None
    assert not scratch.exists(PRICE_KEY)


def test_the_list_price_comes_from_runcomfys_model_route(
    stack: Stack, scratch: redis.Redis, faults: Any
) -> None:
    client = RunComfyClient(
        base_url=stack.emulator_url, token=EMULATOR_TOKEN, model_id=MODEL, timeout_s=5
    )
    try:
        clock = Clock()
        prices = ListPrice(scratch, fetch=client.list_price_usd, clock=clock)
        assert prices.usd_per_image() == 0.0125
        faults(base_price_usd=0.02)
        assert prices.usd_per_image() == 0.0125  # cached
        clock.now += FRESH_S
        assert prices.usd_per_image() == 0.02
        faults(rate_5xx=1.0)
        clock.now += FRESH_S
        assert prices.usd_per_image() == 0.02  # the route fails: the last known price
    finally:
        client.close()


# --- cost end to end --------------------------------------------------------------------------


def test_a_job_costs_what_runcomfy_says_it_cost_in_the_resource_and_the_webhook(
    stack: Stack, api_client: ApiClient, receiver: Any, faults: Any
) -> None:
    faults(base_price_usd=0.05)
    body = job_body(stack, unique("costed"), webhook_url=receiver.url)
    job = api_client.post("/v1/jobs", json=body).get_json()
    assert job["cost"] is None
    final = api_client.wait_final(job["id"])
    assert final["status"] == "succeeded"
    assert final["cost"] == {"usd": 0.05, "source": "upstream"}
    [event] = wait_until(receiver.received, what="webhook")
    assert event.payload["data"]["cost"] == {"usd": 0.05, "source": "upstream"}


def test_without_runcomfys_cost_a_job_costs_the_list_price_times_its_images(
    stack: Stack,
    api_client: ApiClient,
    receiver: Any,
    redis_client: redis.Redis,
    faults: Any,
) -> None:
    faults(include_cost=False, base_price_usd=0.07)
    redis_client.delete(PRICE_KEY, LOCK_KEY)  # the workers fetch the price anew
    body = job_body(stack, unique("list priced"), webhook_url=receiver.url)
    job = api_client.post("/v1/jobs", json=body).get_json()
    final = api_client.wait_final(job["id"])
    assert final["status"] == "succeeded" and len(final["output"]["images"]) == 1
    assert final["cost"] == {"usd": 0.07, "source": "list_price"}
    [event] = wait_until(receiver.received, what="webhook")
    assert event.payload["data"]["cost"] == {"usd": 0.07, "source": "list_price"}
    redis_client.delete(PRICE_KEY)  # leave no price of this test for the next


def test_a_job_cancelled_while_queued_at_runcomfy_costs_nothing(
    stack: Stack, api_client: ApiClient
) -> None:
    job = api_client.post(
        "/v1/jobs", json=job_body(stack, unique("[emulator:queue=30]"))
    ).get_json()
    api_client.wait_for(job["id"], lambda j: j["status"] == "submitted")
    assert api_client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    final = api_client.wait_final(job["id"])
    assert final["status"] == "cancelled"
    assert final["cost"] is not None and final["cost"]["usd"] == 0.0


def test_the_api_can_fetch_the_list_price_without_loading_celery() -> None:
    """The API builds the same fetch as the workers (RunComfyClient.list_price_usd)."""
    probe = (
        "import sys, core.pricing, core.account, workers.runcomfy; "
        "print(sorted(m for m in sys.modules if m == 'celery' or m.startswith('celery.')))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert loaded.stdout.strip() == "[]"
