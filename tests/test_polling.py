"""Poll timing (learned run times) and retry backoff."""

from __future__ import annotations

import math
import random
import signal
import time
from dataclasses import replace

import pytest
import redis

from cli.stack import Stack
from core.jobs import Status
from core.store import JobStore, connect_redis
from tests.support.api import ApiClient
from tests.support.stack import admit
from tests.test_end_to_end import job_body, unique
from workers.pipeline import JobPipeline
from workers.polling import (
    FIRST_POLL_S,
    LATE_POLL_MIN_S,
    MAX_RETRY_AFTER_S,
    MIN_FIRST_POLL_S,
    QUEUED_POLL_S,
    RUNNING_POLL_S,
    TRANSIENT_BACKOFF_BASE_S,
    TRANSIENT_BACKOFF_MAX_S,
    WINDOW_STEP_S,
    RunEstimate,
    backoff_s,
    estimated_start,
    first_poll_at,
    next_poll_at,
)
from workers.run_times import (
    MIN_RUNS_FOR_SPREAD,
    RECENT_PREFIX,
    RECENT_RUNS,
    UNLEARNED_PREFIX,
    UNLEARNED_TTL_S,
    RunTimes,
    run_window,
    shape_of,
)
from workers.runcomfy import RequestState, TransientUpstreamError
from workers.throttle import BUCKET_KEY, PLACES_KEY, UpstreamThrottle


def test_first_poll_comes_soon() -> None:
    assert first_poll_at(100.0) == 100.0 + FIRST_POLL_S


@pytest.mark.parametrize(
    ("expected_run_s", "delay"),
    [(0.0, MIN_FIRST_POLL_S), (0.6, 0.6), (FIRST_POLL_S, FIRST_POLL_S), (20.0, FIRST_POLL_S)],
)
def test_first_poll_comes_when_a_short_run_should_be_done(
    expected_run_s: float, delay: float
) -> None:
    assert first_poll_at(100.0, RunEstimate.exactly(expected_run_s)) == pytest.approx(100.0 + delay)


def test_queued_requests_are_polled_like_the_official_clients_and_sooner_when_next() -> None:
    assert next_poll_at(now=10.0, running=False, queue_position=5) == 10.0 + QUEUED_POLL_S
    assert next_poll_at(now=10.0, running=False, queue_position=1) < 10.0 + QUEUED_POLL_S
    assert next_poll_at(now=10.0, running=False, queue_position=0) < 10.0 + QUEUED_POLL_S


def test_without_a_learned_run_time_a_run_is_polled_every_2_s() -> None:
    assert next_poll_at(now=10.0, running=True, running_since=9.0) == 10.0 + RUNNING_POLL_S


def test_with_a_learned_run_time_one_look_when_it_should_be_done() -> None:
    assert (
        next_poll_at(
            now=11.0, running=True, running_since=10.0, expected_run=RunEstimate.exactly(20.0)
        )
        == 30.0
    )


@pytest.mark.parametrize(
    ("now", "delay"), [(30.0, LATE_POLL_MIN_S), (30.5, 0.5), (31.0, 1.0), (40.0, RUNNING_POLL_S)]
)
def test_a_late_run_is_polled_soon_then_backing_off(now: float, delay: float) -> None:
    assert (
        next_poll_at(
            now=now, running=True, running_since=10.0, expected_run=RunEstimate.exactly(20.0)
        )
        == now + delay
    )


def test_a_20_s_run_costs_far_fewer_calls_than_fixed_2_s_polling() -> None:
    """Calls for a 20 s run (no queue): submit + polls, against 1 + 10 for the official clients."""
    submitted, run_s = 0.0, 20.0
    now, calls, running_since = first_poll_at(submitted), 1, None
    while True:
        calls += 1
        if now >= submitted + run_s:
            break
        running_since = running_since or estimated_start(
            last_seen_queued_at=submitted, first_seen_running_at=now
        )
        now = next_poll_at(
            now=now,
            running=True,
            running_since=running_since,
            expected_run=RunEstimate.exactly(run_s - 0.5),
        )
    assert calls <= 4


def test_runs_that_vary_are_looked_at_across_the_window_they_end_in() -> None:
    """Runs of 20-22 s: a look when the earliest end, then every WINDOW_STEP_S across the
    window, then soon after the latest, backing off."""
    window = RunEstimate(20.0, 22.0)

    def at(now: float) -> float:
        return next_poll_at(now=now, running=True, running_since=10.0, expected_run=window)

    assert at(11.0) == 30.0
    assert at(30.0) == 30.5
    assert at(31.7) == 32.0  # not past the window's end
    assert at(32.0) == 32.0 + LATE_POLL_MIN_S
    assert at(40.0) == 40.0 + RUNNING_POLL_S


