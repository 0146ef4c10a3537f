"""The paid account's own trouble on the real stack: out of balance or a refused token makes
jobs wait, never fail, and no paid run is lost; when it is over, every job goes on to its end."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from cli.stack import Stack
from core.account import PROBE_KEY, TROUBLE_KEY, WAITING_KEY, AccountState
from core.clients import ClientStore
from tests.support.api import ApiClient
from tests.test_end_to_end import job_body, submits_for, unique

pytestmark = pytest.mark.integration
RECOVERY_S = 45.0  # a probe within ~12 s of the top-up, the waiting jobs woken by its success


@pytest.fixture
def account(stack: Stack, redis_client: redis.Redis) -> Iterator[Callable[[str], None]]:
    """Switch the emulated account; put it back, and forget any trouble, after the test."""

    def switch(state: str) -> None:
        answer = stack.emulator("/_emulator/faults", method="POST", json={"account": state})
        assert answer.status_code == 200

    yield switch
    stack.emulator("/_emulator/reset", method="POST")
    redis_client.delete(TROUBLE_KEY, PROBE_KEY, WAITING_KEY)


def metrics(api_client: ApiClient) -> dict[str, float]:
    text = api_client.http.get("/metrics").get_data(as_text=True)
    samples = (line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("inpaint_"))
    return {name: float(value) for name, value in samples}


def statuses(api_client: ApiClient, ids: list[str]) -> list[str]:
    return [api_client.get(f"/v1/jobs/{i}").get_json()["status"] for i in ids]


def refusals(stack: Stack, http_status: int) -> int:
    return int(stack.emulator("/_emulator/stats").json()["responses"].get(str(http_status), 0))


def test_out_of_balance_jobs_wait_queued_then_all_succeed_and_a_running_one_finishes(
    stack: Stack,
    api_client: ApiClient,
    redis_client: redis.Redis,
    account: Callable[[str], None],
) -> None:
    paid = api_client.post(
        "/v1/jobs", json=job_body(stack, unique("paid [emulator:queue=0] [emulator:run=6]"))
    ).get_json()
    api_client.wait_for(paid["id"], lambda j: j["status"] == "running")
    account("out_of_balance")
    prompts = [unique(f"broke {n}") for n in range(4)]
    ids = [api_client.post("/v1/jobs", json=job_body(stack, p)).get_json()["id"] for p in prompts]

    time.sleep(4)
    assert statuses(api_client, ids) == ["queued"] * 4
    trouble = AccountState(redis_client).current()
    assert trouble is not None and trouble.kind == "out_of_balance" and "402" in trouble.detail
    seen = metrics(api_client)
    assert seen["inpaint_gateway_account_out_of_balance"] == 1
    assert seen["inpaint_gateway_account_token_refused"] == 0
    assert seen["inpaint_gateway_account_refusals_out_of_balance_total"] >= 1
    # The run RunComfy had already accepted goes on to its end: nothing paid is lost.
    final = api_client.wait_final(paid["id"], timeout_s=20)
    assert final["status"] == "succeeded" and final["cost"]["usd"] > 0

    refused_before = refusals(stack, 402)
    time.sleep(12)  # the jobs refused first come back; only one of them may probe
    assert refusals(stack, 402) - refused_before <= 2
    assert statuses(api_client, ids) == ["queued"] * 4
    assert all(submits_for(stack, p) == 0 for p in prompts)  # nothing was paid

    account("ok")
    ended = [api_client.wait_final(i, timeout_s=RECOVERY_S) for i in ids]
    assert [j["status"] for j in ended] == ["succeeded"] * 4
    assert all(submits_for(stack, p) == 1 for p in prompts)
    assert AccountState(redis_client).current() is None
    assert metrics(api_client)["inpaint_gateway_account_out_of_balance"] == 0


def test_a_refused_token_holds_queued_and_running_jobs_until_it_is_taken_again(
    stack: Stack,
    api_client: ApiClient,
    redis_client: redis.Redis,
    account: Callable[[str], None],
) -> None:
    running = api_client.post(
        "/v1/jobs", json=job_body(stack, unique("going [emulator:queue=0] [emulator:run=3]"))
    ).get_json()
    api_client.wait_for(running["id"], lambda j: j["status"] == "running")
    account("token_refused")
    queued = [
        api_client.post("/v1/jobs", json=job_body(stack, unique(f"no token {n}"))).get_json()["id"]
        for n in range(2)
    ]
    time.sleep(5)  # the run is over at RunComfy by now, but no look is answered
    assert statuses(api_client, [running["id"], *queued]) == ["running", "queued", "queued"]
    trouble = AccountState(redis_client).current()
    assert trouble is not None and trouble.kind == "token_refused"
    assert metrics(api_client)["inpaint_gateway_account_token_refused"] == 1

    account("ok")
    ended = [api_client.wait_final(i, timeout_s=RECOVERY_S) for i in [running["id"], *queued]]
    assert [j["status"] for j in ended] == ["succeeded"] * 3
    assert AccountState(redis_client).current() is None


def test_a_job_waiting_on_the_account_still_expires_at_its_deadline_costing_nothing(
    stack: Stack,
    make_app: Callable[..., Any],
    redis_client: redis.Redis,
    account: Callable[[str], None],
) -> None:
    short = ApiClient(
        ClientStore(redis_client).create("short-deadline"),
        make_app(JOB_DEADLINE_S="6").test_client(),
    )
    account("out_of_balance")
    job = short.post("/v1/jobs", json=job_body(stack, unique("never paid"))).get_json()
    final = short.wait_final(job["id"], timeout_s=20)
    assert final["status"] == "expired" and final["error"]["code"] == "deadline_exceeded"
    assert final["cost"] == {"usd": 0.0, "source": "list_price"}
