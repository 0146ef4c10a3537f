"""Cancels and deadlines against RunComfy's clock and other workers: no paid run is left behind
untracked, a cancel never stops a run being followed, and asking again costs nothing."""

from __future__ import annotations

import signal
import time
from dataclasses import replace

import pytest
import redis
import requests

from cli.stack import EMULATOR_TOKEN, Stack
from core.jobs import Status, Upstream
from core.store import JobStore, Record, Step
from tests.support.api import ApiClient
from tests.support.stack import admit
from tests.test_end_to_end import job_body, unique
from workers.pipeline import MAX_CANCEL_TRIES, JobPipeline
from workers.runcomfy import TransientUpstreamError

pytestmark = pytest.mark.integration


def upstream_status(stack: Stack, request_id: str) -> str:
    answer = requests.get(
        f"{stack.emulator_url}/v1/requests/{request_id}/status",
        headers={"Authorization": f"Bearer {EMULATOR_TOKEN}"},
        timeout=5,
    )
    return str(answer.json()["status"])


def cancel_calls(stack: Stack) -> int:
    return int(stack.emulator("/_emulator/stats").json()["calls"].get("cancel", 0))


def submitted_job(stack: Stack, api_client: ApiClient, pipeline: JobPipeline, prompt: str) -> str:
    """A job this test's pipeline submitted to the emulator (the stack's worker stopped)."""
    job_id = str(api_client.post("/v1/jobs", json=job_body(stack, prompt)).get_json()["id"])
    admit(pipeline)
    pipeline.advance(job_id)
    job = pipeline.store.get(job_id)
    assert job is not None and job.status is Status.SUBMITTED, job
    return job_id


def first_read_is(seen: Record | None, pipeline: JobPipeline, mp: pytest.MonkeyPatch) -> None:
    """The pipeline's next read of a job is `seen` (the record as it was: a step that read it
    just before another's change); the reads after it, the record as it is."""
    reads = iter([seen])
    real_read = pipeline.store.read
    mp.setattr(pipeline.store, "read", lambda job_id: next(reads, None) or real_read(job_id))