def looks_until_seen(run_s: float, window: RunEstimate) -> tuple[int, float]:
    """For one run (no queue) of `run_s`: RunComfy calls (submit + looks) until a look sees it
    done, and how late that look was."""
    now, calls = first_poll_at(0.0, window), 1
    while True:
        calls += 1
        if now >= run_s:
            return calls, now - run_s
        now = next_poll_at(now=now, running=True, running_since=0.0, expected_run=window)


def test_runs_that_vary_are_seen_soon_with_fewer_calls_than_2_s_polling() -> None:
    """PRODUCT §8's runs, half 20 s + 0-2 s and half 5 s + 0-1 s, each shape learned as the
    window its runs end in: every one seen within WINDOW_STEP_S of its end (a quarter of a
    second at the median), with fewer calls in all than fixed 2 s polling makes."""
    calls, fixed_2s_calls, lateness = 0, 0, []
    for run_s, spread_s in ((20.0, 2.0), (5.0, 1.0)):
        window = RunEstimate(run_s + 0.05 * spread_s, run_s + 0.95 * spread_s)
        for each in (run_s + spread_s * i / 100 for i in range(101)):
            made, late = looks_until_seen(each, window)
            calls, lateness = calls + made, [*lateness, late]
            fixed_2s_calls += 1 + math.ceil(each / 2.0)
    lateness.sort()
    assert lateness[len(lateness) // 2] <= 0.3 and lateness[-1] <= WINDOW_STEP_S, lateness
    assert calls < 0.8 * fixed_2s_calls, (calls, fixed_2s_calls)
    # One look at the typical end, as for runs that never vary, leaves runs a look late.
    typical = RunEstimate.exactly(21.0)
    assert max(looks_until_seen(20.0 + i / 50, typical)[1] for i in range(101)) > 0.5


def test_the_window_is_the_recent_runs_quantiles_once_there_are_enough() -> None:
    assert run_window([20.0] * (MIN_RUNS_FOR_SPREAD - 1)) is None
    runs = [20.0 + i / 10 for i in range(21)]  # 20.0 .. 22.0
    window = run_window(runs)
    assert window is not None
    assert window.earliest_s == pytest.approx(20.1) and window.latest_s == pytest.approx(21.9)


def test_run_times_learn_the_window_of_recent_runs(stack: Stack) -> None:
    client = connect_redis(stack.redis_server.url.rsplit("/", 1)[0] + "/5")  # no worker looks here
    client.flushdb()
    times = RunTimes(client, job_schedule_key="igw:test:due")
    shape = {"num_inference_steps": 12, "image_size": "square_hd"}
    for run_s in (20.0, 22.0, 21.0):
        times.learn(shape, run_s)
    few = RunTimes(client, job_schedule_key="igw:test:due").estimate(shape)
    assert few == RunEstimate.exactly(21.0)  # too few runs for a spread: the typical one
    for i in range(RECENT_RUNS + 10):
        times.learn(shape, 20.0 + (i % 21) / 10)
    window = RunTimes(client, job_schedule_key="igw:test:due").estimate(shape)
    assert window is not None and 20.0 <= window.earliest_s < 20.3 < 21.7 < window.latest_s <= 22.0
    assert client.llen(RECENT_PREFIX + shape_of(shape)) == RECENT_RUNS
    client.close()


def test_estimated_start_is_the_midpoint_or_the_submit() -> None:
    assert estimated_start(last_seen_queued_at=10.0, first_seen_running_at=12.0) == 11.0
    assert (
        estimated_start(last_seen_queued_at=10.0, first_seen_running_at=12.0, seen_queued=False)
        == 10.0
    )


def test_backoff_grows_with_failures_and_is_capped() -> None:
    rng = random.Random(1)
    samples = {n: [backoff_s(n, rng=rng) for _ in range(200)] for n in (1, 2, 4, 10, 30)}
    assert max(samples[1]) <= 1.0
    assert min(samples[4]) >= 4.0 and max(samples[4]) <= 8.0
    assert all(s <= TRANSIENT_BACKOFF_MAX_S for s in samples[30])
    assert len(set(samples[10])) > 100  # jittered, not lock-step


def test_a_429s_retry_after_is_when_to_come_back_after_any_number_of_failures() -> None:
    rng = random.Random(2)
    for failures in (1, 3, 7, 12):
        waits = [
            backoff_s(failures, retry_after_s=1.0, retry_after_is_when=True, rng=rng)
            for _ in range(200)
        ]
        assert min(waits) >= 1.0 and max(waits) <= 1.0 + TRANSIENT_BACKOFF_BASE_S
        assert len(set(waits)) > 100  # jittered: jobs told the same moment spread out
    assert 30.0 <= backoff_s(1, retry_after_s=30.0, retry_after_is_when=True) <= 31.0


def test_a_429s_retry_after_of_zero_still_waits_the_base() -> None:
    """`Retry-After: 0` from a rate limiter must not make every job call again at once, and
    again, until its deadline."""
    waits = [backoff_s(9, retry_after_s=0.0, retry_after_is_when=True) for _ in range(200)]
    assert min(waits) >= TRANSIENT_BACKOFF_BASE_S
    assert max(waits) <= 2 * TRANSIENT_BACKOFF_BASE_S


def test_otherwise_retry_after_is_a_floor_under_the_backoff() -> None:
    """A 5xx's Retry-After (503 from a load balancer) does not stop the backoff growing."""
    assert backoff_s(6, retry_after_s=0.0) >= 16.0
    assert backoff_s(6, retry_after_s=1.0) >= 16.0
    assert backoff_s(1, retry_after_s=30.0) == 30.0


def test_retry_after_out_of_range_is_bounded() -> None:
    assert backoff_s(1, retry_after_s=-5.0, retry_after_is_when=True) >= 1.0
    assert backoff_s(1, retry_after_s=1e9, retry_after_is_when=True) <= MAX_RETRY_AFTER_S + 1.0
    assert backoff_s(1, retry_after_s=1e9) == MAX_RETRY_AFTER_S


def test_run_times_are_learned_per_shape(stack: Stack) -> None:
    client = connect_redis(stack.redis_server.url.rsplit("/", 1)[0] + "/5")  # no worker looks here
    client.flushdb()
    times = RunTimes(client, job_schedule_key="igw:test:due")
    fast, slow = {"num_inference_steps": 8, "image_size": "square"}, {"num_inference_steps": 30}
    assert times.expected_s(fast) is None
    for run_s in (2.0, 4.0):
        times.learn(fast, run_s)
    times.learn(slow, 20.0)
    times.learn(slow, -1.0)  # implausible: ignored
    assert RunTimes(client, job_schedule_key="igw:test:due").expected_s(fast) == pytest.approx(3.0)
    assert RunTimes(client, job_schedule_key="igw:test:due").expected_s(slow) == pytest.approx(20.0)
    assert shape_of(slow) == "30:auto"
    client.flushdb()
    client.close()


def test_the_first_learned_run_brings_its_shapes_waiting_jobs_forward(
    scratch: redis.Redis,
) -> None:
    # Nothing learned yet: running jobs of the shape poll every 2 s. The first run learned
    # re-plans each of them to when it should be done — never later than already due, and
    # only jobs still scheduled.
    store = JobStore(scratch, retention_s=3600)
    times = RunTimes(scratch, job_schedule_key=store.job_schedule.key)
    shape = {"num_inference_steps": 12, "image_size": "square"}
    scratch.zadd(store.job_schedule.key, {"job_a": 1000.0, "job_b": 1000.0, "job_c": 1003.0})
    times.wait_for_first(shape, "job_a", running_since=990.0)  # should end at 994
    times.wait_for_first(shape, "job_b", running_since=999.0)  # at 1003: later than due
    times.wait_for_first(shape, "job_gone", running_since=990.0)  # finished meanwhile
    times.wait_for_first({"num_inference_steps": 3}, "job_c", running_since=990.0)  # other shape

    times.learn(shape, 4.0)

    assert scratch.zscore(store.job_schedule.key, "job_a") == 994.0
    assert scratch.zscore(store.job_schedule.key, "job_b") == 1000.0
    assert scratch.zscore(store.job_schedule.key, "job_gone") is None
    assert scratch.zscore(store.job_schedule.key, "job_c") == 1003.0
    times.learn(shape, 8.0)  # later runs only refine the average: nothing to re-plan
    assert scratch.zscore(store.job_schedule.key, "job_a") == 994.0


@pytest.mark.parametrize("last_look", ["saw it running", "failed"])
def test_without_runcomfy_times_a_run_is_learned_as_ending_between_two_looks(
    stack: Stack,
    api_client: ApiClient,
    pipeline: JobPipeline,
    monkeypatch: pytest.MonkeyPatch,
    last_look: str,
) -> None:
    """RunComfy's /result without finished_at: the run is learned as ending midway between the
    last look that saw it running and the look that saw it done. (Learned as ending at that
    look, which comes when a run is expected to be done, the estimate could only grow.) If the
    last look failed, when the run ended is not known: nothing is learned."""
    saw_it = last_look == "saw it running"
    shape = {"num_inference_steps": 13 if saw_it else 14, "image_size": "portrait_4_3"}
    stack.worker.signal(signal.SIGSTOP)
    try:
        body = {**job_body(stack, unique("untimed")), **shape}
        job_id = api_client.post("/v1/jobs", json=body).get_json()["id"]
        admit(pipeline)
        pipeline.advance(job_id)  # the submit, to the emulator
        job = pipeline.store.get(job_id)
        assert job is not None and job.request_id is not None
        looks = iter(["in_progress", "in_progress" if saw_it else "timeout", "succeeded"])

        def untimed(request_id: str) -> RequestState:  # no created_at / finished_at
            status = next(looks)
            if status == "timeout":
                raise TransientUpstreamError("GET /result: timed out", maybe_processed=False)
            images = ("https://outputs.example.com/1.png",) if status == "succeeded" else None
            return RequestState(request_id=request_id, status=status, images=images)

        monkeypatch.setattr(pipeline.runcomfy, "result", untimed)
        monkeypatch.setattr(pipeline.runcomfy, "status", untimed)
        pipeline.advance(job_id)  # seen running
        time.sleep(1.0)
        pipeline.advance(job_id)  # still running (or the look failed)
        running = pipeline.store.get(job_id)
        assert running is not None and running.running_since is not None
        time.sleep(1.0)
        before = time.time()
        pipeline.advance(job_id)  # done
        after = time.time()
        done = pipeline.store.get(job_id)
        assert done is not None and done.status.value == "succeeded"
        learned = pipeline.run_times.expected_s(shape)
        if not saw_it:
            assert learned is None
            return
        start, last_look_at = running.running_since, running.updated_at
        assert learned is not None
        assert (last_look_at + before) / 2 - start - 0.01 <= learned
        assert learned <= (last_look_at + after) / 2 - start
        assert learned < before - start - 0.4  # not "until this look"
    finally:
        stack.worker.signal(signal.SIGCONT)


def upstream_calls(stack: Stack) -> int:
    calls = stack.emulator("/_emulator/stats").json()["calls"]
    return int(calls.get("status", 0)) + int(calls.get("result", 0))


def test_a_looks_second_call_takes_a_token_of_its_own(
    stack: Stack, api_client: ApiClient, pipeline: JobPipeline, redis_client: redis.Redis
) -> None:
    """The rate cap counts calls, not looks: a look's second call (the queue position after
    /result said queued, the output after /status said done) is made only with a token of its
    own. The position is left for later; the output is fetched at the next step, due at once.
    (One token covered up to three calls: the cap could be passed threefold.)"""
    stack.worker.signal(signal.SIGSTOP)
    one_token = replace(pipeline, throttle=UpstreamThrottle(redis_client, rate_per_s=0.1))

    def with_one_token(job_id: str) -> int:
        """One step with a single token in the bucket; the calls it made."""
        redis_client.delete(BUCKET_KEY, PLACES_KEY)  # a fresh bucket: its burst, 1 token
        before = upstream_calls(stack)
        one_token.advance(job_id)
        return upstream_calls(stack) - before

    try:
        body = job_body(stack, unique("one token a call [emulator:queue=1.5] [emulator:run=0]"))
        job_id = api_client.post("/v1/jobs", json=body).get_json()["id"]
        admit(pipeline)
        pipeline.advance(job_id)  # the submit
        assert with_one_token(job_id) == 1  # /result: queued; no token for the position
        job = pipeline.store.get(job_id)
        assert job is not None and job.polls == 1 and job.status is Status.SUBMITTED
        assert redis_client.zscore(PLACES_KEY, job_id) is None  # no place taken for it
        time.sleep(2.0)  # the run is over
        assert with_one_token(job_id) == 1  # /status: done; no token for the output
        seen = pipeline.store.get(job_id)
        assert seen is not None and not seen.status.is_final
        assert seen.upstream is not None and seen.upstream.status == "completed"
        due = pipeline.store.job_schedule.due_at(job_id)
        assert due is not None and due <= time.time()
        assert with_one_token(job_id) == 1  # /result: the output
        done = pipeline.store.get(job_id)
        assert done is not None and done.status is Status.SUCCEEDED and done.output_images
    finally:
        redis_client.delete(BUCKET_KEY, PLACES_KEY)
        stack.worker.signal(signal.SIGCONT)


def test_a_shape_never_learned_keeps_only_the_runs_of_the_last_hour(scratch: redis.Redis) -> None:
    """Every run of a shape whose runs all fail waits to be re-planned by the first learned
    one: the set was refreshed on every add and never trimmed — it grew for as long as such
    jobs came."""
    run_times = RunTimes(scratch, job_schedule_key="schedule")
    shape = {"num_inference_steps": 7, "image_size": "square"}
    now = time.time()
    for n in range(3):
        run_times.wait_for_first(shape, f"old{n}", now - UNLEARNED_TTL_S - 10 + n)
    run_times.wait_for_first(shape, "new", now)
    assert scratch.zrange(UNLEARNED_PREFIX + shape_of(shape), 0, -1) == ["new"]
