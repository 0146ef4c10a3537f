"""A receiver's line: at most N attempts in flight, the rest wait in order (real Redis)."""

from __future__ import annotations

import redis

from workers.receiver_lines import ReceiverLines, receiver_of

SCHEDULE = "test:due:webhooks"
LEASE_S = 40.0


def lines(client: redis.Redis, concurrency: int = 2) -> ReceiverLines:
    return ReceiverLines(client, schedule_key=SCHEDULE, concurrency=concurrency, lease_s=LEASE_S)


def claimed(client: redis.Redis, *webhook_ids: str, until: float = 1_000.0) -> None:
    """As a dispatch leaves them: in the schedule, held under a lease."""
    client.zadd(SCHEDULE, {w: until for w in webhook_ids})


def test_one_receiver_is_one_clients_origin() -> None:
    same = receiver_of("cli_a", "https://Hooks.Example.com/a?x=1")
    assert receiver_of("cli_a", "https://hooks.example.com:443/b") == same
    assert receiver_of("cli_b", "https://hooks.example.com/a") != same  # another team's line
    assert receiver_of("cli_a", "http://hooks.example.com/a") != same
    assert receiver_of("cli_a", "https://hooks.example.com:8443/a") != same


def test_places_up_to_the_cap_then_a_line_in_order(scratch: redis.Redis) -> None:
    line = lines(scratch)
    claimed(scratch, "w1", "w2", "w3", "w4")
    assert line.enter("r", "w1", now=100.0) is None
    assert line.enter("r", "w2", now=101.0) is None
    assert line.in_flight("r") == 2
    # Full: w3 and w4 wait; each is due at the latest when the oldest place's lease ends.
    assert line.enter("r", "w3", now=102.0) == 100.0 + LEASE_S
    assert line.enter("r", "w4", now=103.0) == 100.0 + LEASE_S
    assert scratch.zscore(SCHEDULE, "w3") == 100.0 + LEASE_S
    # A place frees: the first in line is due now, and only it.
    assert line.leave("r", "w1", now=110.0) == "w3"
    assert scratch.zscore(SCHEDULE, "w3") == 110.0
    assert scratch.zscore(SCHEDULE, "w4") == 100.0 + LEASE_S
    assert line.enter("r", "w3", now=110.5) is None
    assert line.leave("r", "w2", now=111.0) == "w4"
    assert line.leave("r", "w3", now=112.0) is None  # nobody left in line
    assert line.in_flight("r") == 0


def test_other_receivers_are_not_held_up(scratch: redis.Redis) -> None:
    line = lines(scratch, concurrency=1)
    claimed(scratch, "w1", "w2", "x1")
    assert line.enter("slow", "w1", now=100.0) is None
    assert line.enter("slow", "w2", now=100.0) is not None
    assert line.enter("fast", "x1", now=100.0) is None


def test_a_killed_workers_place_frees_when_its_lease_ends(scratch: redis.Redis) -> None:
    line = lines(scratch, concurrency=1)
    claimed(scratch, "w1", "w2")
    assert line.enter("r", "w1", now=100.0) is None  # its worker dies: leave never comes
    assert line.enter("r", "w2", now=100.0 + LEASE_S - 1) is not None
    assert line.enter("r", "w2", now=100.0 + LEASE_S + 1) is None


def test_a_place_is_not_taken_twice_by_one_attempt(scratch: redis.Redis) -> None:
    line = lines(scratch, concurrency=1)
    claimed(scratch, "w1")
    assert line.enter("r", "w1", now=100.0) is None
    assert line.enter("r", "w1", now=101.0) is None  # the same event again (lease run out)
    assert line.in_flight("r") == 1


def test_the_line_skips_events_no_longer_scheduled(scratch: redis.Redis) -> None:
    line = lines(scratch, concurrency=1)
    claimed(scratch, "w1", "gone", "w3")
    assert line.enter("r", "w1", now=100.0) is None
    assert line.enter("r", "gone", now=101.0) is not None
    assert line.enter("r", "w3", now=102.0) is not None
    scratch.zrem(SCHEDULE, "gone")  # e.g. delivered by an earlier attempt, or its job deleted
    assert line.leave("r", "w1", now=110.0) == "w3"
    assert scratch.zscore(SCHEDULE, "gone") is None  # not brought back
