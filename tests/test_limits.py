"""Limits per client (PRODUCT §9): each refuses exactly at its edge with its documented problem
and stores nothing; a budget holds under concurrent POSTs; max-in-flight holds at RunComfy while
another client's job goes straight through; usage adds up; API keys rotate and are revoked."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from cli.stack import Stack
from core.clients import ClientStore, NewClientCredentials
from core.limits import ClientLimits
from core.store import PREFIX, connect_redis
from core.usage import CLIENT_METRICS_KEY
from tests.support.api import ApiClient

pytestmark = pytest.mark.integration

LIMITS_DB = 3
PRICE_USD = 0.02  # the list price the isolated app estimates with
PROBLEM_JSON = "application/problem+json"
BODY = {
    "prompt": "paint the sky red",
    "image_url": "https://images.example.com/in.png",
    "mask_image_url": "https://images.example.com/mask.png",
}
# Keys a refused POST may change: counters of what happened, and the wake-up flags that come and
# go by themselves. Nothing else.
VOLATILE = (PREFIX + "counters", CLIENT_METRICS_KEY)


@dataclass
class Limited:
    """An API app on a Redis database no worker reads (its jobs stay queued), and a client."""

    redis: redis.Redis
    clients: ClientStore
    http: Any
    creds: NewClientCredentials

    def headers(self, creds: NewClientCredentials | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {(creds or self.creds).api_key}"}

    def post(self, creds: NewClientCredentials | None = None) -> Any:
        return self.http.post("/v1/jobs", json=BODY, headers=self.headers(creds))

    def limit(self, **limits: Any) -> None:
        assert self.clients.set_limits(self.creds.client_id, ClientLimits(**limits)) is not None

    def cancel(self, job_id: str) -> None:
        resp = self.http.post(f"/v1/jobs/{job_id}/cancel", headers=self.headers())
        assert resp.status_code == 202 and resp.get_json()["status"] == "cancelled"

    def snapshot(self) -> dict[str, Any]:
        """Every key with its value, but for counters and the short-lived wake-up flags."""
        seen: dict[str, Any] = {}
        for key in sorted(self.redis.scan_iter()):
            if key in VOLATILE or key.startswith(PREFIX + "wakeup:"):
                continue
            kind = self.redis.type(key)
            seen[key] = {
                "string": self.redis.get,
                "hash": self.redis.hgetall,
                "list": lambda k: self.redis.lrange(k, 0, -1),
                "set": self.redis.smembers,
                "zset": lambda k: self.redis.zrange(k, 0, -1, withscores=True),
            }[kind](key)
        return seen


@pytest.fixture
def limited(stack: Stack, make_app: Callable[..., Any]) -> Iterator[Limited]:
    url = stack.redis_server.url.rsplit("/", 1)[0] + f"/{LIMITS_DB}"
    client = connect_redis(url)
    client.flushdb()
    app = make_app(REDIS_URL=url, CELERY_BROKER_URL=url)
    # The price source is tested on its own (tests/test_cost.py); here a fixed one keeps the
    # budget's arithmetic exact.
    app.extensions["inpaint_gateway"].commands.list_price_usd = lambda: PRICE_USD
    clients = ClientStore(client)
    yield Limited(client, clients, app.test_client(), clients.create("limited"))
    client.flushdb()
    client.close()


def assert_refused_storing_nothing(
    limited: Limited, status: int, type_end: str, before: dict[str, Any]
) -> Any:
    """POST once more: refused with `status` and a problem whose type ends `type_end`; the
    store holds exactly what it held before."""
    resp = limited.post()
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.mimetype == PROBLEM_JSON
    problem = resp.get_json()
    assert problem["type"].endswith("/" + type_end) and problem["status"] == status
    assert limited.snapshot() == before
    return resp


def test_rate_per_min_refuses_exactly_past_its_edge_with_ratelimit_headers(
    limited: Limited,
) -> None:
    limited.limit(rate_per_min=5)
    remaining = []
    for _ in range(5):
        resp = limited.post()
        assert resp.status_code == 202, resp.get_data(as_text=True)
        assert resp.headers["RateLimit-Policy"] == '"per-minute";q=5;w=60'
        remaining.append(resp.headers["RateLimit"].split(";")[1])
    assert remaining == ["r=4", "r=3", "r=2", "r=1", "r=0"]
    resp = assert_refused_storing_nothing(limited, 429, "rate-limited", limited.snapshot())
    retry_after = int(resp.headers["Retry-After"])
    assert 1 <= retry_after <= 12  # one slot comes back every 12 s
    assert resp.headers["RateLimit"] == f'"per-minute";r=0;t={retry_after}'
    refused = limited.redis.hget(
        CLIENT_METRICS_KEY, f"{limited.creds.client_id}|refused_rate_limited"
    )
    assert int(refused or 0) == 1


def test_max_queued_refuses_the_job_past_it_until_one_ends(limited: Limited) -> None:
    limited.limit(max_queued=3)
    ids = []
    for _ in range(3):
        resp = limited.post()
        assert resp.status_code == 202
        ids.append(resp.get_json()["id"])
    resp = assert_refused_storing_nothing(limited, 429, "too-many-jobs", limited.snapshot())
    assert int(resp.headers["Retry-After"]) >= 1
    limited.cancel(ids[0])  # one ends: room for one more, and only one
    assert limited.post().status_code == 202
    assert_refused_storing_nothing(limited, 429, "too-many-jobs", limited.snapshot())


def test_a_budget_reserves_each_job_and_refuses_the_one_that_would_pass_it(
    limited: Limited,
) -> None:
    limited.limit(budget_usd=5 * PRICE_USD, budget_period="month")
    ids = [limited.post().get_json()["id"] for _ in range(5)]
    resp = assert_refused_storing_nothing(limited, 402, "budget-exceeded", limited.snapshot())
    budget = resp.get_json()["budget"]
    assert budget["period"] == "month" and budget["limit_usd"] == pytest.approx(0.1)
    assert budget["spent_usd"] == 0 and budget["reserved_usd"] == pytest.approx(0.1)
    assert budget["remaining_usd"] == 0
    # A job cancelled before it reached RunComfy cost nothing: its reservation comes back.
    limited.cancel(ids[0])
    usage = limited.http.get("/v1/usage", headers=limited.headers()).get_json()
    assert usage["budget"]["reserved_usd"] == pytest.approx(0.08)
    assert usage["total"]["jobs"]["cancelled"] == 1 and usage["total"]["cost_usd"] == 0
    assert limited.post().status_code == 202


def test_forty_concurrent_posts_against_a_budget_of_five_jobs_accept_exactly_five(
    limited: Limited,
) -> None:
    limited.limit(budget_usd=5 * PRICE_USD, budget_period="day")
    statuses: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(40)

    def post() -> None:
        start.wait()
        status = limited.post().status_code
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=post) for _ in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(statuses) == [202] * 5 + [402] * 35
    jobs = limited.http.get("/v1/jobs?limit=100", headers=limited.headers()).get_json()["jobs"]
    assert len(jobs) == 5


def test_usage_answers_the_days_asked_for_and_refuses_a_bad_span(limited: Limited) -> None:
    limited.limit(max_queued=10, rate_per_min=100)
    limited.cancel(limited.post().get_json()["id"])
    usage = limited.http.get("/v1/usage", headers=limited.headers()).get_json()
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert usage["client_id"] == limited.creds.client_id
    assert usage["from"] <= today <= usage["to"] and usage["from"].endswith("-01")
    day = next(d for d in usage["days"] if d["date"] == today)
    assert day["jobs"] == {"succeeded": 0, "failed": 0, "cancelled": 1, "expired": 0}
    assert usage["limits"]["max_queued"] == 10 and usage["limits"]["rate_per_min"] == 100
    assert usage["budget"] is None
    one_day = limited.http.get(
        f"/v1/usage?from={today}&to={today}", headers=limited.headers()
    ).get_json()
    assert [d["date"] for d in one_day["days"]] == [today]
    for query, field in (
        ("from=2026-13-01", "from"),
        ("from=2026-02-02&to=2026-02-01", "from"),
        ("from=2024-01-01&to=2025-01-02", "to"),
        ("since=2026-01-01", "since"),
    ):
        resp = limited.http.get(f"/v1/usage?{query}", headers=limited.headers())
        assert resp.status_code == 422, query
        assert field in resp.get_json()["errors"], (query, resp.get_json())


def test_a_rotated_key_works_through_its_overlap_then_is_refused(limited: Limited) -> None:
    overlap_s = 1.5
    rotated_at = time.monotonic()
    new_key = limited.clients.rotate_api_key(limited.creds.client_id, overlap_s=overlap_s)
    assert new_key is not None and new_key != limited.creds.api_key
    new = NewClientCredentials(limited.creds.client_id, new_key, limited.creds.webhook_secret)
    assert limited.post().status_code == 202  # the old key, within its overlap
    assert limited.post(new).status_code == 202
    refused_at = wait_for_refusal(limited, limited.creds, timeout_s=5)
    assert overlap_s - 0.1 <= refused_at - rotated_at <= overlap_s + 1.0
    assert limited.post(new).status_code == 202  # the new key goes on working


def test_a_rotation_without_overlap_refuses_the_old_key_at_once_and_keeps_the_new_one(
    limited: Limited,
) -> None:
    new_key = limited.clients.rotate_api_key(limited.creds.client_id, overlap_s=0)
    assert new_key is not None
    new = NewClientCredentials(limited.creds.client_id, new_key, limited.creds.webhook_secret)
    time.sleep(0.6)  # past the API's key cache
    assert limited.post().status_code == 401
    assert limited.post(new).status_code == 202
    assert limited.clients.revoke(limited.creds.client_id)
    time.sleep(0.6)
    assert limited.post(new).status_code == 401


def test_a_revoked_key_is_refused_within_one_second(limited: Limited) -> None:
    assert limited.post().status_code == 202  # the key is in the API's cache now
    revoked_at = time.monotonic()
    assert limited.clients.revoke(limited.creds.client_id)
    refused_at = wait_for_refusal(limited, limited.creds, timeout_s=5)
    assert refused_at - revoked_at <= 1.0


def wait_for_refusal(limited: Limited, creds: NewClientCredentials, timeout_s: float) -> float:
    """Ask with `creds` every 20 ms until the API answers 401; the moment it did (monotonic)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        resp = limited.http.get("/v1/jobs?limit=1", headers=limited.headers(creds))
        if resp.status_code == 401:
            return time.monotonic()
        assert resp.status_code == 200
        time.sleep(0.02)
    raise AssertionError(f"the key was still taken after {timeout_s} s")


