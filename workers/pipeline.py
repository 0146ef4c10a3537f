"""One step of a job's life: submit, poll, cancel or expire — decided from the job record.

`JobPipeline.advance(job_id)` is the only entry point. It reads the record, takes the one step the
record calls for (at most a couple of short HTTP calls), and commits the outcome compare-and-set
together with when the next step is due. Nothing here waits for RunComfy: the next look is a time
in the job schedule, not a sleep. Running a step twice, or concurrently, changes nothing twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from core.admission import ADMISSION_RECHECK_S
from core.jobs import Job, JobError, Status, Upstream
from core.metrics import Counters
from core.settings import Settings
from core.store import Committed, JobStore, Record, Step
from workers.polling import backoff_s, estimated_start, first_poll_at, next_poll_at
from workers.run_times import RunTimes
from workers.runcomfy import (
    FINISHED_STATUSES,
    PermanentUpstreamError,
    RequestState,
    RunComfyClient,
    TransientUpstreamError,
    UnknownRequestError,
    UnusableAnswerError,
    UpstreamError,
)
from workers.throttle import UpstreamThrottle

# Submits of one job that may go without any answer (timed out, cut off, the worker died during
# the call) before it ends failed: each may be a paid run (PRODUCT §7: "submitted once more").
MAX_UNANSWERED_SUBMITS = 1
# Tries of a cancel RunComfy does not take (5xx, 429, no answer) before the run is followed to
# its end without it: a cancel spares a paid run only while it is queued. With the backoff
# between them (0.5-1 s, doubling), 5 tries span 7.5-15 s of an outage (3 spanned 1.5-3 s).
MAX_CANCEL_TRIES = 5

log = logging.getLogger(__name__)


@dataclass
class JobPipeline:
    """Takes jobs forward one step at a time."""

    store: JobStore
    runcomfy: RunComfyClient
    settings: Settings
    counters: Counters
    throttle: UpstreamThrottle
    run_times: RunTimes
    on_events: Callable[[], None]  # new webhook events are waiting: wake the delivery side
    on_slot_freed: Callable[[], None]  # a job ended: wake admission for the next in line
    clock: Callable[[], float] = time.time

    def advance(self, job_id: str) -> None:
        """Take the next step the job record calls for."""
        record = self.store.read(job_id)
        if record is None or record.job.status.is_final:
            self.store.job_schedule.remove(self.store.redis, job_id)
            return
        job = record.job
        now = self.clock()
        if now >= job.deadline_at:
            self._last_look_then_expire(record)
        elif job.status is Status.QUEUED:
            if job.submit_started_at is not None:
                if now - job.submit_started_at < self.settings.step_lease_s:
                    return  # another worker is submitting right now; its commit decides
                self._submit_outcome_unknown(
                    job, "a submit was interrupted before its answer was stored", answered=False
                )
            elif job.cancel_requested:
                self._commit(job.id, lambda j: _final_if_live(j, Status.CANCELLED, self.clock()))
            elif not self.store.admission.holds_slot(job.id):
                self._wait_for_slot(job, now)
            elif self._may_call_upstream(job, now):
                self._submit(record)
        elif not self._may_call_upstream(job, now):
            return
        elif job.cancel_requested and not job.cancel_sent:
            self._cancel_upstream(record)
        else:
            self._poll(record)

    def _on_transient(self, exc: TransientUpstreamError) -> None:
        """Count it; a 429 pauses every worker's calls (global cool-down)."""
        self.counters.add("upstream_transient_errors")
        if exc.http_status == 429:
            self.throttle.cool_down(exc.retry_after_s)

    def _wait_for_slot(self, job: Job, now: float) -> None:
        """Not admitted yet: stay in line (admission makes the job due when a slot is free)."""
        recheck_at = min(job.deadline_at, now + ADMISSION_RECHECK_S)
        if self.store.admission.stay_in_line(job, recheck_at):
            log.warning("queued job was missing from its line; put back", extra={"job_id": job.id})

    def _may_call_upstream(self, job: Job, now: float) -> bool:
        """The global request-rate cap allows a call now; otherwise the job looks again later."""
        wait_s = self.throttle.acquire(job.id)
        if wait_s <= 0:
            return True
        self.counters.add("upstream_calls_postponed")
        self.store.job_schedule.postpone(job.id, min(job.deadline_at, now + wait_s))
        return False

    # --- submit -----------------------------------------------------------------------------

    def _submit(self, record: Record) -> None:
        job = record.job
        now = self.clock()
        lease_end = now + self.settings.step_lease_s

        def mark_submitting(j: Job) -> Step | None:
            if (
                j.status is not Status.QUEUED
                or j.submit_started_at is not None
                or j.cancel_requested
            ):
                return None
            return Step(
                j.changed(now, submit_started_at=now, submit_attempts=j.submit_attempts + 1),
                lease_end,
            )

        marked = self._commit(job.id, mark_submitting, seen=record)
        if marked is None:
            return
        self.counters.add("upstream_submits")
        try:
            submitted = self.runcomfy.submit(job.input)
        except TransientUpstreamError as exc:
            self._on_transient(exc)
            if exc.maybe_processed:
                self._submit_outcome_unknown(
                    marked.job,
                    exc.message,
                    answered=not exc.went_unanswered,
                    retry_after_s=exc.retry_after_s,
                )
            else:
                self._retry_submit_later(marked.job, exc)
            return
        except UnusableAnswerError as exc:  # accepted, most likely, but not to be followed
            self.counters.add("submit_outcome_unknown")
            message = (
                f"RunComfy's answer to the submit cannot be used ({exc.message}); it may be "
                "running the job, untracked; not submitting it again"
            )
            self._submit_failed(marked.job, "upstream_bad_response", message)
            return
        except UpstreamError as exc:
            message = f"RunComfy refused the job: {exc.message}"
            self._submit_failed(marked.job, "upstream_rejected", message)
            return
        accepted_at = self.clock()
        expected_run_s = self.run_times.expected_s(job.input)

        def record_request(j: Job) -> Step | None:
            if not _holds_mark(j, now):
                return None
            upstream = Upstream(request_id=submitted.request_id, status="in_queue")
            moved = j.moved_to(
                Status.SUBMITTED,
                accepted_at,
                upstream=upstream,
                submit_started_at=None,
                polls=0,
                transient_errors=0,
                last_seen_queued_at=accepted_at,
            )
            return Step(
                moved, _next_step_at(j, accepted_at, first_poll_at(accepted_at, expected_run_s))
            )

        committed = self._commit(job.id, record_request, seen=marked.record)
        if committed is None:
            # The job ended meanwhile (expired or deleted): don't leave a paid run behind.
            log.warning(
                "job ended while its submit was answered; cancelling the upstream request",
                extra={"job_id": job.id, "upstream_request_id": submitted.request_id},
            )
            self._best_effort_cancel(submitted.request_id)
        else:
            log.info(
                "submitted",
                extra={
                    "job_id": job.id,
                    "client_id": job.client_id,
                    "upstream_request_id": submitted.request_id,
                },
            )

    def _submit_failed(self, marked: Job, code: str, message: str) -> None:
        """The submit `marked` (the job as marked for it) made failed for good: so does the job,
        if it still holds that mark (a stale step must not fail a job submitted meanwhile)."""
        now = self.clock()

        def fail(j: Job) -> Step | None:
            if not _holds_mark(j, marked.submit_started_at):
                return None
            error = JobError(code, message)
            return Step(j.moved_to(Status.FAILED, now, error=error, submit_started_at=None), None)

        self._commit(marked.id, fail)

    def _retry_submit_later(self, marked: Job, exc: TransientUpstreamError) -> None:
        """The submit `marked` made was certainly not accepted: clear its mark (if the job
        still holds it: not a newer submit's) and try again after the backoff."""
        now = self.clock()

        def clear_mark(j: Job) -> Step | None:
            if not _holds_mark(j, marked.submit_started_at):
                return None
            failures = j.transient_errors + 1
            changed = j.changed(
                now,
                submit_started_at=None,
                transient_errors=failures,
                last_transient_error=exc.message,
            )
            return Step(changed, _next_step_at(j, now, now + _retry_in_s(failures, exc)))

        self._commit(marked.id, clear_mark)

    def _submit_outcome_unknown(
        self, job: Job, reason: str, *, answered: bool, retry_after_s: float | None = None
    ) -> None:
        """RunComfy may or may not have accepted the submit that `job` (as it was marked) made:
        apply SUBMIT_UNKNOWN. A resubmit waits at least `retry_after_s`, the 5xx's Retry-After.

        `answered`: RunComfy answered, with a 5xx. Otherwise no answer came at all (timed out,
        cut off, or the worker died during the call), and RunComfy may well be running the job:
        such a job is submitted once more, and ends failed if that one goes unanswered too —
        when RunComfy is slow to answer submits, each resubmit would be one more paid run, up
        to the deadline. A 5xx outage is retried until the deadline (most such answers accept
        nothing). The step changes the job only if it still holds the mark it was given.
        """
        now = self.clock()
        self.counters.add("submit_outcome_unknown")
        log.warning(
            "submit outcome unknown",
            extra={
                "job_id": job.id,
                "client_id": job.client_id,
                "reason": reason,
                "rule": self.settings.submit_unknown,
            },
        )
        mark = job.submit_started_at

        def settle(j: Job) -> Step | None:
            if not _holds_mark(j, mark):
                return None  # stored meanwhile (request id), ended, or marked anew
            unanswered = j.submits_unanswered + (0 if answered else 1)
            if self.settings.submit_unknown == "fail":
                message = f"whether RunComfy accepted the job is unknown ({reason}); not submitting it again"
            elif unanswered > MAX_UNANSWERED_SUBMITS:
                message = (
                    f"RunComfy answered none of {unanswered} submits of the job ({reason}); "
                    "not submitting it again: it may already be running"
                )
            else:
                noted = j.with_note(now, f"submit outcome unknown ({reason}); submitting again")
                changed = noted.changed(
                    now,
                    submit_started_at=None,
                    submit_unknown_outcomes=j.submit_unknown_outcomes + 1,
                    submits_unanswered=unanswered,
                    transient_errors=j.transient_errors + 1,
                )
                wait_s = backoff_s(j.transient_errors + 1, retry_after_s=retry_after_s)
                return Step(changed, _next_step_at(j, now, now + wait_s))
            counted = j.changed(
                now,
                submit_unknown_outcomes=j.submit_unknown_outcomes + 1,
                submits_unanswered=unanswered,
            )
            error = JobError("submit_outcome_unknown", message)
            return Step(
                counted.moved_to(Status.FAILED, now, error=error, submit_started_at=None), None
            )

        self._commit(job.id, settle)

    # --- poll -------------------------------------------------------------------------------

    def _poll(self, record: Record) -> None:
        job = record.job
        request_id = job.request_id
        assert request_id is not None
        queued = job.upstream is None or job.upstream.status in (None, "in_queue", "queued")
        try:
            # /result answers in one call both "not done yet" and the final output; /status adds
            # the queue position, which decides how soon to look again while queued. The first
            # look asks /result (a fast run may well be done by then); a queued one, /status.
            # A second call in the look takes a token of its own (the rate cap counts calls, not
            # looks), only if one is free: the position can wait; the output, a next step.
            self.counters.add("upstream_polls")
            ask_status = queued and job.polls > 0
            state = (
                self.runcomfy.status(request_id) if ask_status else self.runcomfy.result(request_id)
            )
            if state.is_queued and not ask_status and self._another_call(job):
                ask_status, state = True, self.runcomfy.status(request_id)
            if state.is_finished and ask_status:  # /status never carries the output
                if not self._another_call(job):
                    self._fetch_output_next(job, request_id, state)
                    return
                state = self.runcomfy.result(request_id)
        except TransientUpstreamError as exc:
            self._on_transient(exc)
            self._retry_poll_later(job, exc)
            return
        except UnknownRequestError as exc:
            self._fail(
                job.id,
                "upstream_request_lost",
                f"RunComfy no longer knows the request: {exc.message}",
            )
            return
        except PermanentUpstreamError as exc:
            failed = self._fail(
                job.id,
                "upstream_bad_response",
                f"RunComfy gave an answer we cannot use: {exc.message}",
            )
            if failed is not None:  # no longer followed: not left running, paid for
                self._cancel_left_behind(failed.job)
            return
        self._apply_state(record, request_id, state)

    def _another_call(self, job: Job) -> bool:
        """A further RunComfy call in this step, beside the one its token was taken for: only
        if the rate cap has a token free for it (no place in line taken); counted as a poll."""
        if not self.throttle.acquire_if_free(job.id):
            return False
        self.counters.add("upstream_polls")
        return True

    def _fetch_output_next(self, job: Job, request_id: str, state: RequestState) -> None:
        """/status says the run is over, and the rate cap has no token for /result now: note
        what was seen (the next step asks /result) and make that step due at once."""
        now = self.clock()

        def seen_finished(j: Job) -> Step | None:
            if not _follows(j, request_id):
                return None
            upstream = Upstream(request_id, state.status, None)
            return Step(j.changed(now, upstream=upstream, polls=j.polls + 1), now)

        self._commit(job.id, seen_finished)

    def _apply_state(self, record: Record, request_id: str, state: RequestState) -> None:
        job = record.job
        now = self.clock()
        expected_run_s = self.run_times.expected_s(job.input)

        def apply(j: Job) -> Step | None:
            if not _follows(j, request_id):
                return None
            upstream = Upstream(request_id, state.status, state.queue_position)
            polls = j.polls + 1
            if state.images is not None:
                return Step(
                    j.moved_to(
                        Status.SUCCEEDED,
                        now,
                        upstream=upstream,
                        output_images=state.images,
                        polls=polls,
                    ),
                    None,
                )
            if state.error is not None:
                error = JobError("upstream_failed", state.error)
                return Step(
                    j.moved_to(Status.FAILED, now, upstream=upstream, error=error, polls=polls),
                    None,
                )
            if state.is_finished:  # cancelled upstream
                cancel_error = (
                    None
                    if j.cancel_requested
                    else JobError("upstream_cancelled", "RunComfy cancelled the request")
                )
                return Step(
                    j.moved_to(
                        Status.CANCELLED, now, upstream=upstream, error=cancel_error, polls=polls
                    ),
                    None,
                )
            if not state.is_running:  # still queued
                next_at = next_poll_at(now=now, running=False, queue_position=state.queue_position)
                changed = j.changed(
                    now, upstream=upstream, polls=polls, transient_errors=0, last_seen_queued_at=now
                )
                return Step(changed, _next_step_at(j, now, next_at))
            started = j.running_since or estimated_start(
                last_seen_queued_at=j.last_seen_queued_at or now,
                first_seen_running_at=now,
                seen_queued=j.polls > 0,
            )
            next_at = next_poll_at(
                now=now, running=True, running_since=started, expected_run_s=expected_run_s
            )
            if j.status is Status.SUBMITTED:
                moved = j.moved_to(
                    Status.RUNNING,
                    now,
                    upstream=upstream,
                    polls=polls,
                    running_since=started,
                    transient_errors=0,
                )
                return Step(moved, _next_step_at(j, now, next_at))
            changed = j.changed(now, upstream=upstream, polls=polls, transient_errors=0)
            return Step(changed, _next_step_at(j, now, next_at))

        committed = self._commit(job.id, apply, seen=record)
        if committed is None:
            return
        after = committed.job
        if after.status is Status.SUCCEEDED:
            # The record's last change was the last look, which saw it running — unless that
            # look failed, a cancel came since, or it saw the run over (the output was left to
            # this step): then when it ended is not known.
            seen_over = job.upstream is not None and job.upstream.status in FINISHED_STATUSES
            looked = job.transient_errors == 0 and not job.cancel_requested and not seen_over
            self._learn_run_time(after, state, now, last_look_at=job.updated_at if looked else None)
        elif (
            expected_run_s is None
            and job.status is Status.SUBMITTED
            and after.status is Status.RUNNING
            and after.running_since is not None
        ):  # seen running, nothing learned: the shape's first learned run re-plans it
            self.run_times.wait_for_first(after.input, after.id, after.running_since)

    def _learn_run_time(
        self, job: Job, state: RequestState, now: float, *, last_look_at: float | None
    ) -> None:
        """Teach RunTimes how long this run took: from when we saw it start, or — if it was
        done at the first look — RunComfy's own created/finished times (queue + run: an upper
        bound, on one clock). Without RunComfy's finished_at, the run ended between the last
        look (`last_look_at`, when it was still running) and this one: the middle is taken (nothing
        is learned if that look is not known).
        (Taking this look's time only ever grew the estimate: the look comes when a run is
        expected to be done, so a shorter run was learned as lasting until then, and the next
        look came later still.)"""
        if job.running_since is None:
            done_at_first_look = job.polls == 1
            if (
                done_at_first_look
                and state.created_at is not None
                and state.finished_at is not None
            ):
                self.run_times.learn(job.input, state.finished_at - state.created_at)
            return
        finished = state.finished_at
        if finished is None or not job.running_since < finished <= now + 1:
            if last_look_at is None:
                return
            finished = (max(last_look_at, job.running_since) + now) / 2
        self.run_times.learn(job.input, finished - job.running_since)

    def _retry_poll_later(self, job: Job, exc: TransientUpstreamError) -> None:
        now = self.clock()

        def later(j: Job) -> Step | None:
            if j.status.is_final:
                return None
            failures = j.transient_errors + 1
            changed = j.changed(
                now, transient_errors=failures, last_transient_error=exc.message, polls=j.polls + 1
            )
            return Step(changed, _next_step_at(j, now, now + _retry_in_s(failures, exc)))

        self._commit(job.id, later)

    # --- cancel and deadline ----------------------------------------------------------------

    def _cancel_upstream(self, record: Record) -> None:
        job = record.job
        request_id = job.request_id
        assert request_id is not None
        try:
            self.counters.add("upstream_cancels")
            outcome = self.runcomfy.cancel(request_id)
        except TransientUpstreamError as exc:
            self._on_transient(exc)
            self._cancel_not_taken(job, exc)
            return
        except UpstreamError as exc:
            outcome = None
            reason = exc.message
        now = self.clock()

        def settle(j: Job) -> Step | None:
            if not _follows(j, request_id):
                return None
            if outcome is not None and outcome.cancelled:
                upstream = Upstream(request_id, "cancelled", None)
                return Step(
                    j.moved_to(Status.CANCELLED, now, upstream=upstream, cancel_sent=True), None
                )
            why = outcome.outcome if outcome is not None else reason
            noted = j.with_note(
                now, f"cancel requested but RunComfy answered {why}; following the run to its end"
            )
            return Step(noted.changed(now, cancel_sent=True), now)

        self._commit(job.id, settle)

    def _cancel_not_taken(self, job: Job, exc: TransientUpstreamError) -> None:
        """RunComfy did not take the cancel (5xx, 429, no answer): tried again after a backoff,
        MAX_CANCEL_TRIES in all; then the run is followed to its end without it. (Tried again
        at once for ever, the looks that would see the run end never came: the job expired, the
        output of a finished, paid run thrown away.)"""
        request_id = job.request_id
        now = self.clock()

        def count(j: Job) -> Step | None:
            if not _follows(j, request_id) or j.cancel_sent:
                return None
            failures = j.cancel_failures + 1
            changed = j.changed(now, cancel_failures=failures, last_transient_error=exc.message)
            if failures >= MAX_CANCEL_TRIES:
                changed = changed.with_note(
                    now,
                    f"RunComfy did not take the cancel ({failures} tries, last: {exc.message}); "
                    "following the run to its end",
                ).changed(now, cancel_sent=True)
                return Step(changed, now)
            return Step(changed, min(j.deadline_at, now + _retry_in_s(failures, exc)))

        self._commit(job.id, count)

    def _last_look_then_expire(self, record: Record) -> None:
        """At the deadline, one last look if a token is free: a run RunComfy finished by the
        deadline ends the job as it ended (a look planned for the deadline — looks are capped
        there — came just too late to see it, and the output of a paid run was thrown away).
        Anything else expires; a look that fails or has no token changes nothing of that."""
        job = record.job
        request_id = job.request_id
        if (
            request_id is not None
            and job.status in (Status.SUBMITTED, Status.RUNNING)
            and self._another_call(job)
        ):
            try:
                state: RequestState | None = self.runcomfy.result(request_id)
            except TransientUpstreamError as exc:
                self._on_transient(exc)  # a 429 pauses every worker's calls all the same
                state = None
            except UpstreamError:
                state = None
            if (
                state is not None
                and state.is_finished
                and state.finished_at is not None
                and state.finished_at <= job.deadline_at
            ):
                self._apply_state(record, request_id, state)
                return
        self._expire(job)

    def _expire(self, job: Job) -> None:
        # Cancelled before the final write (a worker dying after it leaves nothing undone), and
        # after it the request the expired record holds if it is another: a submit answered
        # between this step's read and its write left that run paid for and untracked.
        read_id = self._cancel_left_behind(job)
        now = self.clock()
        message = f"not finished within JOB_DEADLINE_S ({self.settings.job_deadline_s} s)"
        committed = self._commit(
            job.id,
            lambda j: _final_if_live(
                j, Status.EXPIRED, now, JobError("deadline_exceeded", message)
            ),
        )
        if committed is not None and committed.job.request_id != read_id:
            self._cancel_left_behind(committed.job)

    def _cancel_left_behind(self, ended: Job) -> str | None:
        """`ended` is ended here while RunComfy may still queue or run its request: cancel it.
        Returns the request id cancelled, if any."""
        upstream = ended.upstream
        if ended.request_id and not (upstream and upstream.status in FINISHED_STATUSES):
            self._best_effort_cancel(ended.request_id)
            return ended.request_id
        return None

    def _best_effort_cancel(self, request_id: str) -> None:
        try:
            self.counters.add("upstream_cancels")
            self.runcomfy.cancel(request_id)
        except UpstreamError as exc:
            log.info(
                "cancel on the way out failed",
                extra={"upstream_request_id": request_id, "error": exc.message},
            )

    # --- commits ----------------------------------------------------------------------------

    def _fail(self, job_id: str, code: str, message: str) -> Committed | None:
        now = self.clock()
        return self._commit(
            job_id, lambda j: _final_if_live(j, Status.FAILED, now, JobError(code, message))
        )

    def _commit(
        self, job_id: str, step: Callable[[Job], Step | None], *, seen: Record | None = None
    ) -> Committed | None:
        committed = self.store.change(job_id, step, seen=seen)
        if committed is None:
            return None
        job = committed.job
        if job.status.is_final:
            self.on_slot_freed()
            self.counters.add(f"jobs_finished_{job.status.value}")
            log.info(
                "job finished",
                extra={
                    "job_id": job.id,
                    "client_id": job.client_id,
                    "upstream_request_id": job.request_id,
                    "status": job.status.value,
                    "error_code": job.error.code if job.error else None,
                },
            )
        if committed.events:
            self.on_events()
        return committed


