"""Upstream protection in Redis: fair admission under the in-flight cap, and the rate cap."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from core.jobs import Status, new_job
from core.store import JobStore, Step
from workers.throttle import PLACE_HELD_S, PLACES_KEY, UpstreamThrottle

pytestmark = pytest.mark.integration


def accept(store: JobStore, client_id: str, n: int) -> list[str]:
    ids = []
    for i in range(n):
        job = new_job(client_id=client_id, input={"prompt": str(i)}, webhook_url=None,
                      webhook_events=(), metadata=None, deadline_s=900)  # fmt: skip
        store.create(job)
        ids.append(job.id)
    return ids


def test_a_burst_does_not_starve_a_single_job(scratch: redis.Redis) -> None:
    store = JobStore(scratch, retention_s=3600)
    burst = accept(store, "cli_big", 500)
    single = accept(store, "cli_small", 1)[0]
    admitted = store.admission.admit(max_in_flight=4, slot_ttl_s=600)
    assert len(admitted) == 4 and single in admitted[:2]
    assert admitted[0] == burst[0] or admitted[1] == burst[0]  # each line is FIFO
    assert store.admission.admit(max_in_flight=4, slot_ttl_s=600) == []  # cap reached
    assert store.admission.in_flight() == 4 and store.admission.waiting() == 497


def test_round_robin_across_clients_and_slots_come_back(scratch: redis.Redis) -> None:
    store = JobStore(scratch, retention_s=3600)
    a, b, c = (accept(store, name, 10) for name in ("cli_a", "cli_b", "cli_c"))
    first_at = time.time()
    first = store.admission.admit(max_in_flight=6, slot_ttl_s=600, now=first_at)
    assert sorted(first) == sorted(a[:2] + b[:2] + c[:2])
    for job_id in first[:3]:  # three jobs end: their slots go to the next in line, fairly
        store.change(job_id, lambda j: Step(j.moved_to(Status.SUCCEEDED, 1.0), None))
    second = store.admission.admit(max_in_flight=6, slot_ttl_s=600, now=first_at)  # same instant
    assert len(second) == 3 and len({store.get(j).client_id for j in second}) == 3  # type: ignore[union-attr]


def test_jobs_cancelled_while_waiting_are_dropped_not_admitted(scratch: redis.Redis) -> None:
    store = JobStore(scratch, retention_s=3600)
    ids = accept(store, "cli_a", 5)
    for job_id in ids[:3]:
        store.change(job_id, lambda j: Step(j.moved_to(Status.CANCELLED, 1.0), None))
    assert store.admission.admit(max_in_flight=10, slot_ttl_s=600) == ids[3:]
    assert store.admission.waiting() == 0


def test_admitted_jobs_become_due_now(scratch: redis.Redis) -> None:
    store = JobStore(scratch, retention_s=3600)
    [job_id] = accept(store, "cli_a", 1)
    assert store.job_schedule.due_at(job_id) > store.get(job_id).created_at + 1  # type: ignore[operator,union-attr]
    store.admission.admit(max_in_flight=1, slot_ttl_s=600, now=123.0)
    assert store.job_schedule.due_at(job_id) == 123.0


def test_a_lost_line_entry_is_put_back(scratch: redis.Redis) -> None:
    store = JobStore(scratch, retention_s=3600)
    [job_id] = accept(store, "cli_a", 1)
    scratch.delete(store.admission.waiting_key("cli_a"))
    job = store.get(job_id)
    assert job is not None
    assert store.admission.stay_in_line(job, recheck_at=1000.0) is True
    assert store.admission.stay_in_line(job, recheck_at=2000.0) is False
    assert store.job_schedule.due_at(job_id) == 2000.0
    assert store.admission.admit(max_in_flight=1, slot_ttl_s=600) == [job_id]


def test_a_job_admitted_while_it_was_looked_at_is_left_due_now(scratch: redis.Redis) -> None:
    """A worker saw the job without a slot; the admitter gave it one just after. Staying in
    line then changes nothing: it is not put back in line, nor postponed 30 s holding its slot."""
    store = JobStore(scratch, retention_s=3600)
    [job_id] = accept(store, "cli_a", 1)
    job = store.get(job_id)
    assert job is not None and not store.admission.holds_slot(job_id)  # the worker's look
    assert store.admission.admit(max_in_flight=1, slot_ttl_s=600, now=123.0) == [job_id]
    assert store.admission.stay_in_line(job, recheck_at=153.0) is False
    assert store.job_schedule.due_at(job_id) == 123.0
    assert scratch.llen(store.admission.waiting_key("cli_a")) == 0


def callers(prefix: str) -> Iterator[str]:
    """Caller (job) ids, each new: one call each unless a test calls again as the same."""
    return (f"{prefix}{n}" for n in itertools.count())


def test_rate_cap_is_shared_and_429_pauses_everyone(scratch: redis.Redis) -> None:
    one = UpstreamThrottle(scratch, rate_per_s=5)
    two = UpstreamThrottle(scratch, rate_per_s=5)  # another worker, same Redis
    grants = [t.acquire(f"job{n}") for n, t in enumerate((one, two) * 3)]
    assert grants[:5] == [0.0] * 5 and grants[5] == pytest.approx(0.2, abs=0.03)
    time.sleep(grants[5] + 0.01)
    assert one.acquire("job5") == 0.0  # its token came
    two.cool_down(30.0)  # the bucket is empty: its next token comes 0.2 s after the cool-down
    assert one.acquire("job6") == pytest.approx(30.2, abs=0.05)
    one.cool_down(0.2)  # a shorter cool-down never shortens a longer one
    assert two.acquire("job7") == pytest.approx(
        30.4, abs=0.05
    )  # and the next caller is given the next


def test_a_cool_down_ends_when_it_says(scratch: redis.Redis) -> None:
    throttle = UpstreamThrottle(scratch, rate_per_s=5)
    throttle.cool_down(0.3)
    wait = throttle.acquire("job")
    assert wait == pytest.approx(0.3, abs=0.05)
    time.sleep(wait + 0.01)
    assert throttle.acquire("job") == 0.0


def test_after_a_cool_down_calls_resume_at_the_rate_not_all_at_once(scratch: redis.Redis) -> None:
    """Steps refused during a 429's cool-down are given moments one after another from its end
    (not all its end), and the tokens saved up before the 429 are not spent in a burst then."""
    throttle = UpstreamThrottle(scratch, rate_per_s=5)  # a full bucket: 5 tokens
    throttle.cool_down(0.3)
    started = time.monotonic()
    told = {f"job{n}": time.monotonic() + throttle.acquire(f"job{n}") - started for n in range(6)}
    assert list(told.values()) == pytest.approx([0.3 + 0.2 * k for k in range(6)], abs=0.03)
    granted = []
    for caller, moment in told.items():
        time.sleep(max(0.0, started + moment + 0.01 - time.monotonic()))
        granted.append(throttle.acquire(caller))
    assert granted == [0.0] * 6  # each comes back at its moment and gets its token
    assert throttle.acquire("newcomer") > 0  # no burst left over from before the 429


def test_refused_callers_are_told_to_come_back_one_after_another(scratch: redis.Redis) -> None:
    """Ten steps due at once past the cap: each is given its own moment, 1/rate apart, however
    long the calls take, and each that comes back then gets its token (no herd retrying every
    few ms)."""
    throttle = UpstreamThrottle(scratch, rate_per_s=5)
    ids = callers("job")
    assert [throttle.acquire(next(ids)) for _ in range(5)] == [0.0] * 5
    told = {}
    for _ in range(10):
        caller = next(ids)
        told[caller] = time.monotonic() + throttle.acquire(caller)
        time.sleep(0.005)  # slow callers: the moments given do not drift with them
    first = next(iter(told.values()))
    assert [m - first for m in told.values()] == pytest.approx(
        [0.2 * k for k in range(10)], abs=0.01
    )
    granted = []
    for caller, moment in told.items():
        time.sleep(max(0.0, moment + 0.01 - time.monotonic()))
        granted.append(throttle.acquire(caller))
    assert granted == [0.0] * 10
    assert throttle.acquire(next(ids)) > 0  # and the bucket is empty again


def test_first_come_first_served_a_newcomer_queues_behind_a_waiter(scratch: redis.Redis) -> None:
    """A step told to wait keeps its place: a newcomer that arrives just before it comes back
    does not take its token (and send it to the back of the line); the newcomer is given the
    moment after the last place."""
    throttle = UpstreamThrottle(scratch, rate_per_s=5)
    assert [throttle.acquire(f"job{n}") for n in range(5)] == [0.0] * 5
    first, second = throttle.acquire("waiter1"), throttle.acquire("waiter2")
    assert (first, second) == pytest.approx((0.2, 0.4), abs=0.03)
    asked_at = time.monotonic()
    time.sleep(first + 0.02)  # waiter1's token has come; a newcomer asks first
    newcomer = throttle.acquire("newcomer")
    assert time.monotonic() + newcomer - asked_at == pytest.approx(0.6, abs=0.03)
    assert throttle.acquire("waiter1") == 0.0
    time.sleep(max(0.0, asked_at + second + 0.01 - time.monotonic()))
    assert throttle.acquire("waiter2") == 0.0


def test_a_waiter_back_early_keeps_its_place(scratch: redis.Redis) -> None:
    """A step run again before its moment (say, re-driven by the reconciler) is told the rest
    of its wait, and the line behind it does not grow."""
    throttle = UpstreamThrottle(scratch, rate_per_s=5)
    assert [throttle.acquire(f"job{n}") for n in range(5)] == [0.0] * 5
    asked_at = time.monotonic()
    assert throttle.acquire("waiter") == pytest.approx(0.2, abs=0.03)
    time.sleep(0.05)
    assert time.monotonic() + throttle.acquire("waiter") - asked_at == pytest.approx(0.2, abs=0.03)
    assert time.monotonic() + throttle.acquire("next") - asked_at == pytest.approx(0.4, abs=0.03)


def test_a_call_a_step_can_do_without_takes_a_free_token_or_none_and_no_place(
    scratch: redis.Redis,
) -> None:
    """acquire_if_free: a token if one is there and no one waits for it; otherwise no, with no
    place in line taken (the line behind is not pushed back) — and never ahead of a waiter."""
    throttle = UpstreamThrottle(scratch, rate_per_s=5)
    assert throttle.acquire_if_free("job0")  # the burst: 5 tokens
    assert [throttle.acquire(f"job{n}") for n in range(1, 5)] == [0.0] * 4
    assert not throttle.acquire_if_free("optional")  # none left
    assert scratch.zscore(PLACES_KEY, "optional") is None
    asked_at = time.monotonic()
    wait = throttle.acquire("waiter")
    assert wait == pytest.approx(0.2, abs=0.03)  # as if "optional" had not asked
    time.sleep(wait + 0.01)  # a token is back, and it is the waiter's
    assert not throttle.acquire_if_free("optional")
    assert throttle.acquire("waiter") == 0.0
    assert time.monotonic() - asked_at < 0.3


def test_waiters_back_late_together_get_no_more_than_the_cap(scratch: redis.Redis) -> None:
    """Ten waiters come back together long after their moments (their workers were busy or
    restarting): only the tokens there are granted, not all ten at once; the rest are given
    moments one after another, each its own, and a newcomer after them."""
    throttle = UpstreamThrottle(scratch, rate_per_s=5)
    assert [throttle.acquire(f"job{n}") for n in range(5)] == [0.0] * 5
    waits = [throttle.acquire(f"waiter{n}") for n in range(10)]
    time.sleep(max(waits) + 0.5)  # every moment passed; 5 tokens (the burst) are back
    back = {f"waiter{n}": time.monotonic() + throttle.acquire(f"waiter{n}") for n in range(10)}
    came_at = time.monotonic()
    granted = [caller for caller, moment in back.items() if moment <= came_at]
    assert len(granted) <= 6, back  # the burst (and one more, had a token come meanwhile)
    later = sorted(moment for moment in back.values() if moment > came_at)
    assert all(b - a == pytest.approx(0.2, abs=0.02) for a, b in itertools.pairwise(later))
    assert time.monotonic() + throttle.acquire("newcomer") > later[-1]  # behind them all


def test_a_cool_down_keeps_the_line_in_order(scratch: redis.Redis) -> None:
    """Places given before a 429 move back by its pause and keep their order; a newcomer during
    the cool-down goes behind them (not the front of the line to its back)."""
    throttle = UpstreamThrottle(scratch, rate_per_s=5)
    assert [throttle.acquire(f"job{n}") for n in range(5)] == [0.0] * 5
    started = time.monotonic()
    before = [throttle.acquire(f"waiter{n}") for n in range(3)]  # 0.2, 0.4, 0.6
    throttle.cool_down(1.0)
    newcomer = time.monotonic() - started + throttle.acquire("newcomer")
    moments = [time.monotonic() - started + throttle.acquire(f"waiter{n}") for n in range(3)]
    assert moments == pytest.approx([w + 1.0 for w in before], abs=0.05)  # back early: told
    assert newcomer == pytest.approx(moments[-1] + 0.2, abs=0.05)
    granted = []
    for caller, moment in [
        *((f"waiter{n}", m) for n, m in enumerate(moments)),
        ("newcomer", newcomer),
    ]:
        time.sleep(max(0.0, started + moment + 0.01 - time.monotonic()))
        granted.append(throttle.acquire(caller))
    assert granted == [0.0] * 4


def test_a_place_not_taken_holds_no_one_up_for_long(scratch: redis.Redis) -> None:
    """A waiter that never comes back (its job ended, its worker died) holds newcomers behind
    it only PLACE_HELD_S past its moment."""
    throttle = UpstreamThrottle(scratch, rate_per_s=5)
    assert [throttle.acquire(f"job{n}") for n in range(5)] == [0.0] * 5
    wait = throttle.acquire("gone")
    time.sleep(wait + PLACE_HELD_S + 0.05)
    assert throttle.acquire("newcomer") == 0.0


def test_a_callers_clock_plays_no_part(
    scratch: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker host whose clock is an hour ahead neither gets an hour's tokens nor holds the
    other hosts back for an hour: the bucket runs on Redis's clock."""
    throttle = UpstreamThrottle(scratch, rate_per_s=5)
    assert [throttle.acquire(f"job{n}") for n in range(5)] == [0.0] * 5
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600)
    ahead = throttle.acquire("ahead")
    assert 0 < ahead <= 0.25  # no token out of the hour it thinks has passed
    monkeypatch.setattr(time, "time", real_time)
    time.sleep(0.45 + PLACE_HELD_S)
    assert throttle.acquire("other") == 0.0  # the others are not held back by it


def test_the_cap_holds_for_many_callers_at_once(scratch: redis.Redis) -> None:
    """Eight threads, each on a connection of its own (as workers on other hosts), calling as
    fast as they can for 1.5 s against 20 calls/s: the tokens granted are the burst and the
    rate's, no more. The time is Redis's: callers' clocks, which differ, play no part."""
    rate, run_s = 20, 1.5
    grants: list[int] = []
    start = threading.Barrier(8)

    def call(name: str) -> None:
        throttle = UpstreamThrottle(scratch, rate_per_s=rate)  # a connection of its own
        start.wait()
        ends = time.monotonic() + run_s
        granted = 0
        while time.monotonic() < ends:
            granted += throttle.acquire(name) == 0.0
        grants.append(granted)

    threads = [threading.Thread(target=call, args=(f"job{n}",)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert rate * run_s <= sum(grants) <= rate + rate * run_s + 1  # the burst, then the rate
