"""A team's slow webhook receiver holds up neither other teams nor the job pipeline.

The slow receiver answers only after SLOW_S (within WEBHOOK_TIMEOUT_S, so every attempt
succeeds, late). Before attempts ran beside their dispatch, each one held a worker slot that
long: the other team's webhook came 3-6 s after its POST instead of ~0.4 s. And it never has
more than WEBHOOK_RECEIVER_CONCURRENCY attempts at once: the rest wait in its line.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from cli.listener import WebhookReceiver
from core.clients import ClientStore
from core.metrics import Counters
from core.store import connect_redis
from service import create_app
from tests.conftest import STACK_ENV, ApiClient, Stack, start_stack, wait_until
from tests.test_end_to_end import job_body, unique

pytestmark = pytest.mark.integration
SLOW_S = 2.0  # each answer of the slow receiver; WEBHOOK_TIMEOUT_S is 3 in the test stack
PER_RECEIVER = 2
SLOW_JOBS = 10
OTHER_TEAM_BOUND_S = 1.5  # POST to verified webhook, with nothing slow about: ~0.4 s here


@dataclass
class SlowReceiver(WebhookReceiver):
    """Verifies every event like any receiver, then takes SLOW_S to answer; counts how many
    requests it holds at once."""

    holding: int = 0
    most_held: int = 0
    _count: threading.Lock = field(default_factory=threading.Lock)

    def _accept(self, body: bytes, headers: dict[str, str]) -> int:
        with self._count:
            self.holding += 1
            self.most_held = max(self.most_held, self.holding)
        try:
            time.sleep(SLOW_S)
            return super()._accept(body, headers)
        finally:
            with self._count:
                self.holding -= 1


def start_slow_stack(base: Path, **env: str) -> Stack:
    assert float(STACK_ENV["WEBHOOK_TIMEOUT_S"]) > SLOW_S
    return start_stack(base, env=env, emulator_args=("--queue-s", "0", "--run-s", "0.3"))


@dataclass
class Teams:
    stack: Stack
    redis: redis.Redis
    slow_team: ApiClient
    other_team: ApiClient
    slow: SlowReceiver
    other: WebhookReceiver

    def post_slow_jobs(self) -> list[str]:
        """SLOW_JOBS jobs of the slow team, a little apart (so several dispatches take them)."""
        ids = []
        for _ in range(SLOW_JOBS):
            body = job_body(self.stack, unique("slow"), webhook_url=self.slow.url)
            ids.append(self.slow_team.post("/v1/jobs", json=body).get_json()["id"])
            time.sleep(0.1)
        wait_until(lambda: self.slow.holding > 0, timeout_s=20, what="the slow receiver busy")
        return ids

    def other_team_round_trips(self) -> list[float]:
        """Seconds from the other team's POST to its verified webhook, three times."""
        took = []
        for _ in range(3):
            posted = time.time()
            body = job_body(self.stack, unique("other"), webhook_url=self.other.url)
            job_id = self.other_team.post("/v1/jobs", json=body).get_json()["id"]
            event = wait_until(
                lambda job_id=job_id: next(
                    (e for e in self.other.received() if e.payload["data"]["id"] == job_id), None
                ),
                timeout_s=30,
                what="the other team's webhook",
            )
            took.append(event.received_at - posted)
            time.sleep(0.3)
        return took

    def wait_all_slow_delivered(self, ids: list[str], per_receiver: int) -> None:
        wait_until(
            lambda: {e.payload["data"]["id"] for e in self.slow.received()} == set(ids),
            timeout_s=len(ids) * SLOW_S / per_receiver + 30,
            what="every slow event delivered",
        )


@contextmanager
def teams(base: Path, **env: str) -> Iterator[Teams]:
    stack = start_slow_stack(base, **env)
    redis_client = connect_redis(stack.redis_server.url)
    try:
        clients = ClientStore(redis_client)
        app = create_app({"TESTING": True, "SETTINGS": stack.settings()})
        slow_team = ApiClient(clients.create("slow-team"), app.test_client())
        other_team = ApiClient(clients.create("other-team"), app.test_client())
        slow = SlowReceiver(secret=slow_team.creds.webhook_secret).start()
        other = WebhookReceiver(secret=other_team.creds.webhook_secret).start()
        try:
            yield Teams(stack, redis_client, slow_team, other_team, slow, other)
        finally:
            other.stop()
            slow.stop()
    finally:
        redis_client.close()
        stack.stop()


def test_a_slow_receiver_holds_up_no_other_team(tmp_path: Path) -> None:
    with teams(tmp_path) as t:  # the default cap: the slow receiver may hold all its attempts
        slow_ids = t.post_slow_jobs()
        took = t.other_team_round_trips()
        busy_meanwhile = t.slow.holding > 0
        t.wait_all_slow_delivered(slow_ids, per_receiver=SLOW_JOBS)
        print(
            f"\nslow receiver: other team's POST -> webhook {[round(x, 2) for x in took]} s "
            f"(bound {OTHER_TEAM_BOUND_S}); the slow receiver held up to {t.slow.most_held}"
        )
        assert busy_meanwhile  # it was still holding attempts all along
        assert t.slow.most_held > 2  # more attempts at once than worker slots (-c 2)
        assert max(took) < OTHER_TEAM_BOUND_S


def test_a_receiver_never_has_more_than_its_cap_at_once(tmp_path: Path) -> None:
    with teams(tmp_path, WEBHOOK_RECEIVER_CONCURRENCY=str(PER_RECEIVER)) as t:
        slow_ids = t.post_slow_jobs()
        took = t.other_team_round_trips()
        t.wait_all_slow_delivered(slow_ids, per_receiver=PER_RECEIVER)
        waited = Counters(t.redis).read()["webhook_attempts_waited"]
        print(
            f"\nreceiver cap {PER_RECEIVER}: held at most {t.slow.most_held}; attempts put back "
            f"in line {waited}; other team's POST -> webhook {[round(x, 2) for x in took]} s"
        )
        assert t.slow.most_held == PER_RECEIVER
        assert waited > 0
        assert max(took) < OTHER_TEAM_BOUND_S
        # Each event once: an attempt in line is not an attempt (no delivery recorded for it).
        for job_id in slow_ids:
            codes = wait_until(
                lambda job_id=job_id: [
                    d["status_code"]
                    for d in t.slow_team.get(f"/v1/jobs/{job_id}/deliveries").get_json()[
                        "deliveries"
                    ]
                ],
                what="the delivery recorded",
            )
            assert codes == [204]