def _follows(job: Job, request_id: str | None) -> bool:
    """The job is still live and following `request_id`: what a step learnt of that request
    may change it (not a job ended meanwhile, nor one following another request)."""
    return not job.status.is_final and job.request_id == request_id


def _holds_mark(job: Job, mark: float | None) -> bool:
    """The job is still queued and marked by the submit that set `mark`: what ends that submit
    may change it (not a job submitted meanwhile, nor one marked anew by a later submit)."""
    return job.status is Status.QUEUED and job.submit_started_at == mark


def _next_step_at(job: Job, now: float, look_at: float) -> float:
    """When to take the job's next step, planned for `look_at`: now if a cancel was asked for
    meanwhile and not tried yet (queued, here or at RunComfy, it may still spare a paid run) —
    not once RunComfy has refused one: its retry keeps its backoff — capped at the deadline."""
    if job.cancel_requested and not job.cancel_sent and job.cancel_failures == 0:
        return now
    return min(job.deadline_at, look_at)


def _final_if_live(
    job: Job, status: Status, now: float, error: JobError | None = None
) -> Step | None:
    """Move a live job to a final status; leave a final one alone."""
    if job.status.is_final:
        return None
    return Step(job.moved_to(status, now, error=error, submit_started_at=None), None)


def _retry_in_s(failures: int, exc: TransientUpstreamError) -> float:
    """When to call again after `failures` transient errors in a row, the last one `exc`."""
    return backoff_s(
        failures, retry_after_s=exc.retry_after_s, retry_after_is_when=exc.asks_to_retry_later
    )
