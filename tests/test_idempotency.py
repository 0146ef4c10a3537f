"""Duplicate and concurrent triggers change nothing twice: one submit, statuses only forward."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import pytest
import redis

from cli.stack import Stack, wait_until
from core.jobs import Status, Upstream
from core.metrics import Counters
from core.store import JobStore, Step
from core.wakeups import DISPATCH_JOBS_TASK, JOBS_QUEUE
from tests.support.api import ApiClient
from tests.support.stack import admit
from tests.test_end_to_end import job_body, submits_for, unique
from workers.celery_app import create_celery_app
from workers.pipeline import JobPipeline
from workers.runcomfy import (
    PermanentUpstreamError,
    RunComfyClient,
    TransientUpstreamError,
    UnusableAnswerError,
)
from workers.throttle import BUCKET_KEY, PLACES_KEY

pytestmark = pytest.mark.integration


def test_concurrent_triggers_submit_once_and_never_go_back(
    stack: Stack, api_client: ApiClient, pipeline: JobPipeline
) -> None:
    prompt = unique("dup [emulator:queue=1] [emulator:run=1]")
    stack.worker.signal(signal.SIGSTOP)  # only this test's triggers act on the job
    seen: list[Status] = []
    try:
        job_id = api_client.post("/v1/jobs", json=job_body(stack, prompt)).get_json()["id"]
        admit(pipeline)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: pipeline.advance(job_id), range(8)))
        assert submits_for(stack, prompt) == 1
        job = pipeline.store.get(job_id)
        assert job is not None and job.status is Status.SUBMITTED
        for _ in range(40):  # keep triggering, four at a time, until it ends
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda _: pipeline.advance(job_id), range(4)))
            job = pipeline.store.get(job_id)
            assert job is not None
            seen.append(job.status)
            if job.status.is_final:
                break
            time.sleep(0.1)
    finally:
        stack.worker.signal(signal.SIGCONT)
    assert seen[-1] is Status.SUCCEEDED
    ranks = [s.rank for s in seen]
    assert ranks == sorted(ranks), seen
    pipeline.advance(job_id)  # a trigger after the end changes nothing
    assert pipeline.store.get(job_id) == job
    assert submits_for(stack, prompt) == 1


def test_flooded_celery_triggers_change_nothing_twice(
    stack: Stack, api_client: ApiClient, receiver: Any, redis_client: redis.Redis
) -> None:
    celery = create_celery_app(stack.settings())
    prompt = unique("flood [emulator:queue=1] [emulator:run=1]")
    body = job_body(
        stack,
        prompt,
        webhook_url=receiver.url,
        webhook_events=["job.submitted", "job.running", "job.succeeded", "job.failed"],
    )
    job_id = api_client.post("/v1/jobs", json=body).get_json()["id"]
    store = JobStore(redis_client, retention_s=3600)
    for _ in range(30):
        store.job_schedule.put(redis_client, job_id, 0)  # "due now" again and again
        celery.send_task(DISPATCH_JOBS_TASK, queue=JOBS_QUEUE)
        time.sleep(0.1)
    final = api_client.wait_final(job_id)
    assert final["status"] == "succeeded"
    events = wait_until(
        lambda: len(receiver.received()) >= 3 and receiver.received(), what="3 events"
    )
    assert [e.payload["type"] for e in events] == ["job.submitted", "job.running", "job.succeeded"]
    assert submits_for(stack, prompt) == 1


def posted_and_left_submitting(
    stack: Stack, api_client: ApiClient, pipeline: JobPipeline, prompt: str
) -> str:
    """A job admitted and marked 'submitting' past its lease, as when its worker died mid-call
    (the stack's worker stopped by the caller)."""
    job_id = str(api_client.post("/v1/jobs", json=job_body(stack, prompt)).get_json()["id"])
    admit(pipeline)
    stale = time.time() - pipeline.settings.step_lease_s - 1
    pipeline.store.change(
        job_id, lambda j: Step(j.changed(stale, submit_started_at=stale, submit_attempts=1), stale)
    )
    return job_id


@pytest.mark.parametrize("rule", ["resubmit", "fail"])
def test_a_submit_interrupted_before_its_answer_follows_submit_unknown(
    stack: Stack, api_client: ApiClient, pipeline: JobPipeline, rule: str
) -> None:
    """A job left 'submitting' past its lease (the worker died mid-call) follows SUBMIT_UNKNOWN."""
    pipeline.settings = replace(pipeline.settings, submit_unknown=rule)  # type: ignore[assignment]
    prompt = unique("interrupted")
    stack.worker.signal(signal.SIGSTOP)
    try:
        job_id = posted_and_left_submitting(stack, api_client, pipeline, prompt)
        before = Counters(pipeline.store.redis).read()["submit_outcome_unknown"]
        pipeline.advance(job_id)
        job = pipeline.store.get(job_id)
        assert job is not None
        assert Counters(pipeline.store.redis).read()["submit_outcome_unknown"] == before + 1
        if rule == "fail":
            assert job.status is Status.FAILED and job.error is not None
            assert job.error.code == "submit_outcome_unknown"
        else:
            assert job.status is Status.QUEUED and job.submit_started_at is None
            assert job.submit_unknown_outcomes == 1 and "submit outcome unknown" in job.notes[-1]
            assert job.submits_unanswered == 1
    finally:
        stack.worker.signal(signal.SIGCONT)
    final = api_client.wait_final(job_id)
    assert final["status"] == ("succeeded" if rule == "resubmit" else "failed")
    assert submits_for(stack, prompt) == (1 if rule == "resubmit" else 0)


@pytest.mark.parametrize("how", ["past the client's timeout", "a gateway's 504"])
def test_a_job_whose_submits_go_unanswered_twice_ends_failed_not_submitted_again(
    stack: Stack, api_client: ApiClient, pipeline: JobPipeline, how: str
) -> None:
    """RunComfy takes each submit (a paid run) but no answer comes from it: it answers only
    after the client's timeout, or a gateway in front answers 504 in its place. The job is
    submitted once more, then ends failed with submit_outcome_unknown — not one paid run per
    backoff until its deadline."""
    pipeline.runcomfy = RunComfyClient(
        base_url=pipeline.settings.runcomfy_base_url,
        token=pipeline.settings.runcomfy_api_token,
        model_id=pipeline.settings.runcomfy_model_id,
        timeout_s=0.5,
    )
    slow = how == "past the client's timeout"
    prompt = unique("unanswered" if slow else "unanswered [emulator:submit-504]")
    stack.worker.signal(signal.SIGSTOP)
    if slow:
        stack.emulator("/_emulator/faults", method="POST", json={"rate_slow": 1.0, "slow_s": 1.0})
    try:
        job_id = api_client.post("/v1/jobs", json=job_body(stack, prompt)).get_json()["id"]
        admit(pipeline)
        pipeline.advance(job_id)
        job = pipeline.store.get(job_id)
        assert job is not None and job.status is Status.QUEUED and job.submits_unanswered == 1
        pipeline.advance(job_id)  # the resubmit (due after its backoff; taken now)
        job = pipeline.store.get(job_id)
        assert job is not None and job.status is Status.FAILED and job.error is not None
        assert job.error.code == "submit_outcome_unknown"
        assert "answered none of 2 submits" in job.error.message
        pipeline.advance(job_id)
        wait_until(lambda: submits_for(stack, prompt) == 2, timeout_s=5, what="both submits")
        time.sleep(1.2)
        assert submits_for(stack, prompt) == 2  # and no third
    finally:
        stack.emulator("/_emulator/reset", method="POST")
        stack.worker.signal(signal.SIGCONT)
        pipeline.runcomfy.close()


def test_submits_answered_with_a_5xx_are_retried_until_it_passes(
    stack: Stack, api_client: ApiClient, pipeline: JobPipeline
) -> None:
    """A 5xx answer may have been accepted too, but an outage answers every submit so: those
    are retried (each counted) for as long as the job lives, and no answer is missing."""
    stack.worker.signal(signal.SIGSTOP)
    try:
        body = job_body(stack, unique("outage [emulator:submit-500]"))
        job_id = api_client.post("/v1/jobs", json=body).get_json()["id"]
        admit(pipeline)
        for _ in range(3):
            pipeline.advance(job_id)
        job = pipeline.store.get(job_id)
        assert job is not None and job.status is Status.QUEUED
        assert job.submit_unknown_outcomes == 3 and job.submits_unanswered == 0
        assert api_client.post(f"/v1/jobs/{job_id}/cancel").get_json()["status"] == "cancelled"
    finally:
        stack.worker.signal(signal.SIGCONT)


@pytest.mark.parametrize("meanwhile", ["request id stored", "submitting anew"])
def test_a_worker_with_a_stale_view_of_a_submit_changes_nothing(
    stack: Stack,
    api_client: ApiClient,
    pipeline: JobPipeline,
    monkeypatch: pytest.MonkeyPatch,
    meanwhile: str,
) -> None:
    """A worker finds a submit mark past its lease; just after that read, the submitting worker
    stores the request id — or another worker, having settled that mark first, is submitting
    anew. The job is neither failed (SUBMIT_UNKNOWN=fail) nor its new mark cleared (which would
    orphan that submit's paid run): a step changes the job only while it holds the mark seen."""
    pipeline.settings = replace(pipeline.settings, submit_unknown="fail")  # type: ignore[assignment]
    prompt = unique("stale view")
    stack.worker.signal(signal.SIGSTOP)
    try:
        job_id = posted_and_left_submitting(stack, api_client, pipeline, prompt)
        seen = pipeline.store.read(job_id)
        now = time.time()
        if meanwhile == "request id stored":
            upstream = Upstream(request_id="req_stored_meanwhile", status="in_queue")
            after = pipeline.store.change(
                job_id,
                lambda j: Step(
                    j.moved_to(Status.SUBMITTED, now, upstream=upstream, submit_started_at=None),
                    now + 600,
                ),
            )
        else:
            after = pipeline.store.change(
                job_id,
                lambda j: Step(j.changed(now, submit_started_at=now, submit_attempts=2), now + 60),
            )
        reads = iter([seen])  # the step's first read: the record as it was
        real_read = pipeline.store.read
        monkeypatch.setattr(pipeline.store, "read", lambda i: next(reads, None) or real_read(i))
        pipeline.advance(job_id)
        monkeypatch.undo()
        assert after is not None and pipeline.store.get(job_id) == after.job  # untouched
        assert submits_for(stack, prompt) == 0
        pipeline.store.change(job_id, lambda j: Step(j.moved_to(Status.CANCELLED, now), None))
    finally:
        stack.worker.signal(signal.SIGCONT)


LATE_429 = TransientUpstreamError("HTTP 429", http_status=429, maybe_processed=False)
LATE_REFUSAL = PermanentUpstreamError("HTTP 400: bad input", http_status=400)
LATE_UNUSABLE = UnusableAnswerError("submit answer has no request_id: {}")


@pytest.mark.parametrize(
    ("answer", "meanwhile"),
    [
        # (a late 429 after the request id was stored was already left alone: status check)
        pytest.param(LATE_REFUSAL, "request id stored", id="refused-request id stored"),
        pytest.param(LATE_UNUSABLE, "request id stored", id="unusable-request id stored"),
        pytest.param(LATE_429, "submitting anew", id="429-submitting anew"),
        pytest.param(LATE_REFUSAL, "submitting anew", id="refused-submitting anew"),
        pytest.param(LATE_UNUSABLE, "submitting anew", id="unusable-submitting anew"),
    ],
)
def test_a_submit_answered_after_its_lease_changes_nothing(
    stack: Stack,
    api_client: ApiClient,
    pipeline: JobPipeline,
    monkeypatch: pytest.MonkeyPatch,
    answer: Exception,
    meanwhile: str,
) -> None:
    """A worker's submit is answered only after its lease ended (the worker was paused), by when
    another worker has settled it — stored a request id, or is submitting anew. The late answer
    (a 429, a refusal, an unusable answer) neither fails the job nor clears the newer mark."""
    stack.worker.signal(signal.SIGSTOP)
    try:
        job_id = api_client.post("/v1/jobs", json=job_body(stack, unique("late"))).get_json()["id"]
        admit(pipeline)
        after: list[Any] = []

        def answered_late(_inputs: dict[str, Any]) -> Any:
            now = time.time()
            if meanwhile == "request id stored":
                upstream = Upstream(request_id="req_other_worker", status="in_queue")
                step = lambda j: Step(  # noqa: E731
                    j.moved_to(Status.SUBMITTED, now, upstream=upstream, submit_started_at=None),
                    now + 600,
                )
            else:
                step = lambda j: Step(  # noqa: E731
                    j.changed(now, submit_started_at=now, submit_attempts=2), now + 60
                )
            after.append(pipeline.store.change(job_id, step))
            raise answer

        monkeypatch.setattr(pipeline.runcomfy, "submit", answered_late)
        pipeline.advance(job_id)
        assert after[0] is not None and pipeline.store.get(job_id) == after[0].job  # untouched
        pipeline.store.change(
            job_id, lambda j: Step(j.moved_to(Status.CANCELLED, time.time()), None)
        )
    finally:
        pipeline.store.redis.delete(BUCKET_KEY, PLACES_KEY)  # the 429's cool-down
        stack.worker.signal(signal.SIGCONT)
