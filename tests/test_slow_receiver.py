"""A team's slow webhook receiver holds up neither other teams nor the job pipeline.

The slow receiver answers only after `slow_s` (within WEBHOOK_TIMEOUT_S, so every attempt
succeeds, late). Before attempts ran beside their dispatch, each one held a worker slot that
long: the other team's webhook came 2-6 s after its POST instead of ~0.35 s. And a receiver
never has more than WEBHOOK_RECEIVER_CONCURRENCY attempts at once: the rest wait in its line.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from cli.listener import WebhookReceiver
from cli.stack import Stack, wait_until
from core.clients import ClientStore
from core.http.egress import EgressPolicy, egress_session
from core.http.names import LOOKUP_TIMEOUT_S, NameLookup
from core.metrics import Counters
from core.settings import Settings
from core.store import JobStore, connect_redis
from core.webhooks import WebhookEvent
from service import create_app
from tests.support.api import ApiClient
from tests.support.peers import dns_peer, raw_peer
from tests.support.stack import start_stack
from tests.test_end_to_end import job_body, unique
from workers.delivery import WebhookDelivery

pytestmark = pytest.mark.integration
SLOW_JOBS = 10
OTHER_TEAM_BOUND_S = 1.5  # POST to verified webhook, with nothing slow about: ~0.35 s here


@dataclass
class SlowReceiver(WebhookReceiver):
    """Verifies every event like any receiver, but answers only after `slow_s`; counts the
    requests it holds at once."""

    slow_s: float = 2.0
    holding: int = 0
    most_held: int = 0
    _count: threading.Lock = field(default_factory=threading.Lock)

    def _accept(self, body: bytes, headers: dict[str, str]) -> int:
        with self._count:
            self.holding += 1
            self.most_held = max(self.most_held, self.holding)
        try:
            time.sleep(self.slow_s)
            return super()._accept(body, headers)
        finally:
            with self._count:
                self.holding -= 1


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

    def other_team_round_trips(self) -> list[tuple[float, bool]]:
        """Seconds from the other team's POST to its verified webhook, three times, each with
        whether the slow receiver was holding attempts all along."""
        rounds = []
        for _ in range(3):
            busy_before = self.slow.holding > 0
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
            rounds.append((event.received_at - posted, busy_before and self.slow.holding > 0))
            time.sleep(0.2)
        return rounds

    def wait_all_slow_delivered(self, ids: list[str], at_once: int) -> None:
        wait_until(
            lambda: {e.payload["data"]["id"] for e in self.slow.received()} == set(ids),
            timeout_s=len(ids) * self.slow.slow_s / at_once + 30,
            what="every slow event delivered",
        )


@contextmanager
def teams(base: Path, slow_s: float, **env: str) -> Iterator[Teams]:
    env.setdefault("WEBHOOK_TIMEOUT_S", str(slow_s + 3))  # every slow attempt succeeds
    stack = start_stack(base, env=env, emulator_args=("--queue-s", "0", "--run-s", "0.3"))
    redis_client = connect_redis(stack.redis_server.url)
    try:
        clients = ClientStore(redis_client)
        app = create_app({"TESTING": True, "SETTINGS": stack.settings()})
        slow_team = ApiClient(clients.create("slow-team"), app.test_client())
        other_team = ApiClient(clients.create("other-team"), app.test_client())
        slow = SlowReceiver(secret=slow_team.creds.webhook_secret, slow_s=slow_s).start()
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
    with teams(tmp_path, slow_s=6.0) as t:  # the default cap: it may hold all its attempts
        slow_ids = t.post_slow_jobs()
        rounds = t.other_team_round_trips()
        t.wait_all_slow_delivered(slow_ids, at_once=SLOW_JOBS)
        took = [round(seconds, 2) for seconds, _ in rounds]
        print(
            f"\nslow receiver: other team's POST -> webhook {took} s (bound "
            f"{OTHER_TEAM_BOUND_S}); the slow receiver held up to {t.slow.most_held} at once"
        )
        assert all(busy for _, busy in rounds)  # the slow receiver held attempts all along
        assert t.slow.most_held > 2  # more attempts at once than the worker has slots (-c 2)
        assert max(took) < OTHER_TEAM_BOUND_S


def test_a_receiver_never_has_more_than_its_cap_at_once(tmp_path: Path) -> None:
    cap = 2
    with teams(tmp_path, slow_s=1.0, WEBHOOK_RECEIVER_CONCURRENCY=str(cap)) as t:
        slow_ids = t.post_slow_jobs()
        t.wait_all_slow_delivered(slow_ids, at_once=cap)
        counts = Counters(t.redis).read()
        waited, handed = counts["webhook_attempts_waited"], counts["webhook_places_handed_over"]
        print(
            f"\nreceiver cap {cap}: held at most {t.slow.most_held}; waited in line {waited}; "
            f"places handed straight to the next {handed}"
        )
        assert t.slow.most_held == cap
        assert waited > 0
        assert handed > 0  # the line moved by hand-over: an ended attempt's thread took the next
        # Each event went once: waiting in line is not an attempt (no delivery recorded for it).
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


@pytest.mark.parametrize("to", ["main process", "process group"])
def test_a_stopping_worker_lets_its_attempts_end(tmp_path: Path, to: str) -> None:
    """SIGTERM as Kubernetes and compose send it (to the main process) and as a terminal's
    Ctrl-C or `kill -- -PGID` does (to every process of the group)."""
    with teams(tmp_path, slow_s=2.0) as t:
        body = job_body(t.stack, unique("slow"), webhook_url=t.slow.url)
        job_id = t.slow_team.post("/v1/jobs", json=body).get_json()["id"]
        wait_until(lambda: t.slow.holding > 0, timeout_s=20, what="the attempt under way")
        worker = t.stack.worker.process
        assert worker is not None
        if to == "main process":  # its dispatch task has long returned
            os.kill(worker.pid, signal.SIGTERM)
        else:
            t.stack.worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0
        # The attempt ended before the worker did: answered, and recorded.
        assert [e.payload["data"]["id"] for e in t.slow.received()] == [job_id]
        deliveries = t.slow_team.get(f"/v1/jobs/{job_id}/deliveries").get_json()["deliveries"]
        assert [d["status_code"] for d in deliveries] == [204]


@contextmanager
def dripping_receiver(every_s: float, at_once: bytes = b"") -> Iterator[str]:
    """A hostile receiver: reads each request, sends `at_once`, then the rest of a 204 answer a
    byte every `every_s` — each byte well within any read timeout. Yields its URL."""

    def drip(connection: socket.socket, stop: threading.Event) -> None:
        connection.recv(65536)
        connection.sendall(at_once)
        for byte in b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"[len(at_once) :]:
            if stop.is_set():
                return
            connection.sendall(bytes([byte]))
            time.sleep(every_s)

    with raw_peer(drip, connections=100) as port:
        yield f"http://127.0.0.1:{port}/hook"


@pytest.mark.parametrize(
    "at_once", [b"", b"HTTP/1.1 204 No Content\r\n"], ids=["status dripped", "headers dripped"]
)
def test_a_receiver_dripping_its_answer_is_cut_off_at_webhook_timeout_s(
    tmp_path: Path, at_once: bytes
) -> None:
    """Each attempt ends at WEBHOOK_TIMEOUT_S in all (its answer would take ~6-13 s), recorded
    as timed out — also when the status came whole and only the headers were cut off — and
    retried on the schedule: the receiver holds no thread past its time."""
    env = {"WEBHOOK_TIMEOUT_S": "2", "WEBHOOK_RETRY_SCHEDULE": "0,1"}
    with (
        teams(tmp_path, slow_s=0.0, **env) as t,
        dripping_receiver(every_s=0.3, at_once=at_once) as url,
    ):
        body = job_body(t.stack, unique("drip"), webhook_url=url)
        job_id = t.slow_team.post("/v1/jobs", json=body).get_json()["id"]

        def both_attempts() -> list[dict[str, Any]] | None:
            found = t.slow_team.get(f"/v1/jobs/{job_id}/deliveries").get_json()["deliveries"]
            return found if len(found) == 2 else None

        deliveries = wait_until(both_attempts, timeout_s=30, what="both attempts recorded")
        print(f"\ndripping receiver: attempts took {[d['duration_ms'] for d in deliveries]} ms")
        for delivery in deliveries:
            assert delivery["status_code"] is None
            assert delivery["error"] == "timed out after 2 s"
            assert 1900 <= delivery["duration_ms"] < 3500


def test_a_receiver_whose_name_servers_do_not_answer_holds_an_attempt_only_the_lookup_limit(
    scratch: redis.Redis,
) -> None:
    """The attempt gives the host name up at LOOKUP_TIMEOUT_S, inside WEBHOOK_TIMEOUT_S, and
    is recorded as a failed attempt (retried on the schedule), not waited out for the system
    resolver's retries."""
    delivery = WebhookDelivery(
        JobStore(scratch, retention_s=3600),
        ClientStore(scratch),
        Settings(webhook_timeout_s=10),
        Counters(scratch),
        on_place_freed=lambda: None,
    )
    event = WebhookEvent(
        webhook_id="msg_dns",
        job_id="job_dns",
        client_id="cli_dns",
        type="job.succeeded",
        url="https://hangs.example.com/hook",
        body="{}",
        created_at=time.time(),
    )
    with dns_peer(silent=True) as peer:
        delivery.session = egress_session(EgressPolicy(names=NameLookup((peer.address,))))
        started = time.monotonic()
        result = delivery._post(event, {})
        took_s = time.monotonic() - started
    assert result.status_code is None
    assert result.error == (
        f"refused destination: webhook host hangs.example.com did not resolve within "
        f"{LOOKUP_TIMEOUT_S:g} s"
    )
    assert LOOKUP_TIMEOUT_S <= took_s < LOOKUP_TIMEOUT_S + 1.0