def test_max_in_flight_holds_at_runcomfy_while_another_clients_job_goes_straight_through(
    stack: Stack, api_client: ApiClient, make_app: Callable[..., Any]
) -> None:
    clients = ClientStore(connect_redis(stack.redis_server.url))
    capped = api_client
    assert clients.set_limits(capped.creds.client_id, ClientLimits(max_in_flight=2))
    other = ApiClient(clients.create("other"), make_app().test_client())
    body = {
        "image_url": stack.emulator_url + "/samples/image.png",
        "mask_image_url": stack.emulator_url + "/samples/mask.png",
    }
    run = "[emulator:queue=0][emulator:run=1.5]"
    capped_ids = [
        capped.post("/v1/jobs", json=body | {"prompt": f"capped {i} {run}"}).get_json()["id"]
        for i in range(6)
    ]
    live_seen: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            counts = stack.emulator("/_emulator/stats").json()["requests"]
            live_seen.append(counts.get("in_queue", 0) + counts.get("in_progress", 0))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        time.sleep(0.5)  # the capped client holds its two slots
        started = time.monotonic()
        other_id = other.post(
            "/v1/jobs", json=body | {"prompt": "other [emulator:queue=0][emulator:run=0.2]"}
        ).get_json()["id"]
        assert other.wait_final(other_id, timeout_s=30)["status"] == "succeeded"
        other_took_s = time.monotonic() - started
        finals = [capped.wait_final(job_id, timeout_s=60) for job_id in capped_ids]
    finally:
        stop.set()
        sampler.join()
    assert [job["status"] for job in finals] == ["succeeded"] * 6
    # Six runs of 1.5 s two at a time take three rounds; the other client's job did not wait
    # for them.
    assert other_took_s < 3.0, other_took_s
    assert max(live_seen) <= 3, live_seen  # two of the capped client's, one of the other's
    assert max(live_seen) >= 2


