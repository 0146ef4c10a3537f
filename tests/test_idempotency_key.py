"""Idempotency-Key on POST /v1/jobs: a retried request never makes a second job."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from cli.stack import Stack
from core.clients import ClientStore
from tests.support.api import ApiClient
from tests.test_end_to_end import job_body, unique

pytestmark = pytest.mark.integration


def test_same_key_same_body_returns_the_first_job(stack: Stack, api_client: ApiClient) -> None:
    body = job_body(stack, unique("idem"))
    first = api_client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-1"})
    again = api_client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-1"})
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.get_json()["id"] == first.get_json()["id"]
    assert again.headers["Location"] == first.headers["Location"]
    other = api_client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-2"})
    assert other.status_code == 202 and other.get_json()["id"] != first.get_json()["id"]
    assert len(api_client.get("/v1/jobs").get_json()["jobs"]) == 2


def test_same_key_other_body_is_a_conflict(stack: Stack, api_client: ApiClient) -> None:
    headers = {"Idempotency-Key": "order-9"}
    assert (
        api_client.post("/v1/jobs", json=job_body(stack, unique("a")), headers=headers).status_code
        == 202
    )
    resp = api_client.post("/v1/jobs", json=job_body(stack, unique("b")), headers=headers)
    assert resp.status_code == 409 and resp.mimetype == "application/problem+json"
    assert "different body" in resp.get_json()["detail"]
    assert len(api_client.get("/v1/jobs").get_json()["jobs"]) == 1


def test_keys_belong_to_one_client(
    stack: Stack, app: Any, redis_client: Any, api_client: ApiClient
) -> None:
    other = ApiClient(ClientStore(redis_client).create("other"), app.test_client())
    body = job_body(stack, unique("shared-key"))
    mine = api_client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k"})
    theirs = other.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k"})
    assert (mine.status_code, theirs.status_code) == (202, 202)
    assert mine.get_json()["id"] != theirs.get_json()["id"]


@pytest.mark.parametrize("key", ["", "x" * 256, "naïve", "two words"])
def test_malformed_keys_are_refused(stack: Stack, api_client: ApiClient, key: str) -> None:
    resp = api_client.post("/v1/jobs", json=job_body(stack, "p"), headers={"Idempotency-Key": key})
    assert resp.status_code == 400
    assert api_client.get("/v1/jobs").get_json()["jobs"] == []


@pytest.mark.parametrize("round_", range(5))
def test_concurrent_identical_requests_create_one_job(
    stack: Stack, app: Any, api_client: ApiClient, round_: int
) -> None:
    body = job_body(stack, unique("race"))
    threads = 32
    start = threading.Barrier(threads)

    def post(_: int) -> tuple[int, str]:
        http = ApiClient(api_client.creds, app.test_client())
        start.wait()
        resp = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "race-key"})
        return resp.status_code, resp.get_json()["id"]

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(post, range(threads)))
    assert sorted(code for code, _ in results) == [200] * (threads - 1) + [202]
    assert len({job_id for _, job_id in results}) == 1
    assert len(api_client.get("/v1/jobs").get_json()["jobs"]) == 1
