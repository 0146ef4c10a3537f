"""A receiver's line: at most N attempts in flight, the rest wait in order (real Redis)."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from cli.stack import wait_until
from core.clients import ClientStore
from core.metrics import Counters
from core.schedule import DueSchedule
from core.settings import Settings
from core.store import JobStore
from workers.delivery import HeldPlace, WebhookDelivery
from workers.receiver_lines import SETTLE_S, ReceiverLines, receiver_of
from workers.tasks import AttemptThreads

SCHEDULE = "test:due:webhooks"
LEASE_S = 40.0


def lines(client: redis.Redis, concurrency: int) -> ReceiverLines:
    return ReceiverLines(client, schedule_key=SCHEDULE, concurrency=concurrency, lease_s=LEASE_S)


def claimed(client: redis.Redis, *webhook_ids: str, at: float = 100.0) -> None:
    """As a dispatch leaves them when it takes them: scheduled, held under a lease."""
    client.zadd(SCHEDULE, {w: at + LEASE_S for w in webhook_ids})


def due(client: redis.Redis, webhook_id: str) -> float | None:
    return client.zscore(SCHEDULE, webhook_id)


def test_one_receiver_is_one_clients_origin() -> None:
    same = receiver_of("cli_a", "https://Hooks.Example.com/a?x=1")
    assert receiver_of("cli_a", "https://hooks.example.com:443/b") == same
    assert receiver_of("cli_b", "https://hooks.example.com/a") != same  # another team's line
    assert receiver_of("cli_a", "http://hooks.example.com/a") != same
    assert receiver_of("cli_a", "https://hooks.example.com:8443/a") != same


def test_places_up_to_the_cap_then_a_line_in_order(scratch: redis.Redis) -> None:
    line = lines(scratch, concurrency=2)
    claimed(scratch, "w1", "w2", "w3", "w4")
    assert line.enter("r", "w1", now=100.0) is None
    assert line.enter("r", "w2", now=101.0) is None
    assert line.in_flight("r") == 2
    # Full: w3 and w4 wait; each is due at the latest when the oldest place's lease ends.
    assert line.enter("r", "w3", now=102.0) == 100.0 + LEASE_S
    assert line.enter("r", "w4", now=103.0) == 100.0 + LEASE_S
    assert due(scratch, "w3") == 100.0 + LEASE_S
    # A place frees: the first in line is due now, and only it.
    assert line.leave("r", "w1", now=110.0).made_due == 1
    assert due(scratch, "w3") == 110.0
    assert due(scratch, "w4") == 100.0 + LEASE_S
    claimed(scratch, "w3", at=110.1)
    assert line.enter("r", "w3", now=110.2) is None
    assert line.leave("r", "w2", now=111.0).made_due == 1
    assert due(scratch, "w4") == 111.0
    claimed(scratch, "w4", at=111.1)
    assert line.enter("r", "w4", now=111.2) is None
    assert line.leave("r", "w3", now=112.0).made_due == 0  # nobody left in line
    assert line.leave("r", "w4", now=112.0).made_due == 0
    assert line.in_flight("r") == 0


def test_a_newcomer_does_not_take_the_place_of_those_in_line(scratch: redis.Redis) -> None:
    line = lines(scratch, concurrency=1)
    claimed(scratch, "w1", "w2", "new")
    assert line.enter("r", "w1", now=100.0) is None
    assert line.enter("r", "w2", now=101.0) is not None
    assert line.leave("r", "w1", now=110.0).made_due == 1  # w2's turn; its dispatch is on the way
    assert line.enter("r", "new", now=110.1) is not None  # claimed first, but behind w2
    assert line.enter("r", "w2", now=110.2) is None
    assert line.leave("r", "w2", now=111.0).made_due == 1
    assert due(scratch, "new") == 111.0


def test_an_attempt_a_dispatch_has_claimed_is_not_made_due_again(scratch: redis.Redis) -> None:
    """The race that would send one event twice at once: w2's safety-net time comes, a dispatch
    claims it, and before it enters, a place frees. The line must leave w2's claim alone."""
    line = lines(scratch, concurrency=1)
    claimed(scratch, "w1", "w2")
    assert line.enter("r", "w1", now=100.0) is None
    parked_until = line.enter("r", "w2", now=101.0)
    assert parked_until == 100.0 + LEASE_S
    claimed(scratch, "w2", at=parked_until)  # a dispatch takes it when it comes due
    assert line.leave("r", "w1", now=parked_until + 0.1).made_due == 0
    assert due(scratch, "w2") == parked_until + LEASE_S  # still the dispatch's lease
    assert line.enter("r", "w2", now=parked_until + 0.2) is None


