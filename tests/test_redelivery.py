"""A redelivery that meets an attempt in flight: never lost, never two attempts at once (real Redis)."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import pytest
import redis

from core.clients import ClientStore
from core.jobs import Status, new_job
from core.metrics import Counters
from core.settings import Settings
from core.store import JobStore
from core.webhooks import DELIVERED, PENDING, WebhookEvent, build_event
from workers.delivery import AttemptResult, WebhookDelivery

pytestmark = pytest.mark.integration
LAST_ATTEMPT = len(Settings().webhook_retry_schedule_s) - 1


def final_event(scratch: redis.Redis, **state: Any) -> tuple[WebhookDelivery, WebhookEvent]:
    """A succeeded job's final event, stored and scheduled with `state`, and a delivery."""
    store = JobStore(scratch, retention_s=604800)
    client_id = ClientStore(scratch).create("team").client_id
    job = new_job(
        client_id=client_id,
        input={"prompt": "p"},
        webhook_url="https://hooks.example.com/a",
        webhook_events=("job.succeeded",),
        metadata=None,
        deadline_s=900,
    ).moved_to(Status.SUCCEEDED, time.time(), output_images=("https://x/1.png",))
    now = time.time()
    event = replace(build_event(job, "job.succeeded", now, store.media_links(now)), **state)
    store.outbox.put_event(event, is_new=True)
    delivery = WebhookDelivery(
        store, ClientStore(scratch), Settings(), Counters(scratch), on_place_freed=lambda: None
    )
    return delivery, event


def reset(event: WebhookEvent) -> WebhookEvent:
    """What a redelivery stores: the same event, pending again from its first attempt."""
    return replace(event, state=PENDING, next_attempt_at=time.time(), attempts=0)


def test_a_redelivery_during_an_attempt_waits_for_it_and_then_goes(
    scratch: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client asks for a redelivery while the event's last attempt is in flight. The event
    is not made due while that attempt holds it (a second dispatch would POST it at the same
    time), and the attempt's answer (503: out of attempts) does not overwrite the reset — which
    ended the event exhausted and unscheduled after the API had answered 202."""
    delivery, event = final_event(scratch, attempts=LAST_ATTEMPT)
    schedule = delivery.store.outbox.schedule
    assert schedule.claim(limit=10, lease_s=40) == [event.webhook_id]
    lease_end = schedule.due_at(event.webhook_id)
    seen_during: list[float | None] = []

    def redelivered_meanwhile(sent: WebhookEvent, headers: dict[str, str]) -> AttemptResult:
        delivery.store.outbox.put_event(reset(sent), is_new=False)
        seen_during.append(schedule.due_at(sent.webhook_id))
        return AttemptResult(503, "HTTP 503")

    real_leave = delivery._leave

    def leave(receiver: str, webhook_id: str, take_next: object) -> object:
        seen_during.append(schedule.due_at(webhook_id))  # not due before the place is given up
        return real_leave(receiver, webhook_id, take_next)  # type: ignore[arg-type]

    monkeypatch.setattr(delivery, "_post", redelivered_meanwhile)
    monkeypatch.setattr(delivery, "_leave", leave)
    delivery.deliver(event.webhook_id)
    assert seen_during == [lease_end, lease_end]  # held: no second dispatch could claim it
    stored = delivery.store.outbox.get_event(event.webhook_id)
    assert stored is not None and stored.state == PENDING and stored.attempts == 0
    due_at = schedule.due_at(event.webhook_id)
    assert due_at is not None and due_at <= time.time()  # due now: the redelivery goes
    assert len(delivery.store.outbox.deliveries(event.job_id)) == 1  # the attempt is on record


@pytest.mark.parametrize("was", ["delivered", "waiting for its next attempt"])
def test_a_redelivery_of_an_event_not_in_flight_is_due_at_once(
    scratch: redis.Redis, was: str
) -> None:
    """Settled, or pending with its next attempt 5 minutes away (scheduled then, not claimed:
    the schedule's time is the event's own): due now."""
    if was == "delivered":
        delivery, event = final_event(scratch, state=DELIVERED, next_attempt_at=None, attempts=1)
        delivery.store.outbox.schedule.remove(delivery.store.redis, event.webhook_id)
    else:
        later = time.time() + 300
        delivery, event = final_event(scratch, attempts=2, next_attempt_at=later)
        assert delivery.store.outbox.schedule.due_at(event.webhook_id) == later
    delivery.store.outbox.put_event(reset(event), is_new=False)
    due_at = delivery.store.outbox.schedule.due_at(event.webhook_id)
    assert due_at is not None and due_at <= time.time()


def test_a_redelivery_is_not_unscheduled_by_an_attempt_that_found_the_event_settled(
    scratch: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dispatch took a stale entry of a delivered event and read it settled; a redelivery
    reset it just after that read. Taking the entry off the schedule then would leave the
    event pending and never due."""
    delivery, event = final_event(scratch, state=DELIVERED, next_attempt_at=None, attempts=1)
    settled = delivery.store.outbox.get_event(event.webhook_id)
    real_get = delivery.store.outbox.get_event

    def read_then_redelivered(webhook_id: str) -> WebhookEvent | None:
        delivery.store.outbox.put_event(reset(event), is_new=False)
        monkeypatch.setattr(delivery.store.outbox, "get_event", real_get)
        return settled

    monkeypatch.setattr(delivery.store.outbox, "get_event", read_then_redelivered)
    delivery.deliver(event.webhook_id)
    due_at = delivery.store.outbox.schedule.due_at(event.webhook_id)
    assert due_at is not None and due_at <= time.time()