def test_an_expiry_cancels_the_request_a_submit_stored_after_the_step_read_the_job(
    stack: Stack, api_client: ApiClient, pipeline: JobPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the deadline a worker reads the job still queued while another's submit is answered
    and stored: the job ends expired holding that request id, and the request is cancelled
    (the expiry cancelled what it had read — nothing — and the run went on, paid, untracked)."""
    stack.worker.signal(signal.SIGSTOP)
    try:
        job_id = str(
            api_client.post(
                "/v1/jobs", json=job_body(stack, unique("expiry race [emulator:queue=30]"))
            ).get_json()["id"]
        )
        admit(pipeline)
        seen = pipeline.store.read(job_id)
        assert seen is not None and seen.job.status is Status.QUEUED
        request_id = pipeline.runcomfy.submit(seen.job.input).request_id  # the other's submit
        now = time.time()
        pipeline.store.change(
            job_id,
            lambda j: Step(
                j.moved_to(
                    Status.SUBMITTED,
                    now,
                    upstream=Upstream(request_id=request_id, status="in_queue"),
                ),
                now + 60,
            ),
        )
        first_read_is(seen, pipeline, monkeypatch)
        past_deadline = replace(pipeline, clock=lambda: seen.job.deadline_at + 1)
        past_deadline.advance(job_id)
        monkeypatch.undo()
        job = pipeline.store.get(job_id)
        assert job is not None and job.status is Status.EXPIRED and job.request_id == request_id
        assert upstream_status(stack, request_id) == "cancelled"
    finally:
        stack.worker.signal(signal.SIGCONT)


def test_a_cancel_runcomfy_cannot_take_does_not_stop_the_run_being_followed(
    stack: Stack, api_client: ApiClient, redis_client: redis.Redis
) -> None:
    """RunComfy's cancel answers 503 every time: the run is still looked at, and the job ends
    as the run did (before, only the cancel was tried again: the job expired at its deadline
    and the output of a finished, paid run was thrown away)."""
    prompt = unique("uncancellable [emulator:cancel-503] [emulator:queue=2] [emulator:run=1]")
    job = api_client.post("/v1/jobs", json=job_body(stack, prompt)).get_json()
    api_client.wait_for(job["id"], lambda j: j["status"] in {"submitted", "running"})
    assert api_client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    final = api_client.wait_final(job["id"], timeout_s=60)
    assert final["status"] == "succeeded", final
    assert final["output"]["images"]
    # Tried a few times after a backoff, then given up (a first fix tried again at once, for
    # ever: ~60 cancels a second from one job, the global rate cap spent on them).
    record = JobStore(redis_client, retention_s=3600).get(job["id"])
    assert record is not None and record.cancel_sent
    assert record.cancel_failures == MAX_CANCEL_TRIES
    assert any("did not take the cancel" in note for note in record.notes), record.notes


def test_asking_to_cancel_again_forces_no_step(
    stack: Stack, api_client: ApiClient, pipeline: JobPipeline
) -> None:
    """A second cancel of a job whose cancel is on its way answers the job and changes nothing
    (each one made the job due at once: a client could spend the global rate cap on polls)."""
    stack.worker.signal(signal.SIGSTOP)
    try:
        job_id = submitted_job(
            stack, api_client, pipeline, unique("cancel twice [emulator:queue=30]")
        )
        first = api_client.post(f"/v1/jobs/{job_id}/cancel")
        assert first.status_code == 202 and first.get_json()["cancel_requested"] is True
        later = time.time() + 20
        pipeline.store.job_schedule.postpone(job_id, later)  # as a worker's step planned it
        again = api_client.post(f"/v1/jobs/{job_id}/cancel")
        assert again.status_code == 202 and again.get_json() == first.get_json()
        assert pipeline.store.job_schedule.due_at(job_id) == pytest.approx(later, abs=0.01)
        pipeline.advance(job_id)
        done = pipeline.store.get(job_id)
        assert done is not None and done.status is Status.CANCELLED
    finally:
        stack.worker.signal(signal.SIGCONT)


def test_a_cancel_asked_during_a_look_is_sent_at_the_next_step_at_once(
    stack: Stack, api_client: ApiClient, pipeline: JobPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel that lands while a poll is under way: the poll's commit (computed again on the
    record with the cancel) makes the next step due now, not at the polling pace — queued at
    RunComfy, a cancel sent in time spares a paid run."""
    stack.worker.signal(signal.SIGSTOP)
    try:
        job_id = submitted_job(
            stack, api_client, pipeline, unique("cancel mid-look [emulator:queue=30]")
        )
        seen = pipeline.store.read(job_id)
        assert api_client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
        first_read_is(seen, pipeline, monkeypatch)  # the look read the job before the cancel
        pipeline.advance(job_id)
        monkeypatch.undo()
        job = pipeline.store.get(job_id)
        assert job is not None and job.status is Status.SUBMITTED and job.cancel_requested
        due = pipeline.store.job_schedule.due_at(job_id)
        assert due is not None and due <= time.time()
        pipeline.advance(job_id)
        cancelled = pipeline.store.get(job_id)
        assert cancelled is not None and cancelled.status is Status.CANCELLED
    finally:
        stack.worker.signal(signal.SIGCONT)


def test_a_job_failed_on_an_answer_it_cannot_use_has_its_run_cancelled(
    stack: Stack, api_client: ApiClient, pipeline: JobPipeline
) -> None:
    """An answer without a status fails the job (upstream_bad_response); the run it no longer
    follows is cancelled, not left running, paid for, past RUNCOMFY_MAX_IN_FLIGHT."""
    stack.worker.signal(signal.SIGSTOP)
    try:
        job_id = submitted_job(
            stack,
            api_client,
            pipeline,
            unique("no status [emulator:no-status] [emulator:queue=0] [emulator:run=30]"),
        )
        before = cancel_calls(stack)
        pipeline.advance(job_id)
        job = pipeline.store.get(job_id)
        assert job is not None and job.status is Status.FAILED
        assert job.error is not None and job.error.code == "upstream_bad_response"
        assert cancel_calls(stack) == before + 1
    finally:
        stack.worker.signal(signal.SIGCONT)


@pytest.mark.parametrize("finished", ["before the deadline", "after it"])
def test_at_the_deadline_a_last_look_keeps_a_run_finished_by_then(
    stack: Stack, api_client: ApiClient, pipeline: JobPipeline, finished: str
) -> None:
    """Looks are capped at the deadline, so the last one often comes just as it passes: a run
    RunComfy finished by then ends the job as it ended (it expired, the paid run's output
    thrown away); one finished after it still expires."""
    stack.worker.signal(signal.SIGSTOP)
    try:
        prompt = unique("last look [emulator:queue=0] [emulator:run=0.5]")
        job_id = submitted_job(stack, api_client, pipeline, prompt)
        deadline_at = time.time() + (2.0 if finished == "before the deadline" else 0.1)
        pipeline.store.change(
            job_id, lambda j: Step(j.changed(time.time(), deadline_at=deadline_at), deadline_at)
        )
        time.sleep(1.0)  # the run (0.5 s) is over: ended before a 2 s deadline, after a 0.1 s one
        past_deadline = replace(pipeline, clock=lambda: deadline_at + 0.5)
        past_deadline.advance(job_id)
        job = pipeline.store.get(job_id)
        assert job is not None
        if finished == "before the deadline":
            assert job.status is Status.SUCCEEDED and job.output_images
        else:
            assert job.status is Status.EXPIRED
    finally:
        stack.worker.signal(signal.SIGCONT)


def test_a_cancel_that_lands_during_a_refused_submit_ends_the_job_at_once(
    stack: Stack, api_client: ApiClient, pipeline: JobPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cancel comes while a submit is out; RunComfy refuses that submit (certainly not
    taken): the job is due at once, not after the submit's backoff, and a second cancel ends
    it at once (it was a no-op once a cancel had been asked for)."""
    stack.worker.signal(signal.SIGSTOP)
    try:
        prompt = unique("cancel during a refused submit")
        job_id = str(api_client.post("/v1/jobs", json=job_body(stack, prompt)).get_json()["id"])
        admit(pipeline)

        def cancelled_meanwhile_then_refused(inputs: object) -> None:
            assert api_client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
            raise TransientUpstreamError("HTTP 503", http_status=503, maybe_processed=False)

        monkeypatch.setattr(pipeline.runcomfy, "submit", cancelled_meanwhile_then_refused)
        pipeline.advance(job_id)
        monkeypatch.undo()
        job = pipeline.store.get(job_id)
        assert job is not None and job.status is Status.QUEUED and job.cancel_requested
        assert job.submit_started_at is None
        due = pipeline.store.job_schedule.due_at(job_id)
        assert due is not None and due <= time.time()
        again = api_client.post(f"/v1/jobs/{job_id}/cancel").get_json()
        assert again["status"] == "cancelled"
    finally:
        stack.worker.signal(signal.SIGCONT)