def test_as_many_are_made_due_as_there_are_places_free(scratch: redis.Redis) -> None:
    claimed(scratch, "a", "w1", "w2", "w3", "w4")
    line = lines(scratch, concurrency=1)
    assert line.enter("r", "a", now=100.0) is None
    for i, w in enumerate(("w1", "w2", "w3", "w4")):
        assert line.enter("r", w, now=101.0 + i) is not None
    raised = lines(scratch, concurrency=3)  # WEBHOOK_RECEIVER_CONCURRENCY raised meanwhile
    assert raised.leave("r", "a", now=110.0).made_due == 3
    assert [due(scratch, w) for w in ("w1", "w2", "w3")] == [110.0, 110.0, 110.0]
    assert due(scratch, "w4") == 100.0 + LEASE_S


def test_a_killed_workers_place_frees_when_its_lease_ends(scratch: redis.Redis) -> None:
    line = lines(scratch, concurrency=1)
    claimed(scratch, "w1", "w2")
    assert line.enter("r", "w1", now=100.0) is None  # its worker dies: leave never comes
    assert line.enter("r", "w2", now=100.0 + LEASE_S - 1) == 100.0 + LEASE_S
    assert line.enter("r", "w2", now=100.0 + LEASE_S + 1) is None


def test_the_line_drops_events_no_longer_scheduled(scratch: redis.Redis) -> None:
    line = lines(scratch, concurrency=1)
    claimed(scratch, "w1", "gone", "w3")
    assert line.enter("r", "w1", now=100.0) is None
    assert line.enter("r", "gone", now=101.0) is not None
    assert line.enter("r", "w3", now=102.0) is not None
    scratch.zrem(SCHEDULE, "gone")  # e.g. its job deleted while it waited
    assert line.leave("r", "w1", now=110.0).made_due == 1
    assert due(scratch, "w3") == 110.0
    assert due(scratch, "gone") is None  # not brought back


def test_an_event_that_ends_while_in_line_passes_its_turn_on(scratch: redis.Redis) -> None:
    line = lines(scratch, concurrency=1)
    claimed(scratch, "w1", "w2", "w3")
    assert line.enter("r", "w1", now=100.0) is None
    assert line.enter("r", "w2", now=101.0) is not None
    assert line.enter("r", "w3", now=102.0) is not None
    # w2's turn: but its event is no longer pending
    assert line.leave("r", "w1", now=110.0).made_due == 1
    assert line.leave("r", "w2", now=110.5).made_due == 1  # so it leaves the line, and w3 goes
    assert due(scratch, "w3") == 110.5


def test_with_nothing_in_flight_a_waiter_looks_again_soon(scratch: redis.Redis) -> None:
    line = lines(scratch, concurrency=1)
    claimed(scratch, "w1", "w2", "w3")
    assert line.enter("r", "w1", now=100.0) is None
    assert line.enter("r", "w2", now=101.0) is not None
    assert line.leave("r", "w1", now=110.0).made_due == 1  # w2 made due, not yet claimed
    assert line.enter("r", "w3", now=110.1) == 110.1 + SETTLE_S


def test_a_place_can_be_handed_straight_to_the_first_in_line(scratch: redis.Redis) -> None:
    line = lines(scratch, concurrency=1)
    claimed(scratch, "w1", "w2", "w3")
    assert line.enter("r", "w1", now=100.0) is None
    assert line.enter("r", "w2", now=101.0) is not None
    assert line.enter("r", "w3", now=102.0) is not None
    left = line.leave("r", "w1", now=110.0, hand_over=True)
    assert (left.handed_over, left.made_due) == ("w2", 0)
    # w2 holds the place and is claimed for the caller, as a dispatch and an enter would leave it.
    assert due(scratch, "w2") == 110.0 + LEASE_S
    assert line.in_flight("r") == 1
    assert line.enter("r", "w3", now=110.1) is not None  # still behind
    assert line.leave("r", "w2", now=111.0, hand_over=True).handed_over == "w3"
    assert line.leave("r", "w3", now=112.0, hand_over=True).handed_over is None
    assert line.in_flight("r") == 0


def test_a_hand_over_takes_one_and_makes_the_next_due(scratch: redis.Redis) -> None:
    claimed(scratch, "a", "w1", "w2", "w3")
    line = lines(scratch, concurrency=1)
    assert line.enter("r", "a", now=100.0) is None
    for i, w in enumerate(("w1", "w2", "w3")):
        assert line.enter("r", w, now=101.0 + i) is not None
    raised = lines(scratch, concurrency=2)
    left = raised.leave("r", "a", now=110.0, hand_over=True)
    assert (left.handed_over, left.made_due) == ("w1", 1)
    assert due(scratch, "w2") == 110.0
    assert due(scratch, "w3") == 100.0 + LEASE_S