def test_usage_and_metrics_add_up_to_the_costs_of_the_jobs(
    stack: Stack, api_client: ApiClient
) -> None:
    body = {
        "image_url": stack.emulator_url + "/samples/image.png",
        "mask_image_url": stack.emulator_url + "/samples/mask.png",
    }
    prompts = [
        "a [emulator:run=0.2]",
        "b [emulator:run=0.2]",
        "c [emulator:fail]",
        "d [emulator:queue=20]",  # cancelled while queued at RunComfy: costs nothing
    ]
    ids = [api_client.post("/v1/jobs", json=body | {"prompt": p}).get_json()["id"] for p in prompts]
    api_client.wait_for(ids[3], lambda job: job["status"] == "submitted")
    assert api_client.post(f"/v1/jobs/{ids[3]}/cancel").status_code == 202
    jobs = [api_client.wait_final(job_id) for job_id in ids]
    assert [job["status"] for job in jobs] == ["succeeded", "succeeded", "failed", "cancelled"]
    assert jobs[0]["cost"]["usd"] > 0 and jobs[3]["cost"]["usd"] == 0
    costs = sum(job["cost"]["usd"] for job in jobs)
    usage = api_client.get("/v1/usage").get_json()
    assert usage["total"]["cost_usd"] == pytest.approx(costs, abs=1e-9)
    assert usage["total"]["jobs"] == {"succeeded": 2, "failed": 1, "cancelled": 1, "expired": 0}
    metrics = api_client.http.get("/metrics").get_data(as_text=True)
    client_id = api_client.creds.client_id
    spend = next(
        line for line in metrics.splitlines()
        if line.startswith(f'inpaint_gateway_client_spend_usd_total{{client_id="{client_id}"}}')
    )  # fmt: skip
    assert float(spend.rsplit(" ", 1)[1]) == pytest.approx(costs, abs=1e-9)
    count = next(
        line for line in metrics.splitlines()
        if line.startswith("inpaint_gateway_client_time_to_result_seconds_count")
        and f'client_id="{client_id}"' in line
    )  # fmt: skip
    assert float(count.rsplit(" ", 1)[1]) == 4
