"""What a step decides, from the job and what RunComfy said: no Redis, no HTTP, no processes."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from core.jobs import Job, JobError, Status, Upstream, new_job
from core.store import Step
from workers import decisions
from workers.decisions import MAX_CANCEL_TRIES, MAX_UNANSWERED_SUBMITS, Move
from workers.polling import (
    FIRST_POLL_S,
    QUEUED_POLL_S,
    RUNNING_POLL_S,
    UNKNOWN_STATUS_MAX_POLL_S,
    RunEstimate,
    backoff_s,
    first_poll_at,
)
from workers.runcomfy import RequestState, TransientUpstreamError

T0 = 1_700_000_000.0
LEASE_S = 30.0
DEADLINE_S = 900
REQUEST = "req-1"


def a_job(**changes: object) -> Job:
    """A queued job accepted at T0."""
    job = new_job(
        client_id="cli_1",
        input={"prompt": "p"},
        webhook_url=None,
        webhook_events=(),
        metadata=None,
        deadline_s=DEADLINE_S,
        now=T0,
    )
    return replace(job, **changes) if changes else job


def submitted(at: float = T0 + 1, **changes: object) -> Job:
    """A job RunComfy accepted at `at`, not looked at yet."""
    job = a_job().moved_to(
        Status.SUBMITTED, at, upstream=Upstream(REQUEST, "in_queue"), last_seen_queued_at=at
    )
    return replace(job, **changes) if changes else job


def running(since: float = T0 + 2, **changes: object) -> Job:
    """A job seen running since `since`, last looked at then."""
    job = submitted().moved_to(
        Status.RUNNING, since, upstream=Upstream(REQUEST, "in_progress"), running_since=since
    )
    job = replace(job, polls=1)
    return replace(job, **changes) if changes else job


def looked(status: str, **fields: object) -> RequestState:
    return RequestState(request_id=REQUEST, status=status, **fields)


def decided(step: Step | None) -> Step:
    assert step is not None, "the decision declined to change the job"
    return step


def seeded() -> random.Random:
    return random.Random(7)


def apply(
    job: Job, state: RequestState, now: float, expected_run: RunEstimate | None = None
) -> Step:
    return decided(
        decisions.apply_look(
            job,
            request_id=REQUEST,
            state=state,
            now=now,
            expected_run=expected_run,
            rng=seeded(),
        )
    )


# --- which step -----------------------------------------------------------------------------


@pytest.mark.parametrize("job", [a_job(), submitted(), running()])
def test_a_job_at_its_deadline_expires_whatever_it_was_doing(job: Job) -> None:
    assert decisions.next_move(job, job.deadline_at, step_lease_s=LEASE_S) is Move.EXPIRE


def test_a_submit_within_its_lease_is_left_to_the_worker_making_it_and_settled_after() -> None:
    marked = a_job(submit_started_at=T0 + 5)
    assert decisions.next_move(marked, T0 + 5 + LEASE_S - 1, step_lease_s=LEASE_S) is (
        Move.LEAVE_TO_SUBMITTER
    )
    assert decisions.next_move(marked, T0 + 5 + LEASE_S, step_lease_s=LEASE_S) is (
        Move.SETTLE_INTERRUPTED_SUBMIT
    )


def test_a_queued_job_is_submitted_unless_a_cancel_was_asked_for_then_cancelled_here() -> None:
    assert decisions.next_move(a_job(), T0, step_lease_s=LEASE_S) is Move.SUBMIT
    asked = a_job(cancel_requested=True)
    assert decisions.next_move(asked, T0, step_lease_s=LEASE_S) is Move.CANCEL_HERE


def test_a_job_at_runcomfy_is_looked_at_and_its_cancel_sent_once() -> None:
    assert decisions.next_move(running(), T0 + 3, step_lease_s=LEASE_S) is Move.LOOK
    asked = running(cancel_requested=True)
    assert decisions.next_move(asked, T0 + 3, step_lease_s=LEASE_S) is Move.CANCEL_UPSTREAM
    sent = running(cancel_requested=True, cancel_sent=True)
    assert decisions.next_move(sent, T0 + 3, step_lease_s=LEASE_S) is Move.LOOK


# --- submit ---------------------------------------------------------------------------------


def test_marking_a_submit_counts_it_and_makes_the_job_due_when_the_lease_ends() -> None:
    step = decided(decisions.mark_submitting(a_job(), T0 + 1, lease_s=LEASE_S))
    assert step.job.submit_started_at == T0 + 1 and step.job.submit_attempts == 1
    assert step.job.status is Status.QUEUED
    assert step.next_step_at == T0 + 1 + LEASE_S


@pytest.mark.parametrize(
    "job", [a_job(submit_started_at=T0), a_job(cancel_requested=True), submitted()]
)
def test_a_job_already_marked_cancelled_or_submitted_is_not_marked_again(job: Job) -> None:
    assert decisions.mark_submitting(job, T0 + 1, lease_s=LEASE_S) is None


def test_an_accepted_submit_makes_the_job_submitted_with_its_first_look_planned() -> None:
    marked = a_job(submit_started_at=T0 + 1, transient_errors=2)
    step = decided(
        decisions.record_request(
            marked, mark=T0 + 1, request_id=REQUEST, accepted_at=T0 + 2, expected_run=None
        )
    )
    assert step.job.status is Status.SUBMITTED and step.job.request_id == REQUEST
    assert step.job.submit_started_at is None and step.job.transient_errors == 0
    assert step.next_step_at == T0 + 2 + FIRST_POLL_S
    fast = decisions.record_request(
        marked,
        mark=T0 + 1,
        request_id=REQUEST,
        accepted_at=T0 + 2,
        expected_run=RunEstimate.exactly(0.5),
    )
    assert (
        decided(fast).next_step_at
        == first_poll_at(T0 + 2, RunEstimate.exactly(0.5))
        < T0 + 2 + FIRST_POLL_S
    )


@pytest.mark.parametrize(
    "now_the_job",
    [
        a_job(submit_started_at=T0 + 9),  # marked anew by a later submit
        a_job(),  # the mark was settled as interrupted
        submitted(),  # another worker's submit was stored
        a_job(submit_started_at=T0 + 1).moved_to(Status.EXPIRED, T0 + 3),
    ],
)
def test_an_answer_to_a_submit_whose_mark_is_gone_changes_nothing(now_the_job: Job) -> None:
    recorded = decisions.record_request(
        now_the_job, mark=T0 + 1, request_id=REQUEST, accepted_at=T0 + 2, expected_run=None
    )
    assert recorded is None
    error = JobError("upstream_rejected", "no")
    assert decisions.fail_submit(now_the_job, mark=T0 + 1, error=error, now=T0 + 2) is None


def test_a_cancel_asked_during_the_submit_makes_the_first_look_due_at_once() -> None:
    marked = a_job(submit_started_at=T0 + 1, cancel_requested=True)
    step = decided(
        decisions.record_request(
            marked, mark=T0 + 1, request_id=REQUEST, accepted_at=T0 + 2, expected_run=None
        )
    )
    assert step.job.status is Status.SUBMITTED and step.next_step_at == T0 + 2


def test_a_refused_submit_fails_the_job_with_its_readable_error() -> None:
    marked = a_job(submit_started_at=T0 + 1)
    error = JobError("upstream_rejected", "RunComfy refused the job: HTTP 400: bad seed")
    step = decided(decisions.fail_submit(marked, mark=T0 + 1, error=error, now=T0 + 2))
    assert step.job.status is Status.FAILED and step.job.error == error
    assert step.next_step_at is None and step.job.finished_at == T0 + 2


def test_a_submit_certainly_not_taken_is_made_again_after_its_backoff() -> None:
    marked = a_job(submit_started_at=T0 + 1, transient_errors=2)
    refused = TransientUpstreamError("HTTP 429", http_status=429, retry_after_s=7)
    step = decided(
        decisions.retry_submit_later(marked, mark=T0 + 1, now=T0 + 2, error=refused, rng=seeded())
    )
    assert step.job.status is Status.QUEUED and step.job.submit_started_at is None
    assert step.job.transient_errors == 3 and step.job.last_transient_error == "HTTP 429"
    assert step.next_step_at is not None and T0 + 2 + 7 <= step.next_step_at <= T0 + 2 + 8


def test_a_submit_whose_outcome_is_unknown_is_made_once_more_with_a_note() -> None:
    marked = a_job(submit_started_at=T0 + 1)
    step = decided(
        decisions.settle_unknown_submit(
            marked,
            mark=T0 + 1,
            now=T0 + 40,
            reason="timed out",
            answered=False,
            rule="resubmit",
            rng=seeded(),
        )
    )
    job = step.job
    assert job.status is Status.QUEUED and job.submit_started_at is None
    assert job.submit_unknown_outcomes == 1 and job.submits_unanswered == 1
    assert "submitting again" in job.notes[-1]
    assert step.next_step_at == T0 + 40 + backoff_s(1, rng=seeded())


def test_a_job_whose_submits_go_unanswered_twice_ends_failed_not_submitted_again() -> None:
    marked = a_job(submit_started_at=T0 + 50, submits_unanswered=MAX_UNANSWERED_SUBMITS)
    step = decided(
        decisions.settle_unknown_submit(
            marked, mark=T0 + 50, now=T0 + 90, reason="timed out", answered=False, rule="resubmit"
        )
    )
    assert step.job.status is Status.FAILED and step.next_step_at is None
    assert step.job.error is not None and step.job.error.code == "submit_outcome_unknown"
    assert "none of 2 submits" in step.job.error.message


def test_submits_answered_with_a_5xx_are_made_again_however_many() -> None:
    marked = a_job(submit_started_at=T0 + 1, submit_unknown_outcomes=6, submits_unanswered=1)
    step = decided(
        decisions.settle_unknown_submit(
            marked, mark=T0 + 1, now=T0 + 2, reason="HTTP 502", answered=True, rule="resubmit"
        )
    )
    assert step.job.status is Status.QUEUED and step.job.submits_unanswered == 1


def test_submit_unknown_fail_ends_the_job_failed_at_the_first_unknown_outcome() -> None:
    marked = a_job(submit_started_at=T0 + 1)
    step = decided(
        decisions.settle_unknown_submit(
            marked, mark=T0 + 1, now=T0 + 2, reason="HTTP 502", answered=True, rule="fail"
        )
    )
    assert step.job.status is Status.FAILED and step.job.error is not None
    assert step.job.error.message.startswith("whether RunComfy accepted the job is unknown")


# --- look -----------------------------------------------------------------------------------


def test_a_look_with_images_ends_the_job_succeeded_with_them() -> None:
    step = apply(running(), looked("succeeded", images=("https://x/1.png",)), T0 + 5)
    assert step.job.status is Status.SUCCEEDED and step.job.output_images == ("https://x/1.png",)
    assert step.next_step_at is None and step.job.polls == 2
    assert step.job.upstream == Upstream(REQUEST, "succeeded")


def test_a_look_at_a_failed_run_ends_the_job_failed_with_runcomfys_words() -> None:
    step = apply(running(), looked("failed", error="model_error: out of memory"), T0 + 5)
    assert step.job.status is Status.FAILED and step.next_step_at is None
    assert step.job.error == JobError("upstream_failed", "model_error: out of memory")


def test_a_request_cancelled_at_runcomfy_ends_the_job_cancelled_with_why_unless_asked() -> None:
    by_runcomfy = apply(submitted(), looked("cancelled"), T0 + 5).job
    assert by_runcomfy.status is Status.CANCELLED and by_runcomfy.error is not None
    assert by_runcomfy.error.code == "upstream_cancelled"
    asked = apply(submitted(cancel_requested=True), looked("cancelled"), T0 + 5).job
    assert asked.status is Status.CANCELLED and asked.error is None


@pytest.mark.parametrize(("position", "in_s"), [(5, QUEUED_POLL_S), (1, 0.5)])
def test_a_queued_request_is_looked_at_again_by_its_place_in_the_queue(
    position: int, in_s: float
) -> None:
    step = apply(submitted(transient_errors=2), looked("in_queue", queue_position=position), T0 + 3)
    assert step.job.status is Status.SUBMITTED and step.job.transient_errors == 0
    assert step.job.last_seen_queued_at == T0 + 3
    assert step.job.upstream == Upstream(REQUEST, "in_queue", position)
    assert step.next_step_at == pytest.approx(T0 + 3 + in_s)


def test_the_first_look_that_sees_the_run_makes_the_job_running_from_its_estimated_start() -> None:
    seen_queued = submitted(polls=1, last_seen_queued_at=T0 + 2)
    step = apply(seen_queued, looked("in_progress"), T0 + 4, expected_run=RunEstimate.exactly(10.0))
    assert step.job.status is Status.RUNNING
    assert step.job.running_since == T0 + 3  # midway between queued at +2 and running at +4
    assert step.next_step_at == T0 + 3 + 10.0  # when it should be done
    unlearned = apply(seen_queued, looked("in_progress"), T0 + 4)
    assert unlearned.next_step_at == T0 + 4 + RUNNING_POLL_S


@pytest.mark.parametrize(
    ("word", "status"),
    [
        ("pending", Status.SUBMITTED),
        ("waiting", Status.SUBMITTED),
        ("starting", Status.RUNNING),
        ("processing", Status.RUNNING),
    ],
)
def test_runcomfys_other_words_for_a_request_still_going_are_known(
    word: str, status: Status
) -> None:
    step = apply(submitted(), looked(word), T0 + 3)
    assert step.job.status is status and step.job.unknown_status_looks == 0
    assert step.job.upstream is not None and step.job.upstream.status == word


def test_a_running_job_told_queued_again_never_goes_back() -> None:
    step = apply(running(), looked("in_queue", queue_position=2), T0 + 5)
    assert step.job.status is Status.RUNNING


@pytest.mark.parametrize("job", [submitted(), running()])
def test_a_status_word_not_known_is_no_failure_the_request_is_followed_on(job: Job) -> None:
    step = apply(job, looked("thinking"), T0 + 10)
    assert step.job.status is job.status and step.job.error is None
    assert step.job.unknown_status_looks == 1 and step.job.polls == job.polls + 1
    assert step.job.upstream == Upstream(REQUEST, "thinking")
    assert "'thinking'" in step.job.notes[-1]
    assert step.next_step_at is not None and T0 + 10.5 <= step.next_step_at <= T0 + 11


def test_looks_at_a_word_not_known_back_off_to_a_cap_and_to_the_deadline() -> None:
    many = apply(running(unknown_status_looks=8), looked("thinking"), T0 + 10)
    assert many.job.unknown_status_looks == 9 and len(many.job.notes) == 0  # noted once
    assert many.next_step_at == T0 + 10 + UNKNOWN_STATUS_MAX_POLL_S
    near_the_end = running(unknown_status_looks=8)
    late = apply(near_the_end, looked("thinking"), near_the_end.deadline_at - 1)
    assert late.next_step_at == near_the_end.deadline_at


def test_a_known_word_after_words_not_known_starts_the_backoff_over() -> None:
    step = apply(submitted(unknown_status_looks=4), looked("in_progress"), T0 + 10)
    assert step.job.status is Status.RUNNING and step.job.unknown_status_looks == 0


@pytest.mark.parametrize(
    "job",
    [
        running().moved_to(Status.CANCELLED, T0 + 4),
        running(upstream=Upstream("req-other", "in_progress")),
    ],
)
def test_a_look_at_a_job_ended_meanwhile_or_following_another_request_changes_nothing(
    job: Job,
) -> None:
    done = looked("succeeded", images=("https://x/1.png",))
    assert (
        decisions.apply_look(job, request_id=REQUEST, state=done, now=T0 + 5, expected_run=None)
        is None
    )


def test_a_failed_look_is_counted_and_made_again_after_its_backoff() -> None:
    error = TransientUpstreamError("GET /result: HTTP 503", http_status=503)
    step = decided(decisions.retry_look_later(running(transient_errors=1), now=T0 + 5, error=error))
    assert step.job.status is Status.RUNNING and step.job.transient_errors == 2
    assert step.job.last_transient_error == "GET /result: HTTP 503"
    assert step.next_step_at is not None and T0 + 6 <= step.next_step_at <= T0 + 7
    final = running().moved_to(Status.SUCCEEDED, T0 + 4)
    assert decisions.retry_look_later(final, now=T0 + 5, error=error) is None


def test_a_run_over_by_its_status_has_its_output_fetched_at_once() -> None:
    step = decided(
        decisions.note_seen_finished(running(), request_id=REQUEST, status="completed", now=T0 + 5)
    )
    assert step.job.status is Status.RUNNING and step.next_step_at == T0 + 5
    assert step.job.upstream == Upstream(REQUEST, "completed")


# --- what a finished run taught -------------------------------------------------------------


def test_a_run_done_at_the_first_look_is_learned_from_runcomfys_times() -> None:
    before = submitted()
    state = looked("succeeded", images=("u",), created_at=T0 + 1, finished_at=T0 + 3.5)
    after = apply(before, state, T0 + 5).job
    assert decisions.observed_run_s(before, after, state, T0 + 5) == 2.5


def test_a_run_without_runcomfys_end_is_learned_as_ending_between_two_looks() -> None:
    before = running(since=T0 + 2)  # last looked at (and seen running) at T0 + 2
    state = looked("succeeded", images=("u",))
    after = apply(before, state, T0 + 6).job
    assert decisions.observed_run_s(before, after, state, T0 + 6) == 2.0  # ended at T0 + 4


@pytest.mark.parametrize(
    "last_look",
    [
        {"transient_errors": 1},  # it failed
        {"unknown_status_looks": 1, "upstream": Upstream(REQUEST, "thinking")},
        {"upstream": Upstream(REQUEST, "completed")},  # it saw the run over
        {"cancel_requested": True},  # a cancel came since
    ],
)
def test_nothing_is_learned_when_the_last_look_did_not_see_the_run_going(
    last_look: dict[str, object],
) -> None:
    before = running(since=T0 + 2, **last_look)
    state = looked("succeeded", images=("u",))
    after = apply(before, state, T0 + 6).job
    assert decisions.observed_run_s(before, after, state, T0 + 6) is None


# --- cancel and deadline --------------------------------------------------------------------


def test_a_cancel_runcomfy_takes_ends_the_job_cancelled() -> None:
    asked = submitted(cancel_requested=True)
    step = decided(
        decisions.settle_cancel(
            asked, request_id=REQUEST, cancelled=True, answer="cancelled", now=T0 + 3
        )
    )
    assert step.job.status is Status.CANCELLED and step.job.cancel_sent
    assert step.next_step_at is None and step.job.error is None


def test_a_cancel_runcomfy_cannot_take_has_the_run_followed_to_its_end() -> None:
    asked = running(cancel_requested=True)
    step = decided(
        decisions.settle_cancel(
            asked, request_id=REQUEST, cancelled=False, answer="not_cancellable", now=T0 + 3
        )
    )
    assert step.job.status is Status.RUNNING and step.job.cancel_sent
    assert "not_cancellable" in step.job.notes[-1] and step.next_step_at == T0 + 3


def test_a_cancel_not_taken_is_tried_again_then_given_up_after_max_tries() -> None:
    error = TransientUpstreamError("POST /cancel: HTTP 503", http_status=503)
    job = running(cancel_requested=True)
    now = T0 + 3
    for tries in range(1, MAX_CANCEL_TRIES + 1):
        step = decided(
            decisions.count_cancel_not_taken(job, request_id=REQUEST, now=now, error=error)
        )
        job = step.job
        assert job.cancel_failures == tries
        if tries < MAX_CANCEL_TRIES:
            assert not job.cancel_sent
            assert step.next_step_at is not None and step.next_step_at > now
    assert job.cancel_sent and step.next_step_at == now and "5 tries" in job.notes[-1]
    again = decisions.count_cancel_not_taken(job, request_id=REQUEST, now=now, error=error)
    assert again is None


def test_expiry_ends_a_live_job_with_a_readable_error_and_leaves_a_final_one_alone() -> None:
    step = decided(decisions.expire(running(), T0 + DEADLINE_S, deadline_s=DEADLINE_S))
    assert step.job.status is Status.EXPIRED and step.next_step_at is None
    assert step.job.error == JobError(
        "deadline_exceeded", f"not finished within JOB_DEADLINE_S ({DEADLINE_S} s)"
    )
    ended = running().moved_to(Status.SUCCEEDED, T0 + 5)
    assert decisions.expire(ended, T0 + DEADLINE_S, deadline_s=DEADLINE_S) is None


def test_a_last_look_keeps_only_a_run_runcomfy_finished_by_the_deadline() -> None:
    job = running()
    by_then = looked("succeeded", images=("u",), finished_at=job.deadline_at - 1)
    after = looked("succeeded", images=("u",), finished_at=job.deadline_at + 1)
    assert decisions.finished_by_deadline(job, by_then)
    assert not decisions.finished_by_deadline(job, after)
    assert not decisions.finished_by_deadline(job, looked("in_progress"))
    assert not decisions.finished_by_deadline(job, looked("succeeded", images=("u",)))


@pytest.mark.parametrize(
    ("upstream", "left"),
    [
        (None, None),
        (Upstream(REQUEST, "in_queue"), REQUEST),
        (Upstream(REQUEST, "thinking"), REQUEST),  # a word not known: may well be running
        (Upstream(REQUEST, "completed"), None),
        (Upstream(REQUEST, "cancelled"), None),
    ],
)
def test_an_ended_job_leaves_its_request_to_cancel_unless_runcomfy_ended_it(
    upstream: Upstream | None, left: str | None
) -> None:
    ended = a_job(upstream=upstream).moved_to(Status.EXPIRED, T0 + DEADLINE_S)
    assert decisions.request_left_running(ended) == left


def test_a_next_step_is_capped_at_the_deadline_and_brought_forward_for_an_untried_cancel() -> None:
    job = running()
    assert decisions.step_due_at(job, T0 + 5, job.deadline_at + 60) == job.deadline_at
    asked = running(cancel_requested=True)
    assert decisions.step_due_at(asked, T0 + 5, T0 + 20) == T0 + 5
    refused_once = running(cancel_requested=True, cancel_failures=1)
    assert decisions.step_due_at(refused_once, T0 + 5, T0 + 20) == T0 + 20


# --- cost -----------------------------------------------------------------------------------

PRICE = 0.0125


def cost_of(step: Step) -> tuple[float | None, str | None]:
    return step.job.cost_usd, step.job.cost_source


def test_a_success_costs_what_runcomfy_says_it_cost() -> None:
    state = looked("succeeded", images=("https://x/1.png",), cost_usd=0.031)
    step = decided(
        decisions.apply_look(
            running(), request_id=REQUEST, state=state, now=T0 + 5, expected_run=None,
            list_price_usd=PRICE,
        )
    )  # fmt: skip
    assert cost_of(step) == (0.031, "upstream")


def test_a_success_runcomfy_gave_no_cost_for_costs_the_list_price_times_its_images() -> None:
    state = looked("succeeded", images=("https://x/1.png", "https://x/2.png"))
    step = decided(
        decisions.apply_look(
            running(), request_id=REQUEST, state=state, now=T0 + 5, expected_run=None,
            list_price_usd=PRICE,
        )
    )  # fmt: skip
    assert cost_of(step) == (0.025, "list_price") and not step.job.notes


def test_a_success_with_no_price_known_still_ends_with_a_cost_of_0_and_a_note() -> None:
    step = apply(running(), looked("succeeded", images=("https://x/1.png",)), T0 + 5)
    assert step.job.status is Status.SUCCEEDED and step.next_step_at is None
    assert cost_of(step) == (0.0, "list_price")
    assert "list price was unknown" in step.job.notes[-1]


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (looked("failed", error="out of memory"), (0.0, "list_price")),  # no output: 0
        (looked("failed", error="out of memory", cost_usd=0.01), (0.01, "upstream")),
        (looked("cancelled"), (0.0, "list_price")),
        (looked("cancelled", cost_usd=0.0), (0.0, "upstream")),
    ],
)
def test_a_failed_or_cancelled_run_costs_runcomfys_figure_or_nothing(
    state: RequestState, expected: tuple[float, str]
) -> None:
    step = decided(
        decisions.apply_look(
            running(), request_id=REQUEST, state=state, now=T0 + 5, expected_run=None,
            list_price_usd=PRICE,
        )
    )  # fmt: skip
    assert step.job.status.is_final and cost_of(step) == expected


def test_a_look_that_does_not_end_the_job_sets_no_cost() -> None:
    for state in (looked("in_queue", queue_position=2), looked("in_progress"), looked("mulling")):
        assert apply(submitted(), state, T0 + 3).job.cost_usd is None


def test_a_job_cancelled_before_or_while_queued_at_runcomfy_costs_nothing() -> None:
    here = decided(decisions.end_if_live(a_job(cancel_requested=True), Status.CANCELLED, T0 + 1))
    assert cost_of(here) == (0.0, "list_price")
    there = decided(
        decisions.settle_cancel(
            submitted(cancel_requested=True),
            request_id=REQUEST,
            cancelled=True,
            answer="cancelled",
            now=T0 + 3,
        )
    )
    assert cost_of(there) == (0.0, "list_price")


def test_a_submit_refused_costs_nothing_one_most_likely_running_costs_one_run() -> None:
    marked = a_job(submit_started_at=T0 + 1)
    refused = JobError("upstream_rejected", "HTTP 422")
    step = decided(
        decisions.fail_submit(marked, mark=T0 + 1, error=refused, now=T0 + 2, list_price_usd=PRICE)
    )
    assert cost_of(step) == (0.0, "list_price")
    unusable = JobError("upstream_bad_response", "no request id")
    step = decided(
        decisions.fail_submit(
            marked, mark=T0 + 1, error=unusable, now=T0 + 2, runs_charged=1, list_price_usd=PRICE
        )
    )
    assert cost_of(step) == (PRICE, "list_price")


def test_a_job_failed_for_an_unknown_submit_outcome_costs_one_run() -> None:
    marked = a_job(submit_started_at=T0 + 1)
    step = decided(
        decisions.settle_unknown_submit(
            marked,
            mark=T0 + 1,
            now=T0 + 2,
            reason="HTTP 502",
            answered=True,
            rule="fail",
            list_price_usd=PRICE,
        )
    )
    assert step.job.status is Status.FAILED and cost_of(step) == (PRICE, "list_price")


def test_expiry_costs_one_run_unless_runcomfy_never_had_it_or_cancelled_it() -> None:
    def expired(job: Job, cancelled: str | None) -> tuple[float | None, str | None]:
        return cost_of(
            decided(
                decisions.expire(
                    job,
                    T0 + DEADLINE_S,
                    deadline_s=DEADLINE_S,
                    cancelled_request=cancelled,
                    list_price_usd=PRICE,
                )
            )
        )

    assert expired(a_job(), None) == (0.0, "list_price")  # never reached RunComfy
    assert expired(submitted(), REQUEST) == (0.0, "list_price")  # cancelled while queued
    assert expired(running(), None) == (PRICE, "list_price")  # ran on, billed
    assert expired(running(), "another-request") == (PRICE, "list_price")


def test_a_job_ended_here_after_its_request_was_lost_costs_one_run() -> None:
    step = decided(
        decisions.end_if_live(
            running(),
            Status.FAILED,
            T0 + 9,
            JobError("upstream_request_lost", "gone"),
            runs_charged=1,
            list_price_usd=PRICE,
        )
    )
    assert cost_of(step) == (PRICE, "list_price")


# --- the account's own trouble ----------------------------------------------------------------


def test_a_submit_refused_for_the_account_leaves_the_job_queued_to_probe_again_soon() -> None:
    marked = a_job(submit_started_at=T0 + 1, submit_attempts=1)
    step = decided(
        decisions.wait_for_account(
            marked, mark=T0 + 1, now=T0 + 2, kind="out_of_balance", rng=seeded()
        )
    )
    job = step.job
    assert job.status is Status.QUEUED and job.submit_started_at is None
    assert job.cost_usd is None and job.error is None and job.account_waits == 1
    assert "out of balance" in job.notes[-1] and "not failing" in job.notes[-1]
    assert step.next_step_at is not None
    assert T0 + 2 + 10 <= step.next_step_at <= T0 + 2 + 12


def test_a_job_waiting_for_the_account_without_calling_comes_back_within_30_s() -> None:
    seen = set()
    for seed in range(50):
        step = decided(
            decisions.wait_for_account(
                a_job(account_waits=3, notes=("n",)),
                mark=None,
                now=T0 + 5,
                kind="token_refused",
                rng=random.Random(seed),
            )
        )
        assert step.next_step_at is not None and T0 + 25 <= step.next_step_at <= T0 + 35
        seen.add(round(step.next_step_at))
        assert step.job.account_waits == 4 and step.job.notes == ("n",)  # noted once a spell
    assert len(seen) > 3  # spread out, not all at one moment


def test_waiting_for_the_account_ends_at_the_deadline_and_leaves_other_jobs_alone() -> None:
    near_the_end = a_job(deadline_at=T0 + 10)
    step = decided(
        decisions.wait_for_account(near_the_end, mark=None, now=T0 + 5, kind="out_of_balance")
    )
    assert step.next_step_at == T0 + 10
    assert (
        decisions.wait_for_account(submitted(), mark=None, now=T0 + 5, kind="out_of_balance")
        is None
    )
    marked_anew = a_job(submit_started_at=T0 + 4)
    assert (
        decisions.wait_for_account(marked_anew, mark=T0 + 1, now=T0 + 5, kind="out_of_balance")
        is None
    )


def test_a_look_or_cancel_refused_for_the_account_keeps_the_job_following_its_request() -> None:
    asked = running(cancel_requested=True)
    step = decided(
        decisions.follow_through_account_trouble(
            asked, request_id=REQUEST, now=T0 + 5, kind="token_refused", rng=seeded()
        )
    )
    job = step.job
    assert job.status is Status.RUNNING and not job.cancel_sent and job.error is None
    assert job.account_waits == 1 and "token" in job.notes[-1]
    assert step.next_step_at is not None and T0 + 25 <= step.next_step_at <= T0 + 35
    assert decisions.next_move(job, step.next_step_at, step_lease_s=LEASE_S) is Move.CANCEL_UPSTREAM
    seen_again = apply(replace(job, cancel_requested=False), looked("in_progress"), T0 + 40)
    assert seen_again.job.account_waits == 0


def test_an_accepted_submit_ends_the_jobs_wait_for_the_account() -> None:
    waited = a_job(submit_started_at=T0 + 30, account_waits=2)
    step = decided(
        decisions.record_request(
            waited, mark=T0 + 30, request_id=REQUEST, accepted_at=T0 + 31, expected_run=None
        )
    )
    assert step.job.status is Status.SUBMITTED and step.job.account_waits == 0