def test_a_claimed_attempt_is_never_handed_over(scratch: redis.Redis) -> None:
    """Like the race above, with a hand-over: w2 is on its way with a dispatch already."""
    line = lines(scratch, concurrency=1)
    claimed(scratch, "w1", "w2")
    assert line.enter("r", "w1", now=100.0) is None
    parked_until = line.enter("r", "w2", now=101.0)
    assert parked_until is not None
    claimed(scratch, "w2", at=parked_until)
    left = line.leave("r", "w1", now=parked_until + 0.1, hand_over=True)
    assert (left.handed_over, left.made_due) == (None, 0)
    assert due(scratch, "w2") == parked_until + LEASE_S


def test_a_due_attempt_handed_over_is_not_claimed_by_a_dispatch(scratch: redis.Redis) -> None:
    """w1 was made due but no dispatch took it yet; a place frees and it is handed over: from
    then on it is not due, so no dispatch can send it a second time."""
    schedule = DueSchedule(scratch, SCHEDULE)
    line = lines(scratch, concurrency=2)
    claimed(scratch, "a", "b", "w1")
    assert line.enter("r", "a", now=100.0) is None
    assert line.enter("r", "b", now=100.0) is None
    assert line.enter("r", "w1", now=101.0) is not None
    assert line.leave("r", "a", now=110.0).made_due == 1
    assert line.leave("r", "b", now=110.5, hand_over=True).handed_over == "w1"
    assert schedule.claim(limit=10, lease_s=LEASE_S, now=111.0) == []
    assert due(scratch, "w1") == 110.5 + LEASE_S


def handed_place(scratch: redis.Redis) -> tuple[WebhookDelivery, HeldPlace]:
    """A delivery with a cap of 1 whose place was just handed over to w2 (w2 has no event)."""
    store = JobStore(scratch, retention_s=3600)
    delivery = WebhookDelivery(
        store,
        ClientStore(scratch),
        Settings(webhook_receiver_concurrency=1),
        Counters(scratch),
        on_place_freed=lambda: None,
    )
    receiver = receiver_of("cli_1", "https://hooks.example.com/a")
    now = time.time()
    scratch.zadd(store.outbox.schedule.key, {"w1": now + LEASE_S, "w2": now + LEASE_S})
    assert delivery.lines.enter(receiver, "w1", now) is None
    assert delivery.lines.enter(receiver, "w2", now) is not None
    handed = delivery.lines.leave(receiver, "w1", now, hand_over=True).handed_over
    assert handed == "w2" and delivery.lines.in_flight(receiver) == 1
    return delivery, HeldPlace(receiver, handed)


def test_a_place_handed_to_an_event_gone_meanwhile_is_freed_at_once(scratch: redis.Redis) -> None:
    """Its job's records expired while it waited: the place must not stay held for a lease."""
    delivery, place = handed_place(scratch)
    assert delivery.deliver_held(place, take_next=lambda: True) is None
    assert delivery.lines.in_flight(place.receiver) == 0


def test_a_handed_place_is_freed_when_its_attempt_fails_early(
    scratch: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    delivery, place = handed_place(scratch)

    def broken(webhook_id: str) -> None:
        raise redis.ConnectionError("a blip")

    monkeypatch.setattr(delivery.store.outbox, "get_event", broken)
    with pytest.raises(redis.ConnectionError):
        delivery.deliver_held(place, take_next=lambda: True)
    assert delivery.lines.in_flight(place.receiver) == 0


def test_a_thread_takes_the_next_in_line_only_while_another_is_free_and_not_draining() -> None:
    threads = AttemptThreads(size=2)
    hold = threading.Event()
    asked: list[bool] = []

    def first_attempt() -> None:
        asked.append(threads.may_go_on())
        hold.wait(5)

    first = threads.start(first_attempt)
    wait_until(lambda: len(asked) == 1, timeout_s=5, what="the first attempt running")
    second = threads.start(lambda: asked.append(threads.may_go_on()))
    second.result(timeout=5)
    assert asked == [True, False]  # alone: another thread free; beside the first: none free
    hold.set()
    first.result(timeout=5)
    threads.draining = True
    threads.start(lambda: asked.append(threads.may_go_on())).result(timeout=5)
    assert asked[-1] is False
