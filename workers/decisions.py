"""What a job's step decides, as plain functions: the job and what RunComfy said in; the changed
job and when its next step is due out (a `Step`), or None when the step no longer applies.

No Redis, no HTTP, no clock here: workers/pipeline.py makes the calls, passes in what they
answered and the time, and commits each `Step` compare-and-set with `store.change` — which calls
the decision again on a fresher record if the job changed meanwhile, so each decides from the job
it is given alone. `rng` is the jitter's source (tests pass a seeded one).
"""

from __future__ import annotations

import random
from enum import Enum

from core import account
from core.jobs import Job, JobError, Status, StoredImage, Upstream
from core.store import Step
from workers.polling import (
    RunEstimate,
    backoff_s,
    estimated_start,
    first_poll_at,
    next_poll_at,
    unknown_status_poll_at,
)
from workers.runcomfy import FINISHED_STATUSES, RequestState, TransientUpstreamError

# Submits of one job that may go without any answer (timed out, cut off, the worker died during
# the call) before it ends failed: each may be a paid run (PRODUCT §7: "submitted once more").
MAX_UNANSWERED_SUBMITS = 1
# Tries of a cancel RunComfy does not take (5xx, 429, no answer) before the run is followed to
# its end without it: a cancel spares a paid run only while it is queued. With the backoff
# between them (0.5-1 s, doubling), 5 tries span 7.5-15 s of an outage.
MAX_CANCEL_TRIES = 5
INTERRUPTED_SUBMIT = "a submit was interrupted before its answer was stored"
CANCELLED_UPSTREAM = "RunComfy cancelled the request"
PRICE_UNKNOWN = (
    "the list price was unknown when the job ended (none fetched yet and RunComfy's price "
    "route failing): its cost is recorded as 0"
)
ACCOUNT_TROUBLE = {
    account.OUT_OF_BALANCE: "the RunComfy account is out of balance",
    account.TOKEN_REFUSED: "RunComfy refuses the account's token",
}
# Copies of an output that failed are tried again after 1 s, 2 s, 4 s … at most this apart.
OUTPUT_COPY_BACKOFF_MAX_S = 30.0
# A job whose submit RunComfy refused for the account comes back after the probe interval
# (plus up to this), when it may be the one to try again.
PROBE_JITTER_S = 2.0


class Move(Enum):
    """The kind of step a job's record calls for."""

    EXPIRE = "expire"  # past its deadline: a last look if a token is free, then expired
    LEAVE_TO_SUBMITTER = "leave to submitter"  # another worker's submit is out; its commit decides
    SETTLE_INTERRUPTED_SUBMIT = "settle interrupted submit"  # a submit's lease ran out unanswered
    CANCEL_HERE = "cancel here"  # queued here, cancel asked for: nothing to tell RunComfy
    SUBMIT = "submit"  # needs a slot (admission) and a token (rate cap)
    CANCEL_UPSTREAM = "cancel upstream"  # needs a token
    LOOK = "look"  # needs a token


def next_move(job: Job, now: float, *, step_lease_s: float) -> Move:
    """The step a live job's record calls for at `now`."""
    if now >= job.deadline_at:
        return Move.EXPIRE
    if job.status is Status.QUEUED:
        if job.submit_started_at is not None:
            if now - job.submit_started_at < step_lease_s:
                return Move.LEAVE_TO_SUBMITTER
            return Move.SETTLE_INTERRUPTED_SUBMIT
        return Move.CANCEL_HERE if job.cancel_requested else Move.SUBMIT
    if job.cancel_requested and not job.cancel_sent:
        return Move.CANCEL_UPSTREAM
    return Move.LOOK


# --- guards and timing --------------------------------------------------------------------------


def follows(job: Job, request_id: str | None) -> bool:
    """The job is still live and following `request_id`: what a step learnt of that request
    may change it (not a job ended meanwhile, nor one following another request)."""
    return not job.status.is_final and job.request_id == request_id


def holds_mark(job: Job, mark: float | None) -> bool:
    """The job is still queued and marked by the submit that set `mark`: what ends that submit
    may change it (not a job submitted meanwhile, nor one marked anew by a later submit)."""
    return job.status is Status.QUEUED and job.submit_started_at == mark


def step_due_at(job: Job, now: float, look_at: float) -> float:
    """When to take the job's next step, planned for `look_at`: now if a cancel was asked for
    meanwhile and not tried yet (queued, here or at RunComfy, it may still spare a paid run) —
    not once RunComfy has refused one: its retry keeps its backoff — capped at the deadline."""
    if job.cancel_requested and not job.cancel_sent and job.cancel_failures == 0:
        return now
    return min(job.deadline_at, look_at)


def retry_in_s(
    failures: int, error: TransientUpstreamError, rng: random.Random | None = None
) -> float:
    """When to call again after `failures` transient errors in a row, the last one `error`."""
    return backoff_s(
        failures,
        retry_after_s=error.retry_after_s,
        retry_after_is_when=error.asks_to_retry_later,
        rng=rng,
    )


# --- cost ---------------------------------------------------------------------------------------


def costed(
    job: Job,
    now: float,
    *,
    upstream_usd: float | None = None,
    images: int = 0,
    list_price_usd: float | None = None,
) -> Job:
    """`job` (ending now) with its cost: RunComfy's own figure when it gave one; else the list
    price times the `images` it is charged for — 0 for none (never ran, cancelled while queued,
    a failed run: no output). With the price unknown, the cost is recorded as 0 and the job
    says so in a note: a final result is never held back for the price."""
    if upstream_usd is not None:
        return job.with_cost(upstream_usd, "upstream")
    if images == 0:
        return job.with_cost(0.0, "list_price")
    if list_price_usd is None:
        return job.with_note(now, PRICE_UNKNOWN).with_cost(0.0, "list_price")
    return job.with_cost(list_price_usd * images, "list_price")


# --- ends ---------------------------------------------------------------------------------------


def end_if_live(
    job: Job,
    status: Status,
    now: float,
    error: JobError | None = None,
    *,
    runs_charged: int = 0,
    list_price_usd: float | None = None,
) -> Step | None:
    """Move a live job to a final status; leave a final one alone. `runs_charged`: runs it
    may have been billed for at RunComfy (one image each, at the list price)."""
    if job.status.is_final:
        return None
    ended = job.moved_to(status, now, error=error, submit_started_at=None)
    return Step(costed(ended, now, images=runs_charged, list_price_usd=list_price_usd), None)


def expire(
    job: Job,
    now: float,
    *,
    deadline_s: float,
    cancelled_request: str | None = None,
    list_price_usd: float | None = None,
) -> Step | None:
    """The job's deadline has passed: it ends expired (a final one is left alone). Its cost is
    0 if RunComfy never had it or cancelled it (`cancelled_request`, the request whose cancel
    was taken); else its run went on and was billed: the list price of one image."""
    message = f"not finished within JOB_DEADLINE_S ({deadline_s} s)"
    billed = job.request_id is not None and job.request_id != cancelled_request
    return end_if_live(
        job,
        Status.EXPIRED,
        now,
        JobError("deadline_exceeded", message),
        runs_charged=1 if billed else 0,
        list_price_usd=list_price_usd,
    )


def finished_by_deadline(job: Job, state: RequestState) -> bool:
    """A last look at the deadline saw a run RunComfy ended by then: the job ends as it did."""
    return (
        state.is_finished and state.finished_at is not None and state.finished_at <= job.deadline_at
    )


def request_left_running(ended: Job) -> str | None:
    """The request RunComfy may still queue or run for the job `ended` here (to cancel), if any."""
    upstream = ended.upstream
    if ended.request_id and not (upstream and upstream.status in FINISHED_STATUSES):
        return ended.request_id
    return None


# --- submit -------------------------------------------------------------------------------------


def mark_submitting(
    job: Job, now: float, *, lease_s: float, notes: tuple[str, ...] = ()
) -> Step | None:
    """Mark a queued job as being submitted from `now`; it is due again when the lease ends
    (a worker that finds the mark then knows the submit was interrupted). `notes`: what its
    payload's building found worth recording (each once)."""
    if not may_submit(job):
        return None
    noted = with_notes_once(job, now, notes)
    marked = noted.changed(now, submit_started_at=now, submit_attempts=job.submit_attempts + 1)
    return Step(marked, now + lease_s)


def may_submit(job: Job) -> bool:
    """Queued, no submit out, no cancel asked for: a submit may be made."""
    return (
        job.status is Status.QUEUED and job.submit_started_at is None and not job.cancel_requested
    )


def with_notes_once(job: Job, now: float, notes: tuple[str, ...]) -> Job:
    """`job` with each of `notes` it does not carry yet (a resubmit builds the payload again)."""
    for text in notes:
        if not any(kept.endswith(f" {text}") for kept in job.notes):
            job = job.with_note(now, text)
    return job


def refuse_inputs(
    job: Job, *, error: JobError, now: float, list_price_usd: float | None = None
) -> Step | None:
    """The job's pictures cannot go upstream (preflight, fetch): it fails before its submit, if
    no submit is out or made meanwhile. It costs nothing — but for a resubmit's job, whose
    earlier submit RunComfy may have taken: one run at the list price, as when that ends it."""
    if not may_submit(job):
        return None
    charged = 1 if job.submit_unknown_outcomes else 0
    return end_if_live(
        job, Status.FAILED, now, error, runs_charged=charged, list_price_usd=list_price_usd
    )


def record_request(
    job: Job,
    *,
    mark: float | None,
    request_id: str,
    accepted_at: float,
    expected_run: RunEstimate | None,
) -> Step | None:
    """RunComfy accepted the submit that set `mark`: the job is submitted, first look planned."""
    if not holds_mark(job, mark):
        return None
    moved = job.moved_to(
        Status.SUBMITTED,
        accepted_at,
        upstream=Upstream(request_id=request_id, status="in_queue"),
        submit_started_at=None,
        submitted_at=accepted_at,
        polls=0,
        transient_errors=0,
        account_waits=0,
        last_seen_queued_at=accepted_at,
    )
    first_look_at = first_poll_at(accepted_at, expected_run)
    return Step(moved, step_due_at(job, accepted_at, first_look_at))


def fail_submit(
    job: Job,
    *,
    mark: float | None,
    error: JobError,
    now: float,
    runs_charged: int = 0,
    list_price_usd: float | None = None,
) -> Step | None:
    """The submit that set `mark` failed for good: so does the job, if it still holds that mark
    (a stale step must not fail a job submitted meanwhile). `runs_charged`: 1 when RunComfy
    most likely runs it all the same (billed, untracked); a refused submit costs nothing."""
    if not holds_mark(job, mark):
        return None
    return end_if_live(
        job, Status.FAILED, now, error, runs_charged=runs_charged, list_price_usd=list_price_usd
    )


def wait_for_account(
    job: Job,
    *,
    mark: float | None,
    now: float,
    kind: str,
    rng: random.Random | None = None,
) -> Step | None:
    """RunComfy refuses submits for the account (`kind`): the job stays queued, its mark (if
    its own submit was refused: `mark`) cleared — nothing was queued or paid — and comes back
    when it may be the one to try again (after the probe interval), or, if it did not call,
    within account.RECHECK_S. Never failed for it; its deadline still ends it."""
    if mark is not None:
        if not holds_mark(job, mark):
            return None
    elif job.status is not Status.QUEUED or job.submit_started_at is not None:
        return None
    draw = (rng or random).random()
    if mark is not None:
        back_in_s = account.PROBE_INTERVAL_S + PROBE_JITTER_S * draw
    else:
        back_in_s = account.WAIT_MIN_S + (account.RECHECK_S - account.WAIT_MIN_S) * draw
    waiting = job if job.account_waits else job.with_note(now, _account_note(kind, "submit"))
    changed = waiting.changed(now, submit_started_at=None, account_waits=job.account_waits + 1)
    return Step(changed, step_due_at(job, now, now + back_in_s))


def follow_through_account_trouble(
    job: Job, *, request_id: str, now: float, kind: str, rng: random.Random | None = None
) -> Step | None:
    """RunComfy refused a look or a cancel for the account (`kind`): the job keeps following
    its request — it may be running, paid for — and asks again within account.RECHECK_S
    (a cancel not taken stays to be sent)."""
    if not follows(job, request_id):
        return None
    draw = (rng or random).random()
    back_in_s = account.WAIT_MIN_S + (account.RECHECK_S - account.WAIT_MIN_S) * draw
    waiting = job if job.account_waits else job.with_note(now, _account_note(kind, "look"))
    changed = waiting.changed(now, account_waits=job.account_waits + 1)
    return Step(changed, min(job.deadline_at, now + back_in_s))


def _account_note(kind: str, call: str) -> str:
    trouble = ACCOUNT_TROUBLE.get(kind, kind)
    return f"RunComfy refused the {call}: {trouble}; waiting for the account, not failing the job"


def retry_submit_later(
    job: Job,
    *,
    mark: float | None,
    now: float,
    error: TransientUpstreamError,
    rng: random.Random | None = None,
) -> Step | None:
    """The submit that set `mark` was certainly not accepted: clear the mark (if the job still
    holds it: not a newer submit's) and submit again after the backoff."""
    if not holds_mark(job, mark):
        return None
    failures = job.transient_errors + 1
    changed = job.changed(
        now, submit_started_at=None, transient_errors=failures, last_transient_error=error.message
    )
    return Step(changed, step_due_at(job, now, now + retry_in_s(failures, error, rng)))


def settle_unknown_submit(
    job: Job,
    *,
    mark: float | None,
    now: float,
    reason: str,
    answered: bool,
    rule: str,
    retry_after_s: float | None = None,
    list_price_usd: float | None = None,
    rng: random.Random | None = None,
) -> Step | None:
    """Whether RunComfy accepted the submit that set `mark` is unknown: apply SUBMIT_UNKNOWN
    (`rule`), if the job still holds that mark. A job failed so is charged one run at the list
    price: RunComfy may well be running it.

    `answered`: RunComfy answered, with a 5xx. Otherwise no answer came at all (timed out, cut
    off, or the worker died during the call), and RunComfy may well be running the job: such a
    job is submitted once more, and ends failed if that one goes unanswered too — when RunComfy
    is slow to answer submits, each resubmit would be one more paid run, up to the deadline. A
    5xx outage is retried until the deadline (most such answers accept nothing). A resubmit
    waits at least `retry_after_s`, the 5xx's Retry-After.
    """
    if not holds_mark(job, mark):
        return None  # stored meanwhile (request id), ended, or marked anew
    unanswered = job.submits_unanswered + (0 if answered else 1)
    if rule == "fail":
        why = f"whether RunComfy accepted the job is unknown ({reason}); not submitting it again"
    elif unanswered > MAX_UNANSWERED_SUBMITS:
        why = (
            f"RunComfy answered none of {unanswered} submits of the job ({reason}); "
            "not submitting it again: it may already be running"
        )
    else:
        return _resubmit(job, now, reason, unanswered, retry_after_s, rng)
    counted = job.changed(
        now, submit_unknown_outcomes=job.submit_unknown_outcomes + 1, submits_unanswered=unanswered
    )
    error = JobError("submit_outcome_unknown", why)
    return end_if_live(
        counted, Status.FAILED, now, error, runs_charged=1, list_price_usd=list_price_usd
    )


def _resubmit(
    job: Job,
    now: float,
    reason: str,
    unanswered: int,
    retry_after_s: float | None,
    rng: random.Random | None,
) -> Step:
    """A submit whose outcome is unknown is made again, after the backoff."""
    noted = job.with_note(now, f"submit outcome unknown ({reason}); submitting again")
    changed = noted.changed(
        now,
        submit_started_at=None,
        submit_unknown_outcomes=job.submit_unknown_outcomes + 1,
        submits_unanswered=unanswered,
        transient_errors=job.transient_errors + 1,
    )
    wait_s = backoff_s(job.transient_errors + 1, retry_after_s=retry_after_s, rng=rng)
    return Step(changed, step_due_at(job, now, now + wait_s))


# --- look ---------------------------------------------------------------------------------------


def note_seen_finished(job: Job, *, request_id: str, status: str, now: float) -> Step | None:
    """/status says the run is over and no token is free for /result now: note what was seen
    (the next step asks /result) and make that step due at once."""
    if not follows(job, request_id):
        return None
    upstream = Upstream(request_id, status, None)
    return Step(job.changed(now, upstream=upstream, polls=job.polls + 1), now)


def apply_look(
    job: Job,
    *,
    request_id: str,
    state: RequestState,
    now: float,
    expected_run: RunEstimate | None,
    list_price_usd: float | None = None,
    rng: random.Random | None = None,
    stored_media: tuple[StoredImage, ...] | None = None,
) -> Step | None:
    """What one look at the job's request (`state`) changes: an end, queued, running, or a
    status word not known — followed on, never a failure, until a known end or the deadline.

    An end costs what RunComfy says it cost; without that, the list price times the images
    (none for a failed run, which has no output, or a cancelled one: 0). A success keeps
    `stored_media`, the output's copies in the media store (None: not stored)."""
    if not follows(job, request_id):
        return None
    upstream = Upstream(request_id, state.status, state.queue_position)
    polls = job.polls + 1
    if state.images is not None:
        moved = job.moved_to(
            Status.SUCCEEDED,
            now,
            upstream=upstream,
            output_images=state.images,
            output_media=stored_media,
            polls=polls,
        )
        images = len(state.images)
    elif state.error is not None:
        failure = JobError("upstream_failed", state.error)
        moved = job.moved_to(Status.FAILED, now, upstream=upstream, error=failure, polls=polls)
        images = 0
    elif state.is_finished:  # cancelled upstream: the caller's cancel, or RunComfy's own
        why = None if job.cancel_requested else JobError("upstream_cancelled", CANCELLED_UPSTREAM)
        moved = job.moved_to(Status.CANCELLED, now, upstream=upstream, error=why, polls=polls)
        images = 0
    else:
        return _still_going(job, upstream, polls, state, now, expected_run, rng)
    ended = costed(
        moved, now, upstream_usd=state.cost_usd, images=images, list_price_usd=list_price_usd
    )
    return Step(ended, None)


def output_copy_retry_in_s(failures: int) -> float:
    """When to try copying the output again after `failures` failed copies in a row."""
    return min(OUTPUT_COPY_BACKOFF_MAX_S, 2.0 ** (failures - 1))


def settle_output_copy_failure(
    job: Job,
    *,
    request_id: str,
    state: RequestState,
    now: float,
    reason: str,
    will_not_improve: bool,
    copy_deadline_s: float,
    expected_run: RunEstimate | None,
    list_price_usd: float | None = None,
) -> Step | None:
    """A look saw the run succeed but its output could not be copied (`reason`): the job stays
    running and looks again soon, backing off — until OUTPUT_COPY_DEADLINE_S has passed since
    the first failure, the retry would come at or past the job's deadline (a result must never
    be lost to `expired`), or the failure cannot improve (a host refused). Then it succeeds all
    the same, not stored: RunComfy's URLs and a note."""
    if not follows(job, request_id):
        return None
    failures = job.output_copy_failures + 1
    since = now if job.output_copy_failing_since is None else job.output_copy_failing_since
    retry_at = now + output_copy_retry_in_s(failures)
    counted = {"output_copy_failures": failures, "output_copy_failing_since": since}
    if will_not_improve or now - since >= copy_deadline_s or retry_at >= job.deadline_at:
        gave_up = job.with_note(
            now,
            f"the output was not stored ({reason}); the job shows RunComfy's URLs, which "
            "RunComfy deletes after about 7 days",
        ).changed(now, **counted)
        return apply_look(
            gave_up,
            request_id=request_id,
            state=state,
            now=now,
            expected_run=expected_run,
            list_price_usd=list_price_usd,
        )
    noted = job
    if job.output_copy_failures == 0:
        noted = job.with_note(
            now,
            f"the run succeeded but copying its output failed ({reason}); trying again until "
            "OUTPUT_COPY_DEADLINE_S",
        )
    seen = {
        "upstream": Upstream(request_id, state.status, state.queue_position),
        "polls": job.polls + 1,
        "transient_errors": 0,
        "unknown_status_looks": 0,
        "account_waits": 0,
        "last_transient_error": reason,
        **counted,
    }
    if job.status is Status.SUBMITTED:
        held = noted.moved_to(Status.RUNNING, now, running_since=job.running_since or now, **seen)
    else:
        held = noted.changed(now, **seen)
    return Step(held, step_due_at(job, now, retry_at))


def _still_going(
    job: Job,
    upstream: Upstream,
    polls: int,
    state: RequestState,
    now: float,
    expected_run: RunEstimate | None,
    rng: random.Random | None,
) -> Step:
    """A look saw the request queued, running, or in a status word not known."""
    if state.is_queued:
        next_at = next_poll_at(now=now, running=False, queue_position=state.queue_position)
        changed = job.changed(
            now,
            upstream=upstream,
            polls=polls,
            transient_errors=0,
            unknown_status_looks=0,
            account_waits=0,
            last_seen_queued_at=now,
        )
        return Step(changed, step_due_at(job, now, next_at))
    if state.is_running:
        return _seen_running(job, upstream, polls, now, expected_run)
    return _seen_unknown_word(job, upstream, polls, now, rng)


def _seen_running(
    job: Job, upstream: Upstream, polls: int, now: float, expected_run: RunEstimate | None
) -> Step:
    """The run is going: running from its estimated start, looked at when it should be done."""
    started = job.running_since or estimated_start(
        last_seen_queued_at=job.last_seen_queued_at or now,
        first_seen_running_at=now,
        seen_queued=job.polls > 0,
    )
    next_at = next_poll_at(now=now, running=True, running_since=started, expected_run=expected_run)
    seen = {
        "upstream": upstream,
        "polls": polls,
        "transient_errors": 0,
        "unknown_status_looks": 0,
        "account_waits": 0,
    }
    if job.status is Status.SUBMITTED:
        changed = job.moved_to(Status.RUNNING, now, running_since=started, **seen)
    else:
        changed = job.changed(now, **seen)
    return Step(changed, step_due_at(job, now, next_at))


def _seen_unknown_word(
    job: Job, upstream: Upstream, polls: int, now: float, rng: random.Random | None
) -> Step:
    """A status word not known: the job stays where it is and looks again, backing off with
    each such look in a row (a vocabulary change at RunComfy must not fail every job)."""
    looks = job.unknown_status_looks + 1
    seen = job
    if looks == 1:
        seen = job.with_note(
            now, f"RunComfy answered a status not known, {upstream.status!r}; following it on"
        )
    changed = seen.changed(
        now,
        upstream=upstream,
        polls=polls,
        transient_errors=0,
        unknown_status_looks=looks,
        account_waits=0,
    )
    return Step(changed, step_due_at(job, now, unknown_status_poll_at(now, looks, rng=rng)))


def retry_look_later(
    job: Job, *, now: float, error: TransientUpstreamError, rng: random.Random | None = None
) -> Step | None:
    """A look failed in a way worth retrying: look again after the backoff."""
    if job.status.is_final:
        return None
    failures = job.transient_errors + 1
    changed = job.changed(
        now, transient_errors=failures, last_transient_error=error.message, polls=job.polls + 1
    )
    return Step(changed, step_due_at(job, now, now + retry_in_s(failures, error, rng)))


def observed_run_s(before: Job, after: Job, state: RequestState, now: float) -> float | None:
    """How long the run that just succeeded took (to teach RunTimes), or None if not known.

    From when it was seen to start; or — if it was done at the first look — RunComfy's own
    created/finished times (queue + run: an upper bound, on one clock). Without RunComfy's
    finished_at, the run ended between the last look (when it was still running) and this one:
    the middle is taken. That last look is known only if it saw the run going — not if it
    failed, saw a status word not known, saw the run over, or a cancel came since. (This look's
    own time would only ever grow the estimate: it comes when a run is expected to be done.)
    """
    if after.running_since is None:
        if after.polls == 1 and state.created_at is not None and state.finished_at is not None:
            return state.finished_at - state.created_at
        return None
    finished = state.finished_at
    if finished is not None and after.running_since < finished <= now + 1:
        return finished - after.running_since
    seen_over = before.upstream is not None and before.upstream.status in FINISHED_STATUSES
    last_look_saw_it_going = (
        before.transient_errors == 0
        and before.unknown_status_looks == 0
        and not before.cancel_requested
        and not seen_over
    )
    if not last_look_saw_it_going:
        return None
    return (max(before.updated_at, after.running_since) + now) / 2 - after.running_since


# --- cancel -------------------------------------------------------------------------------------


def settle_cancel(
    job: Job, *, request_id: str, cancelled: bool, answer: str, now: float
) -> Step | None:
    """RunComfy answered the job's cancel: cancelled, or (`answer`: why not) the run is
    followed to its end, looked at once more now."""
    if not follows(job, request_id):
        return None
    if cancelled:  # while queued at RunComfy: nothing ran, nothing is billed
        upstream = Upstream(request_id, "cancelled", None)
        moved = job.moved_to(Status.CANCELLED, now, upstream=upstream, cancel_sent=True)
        return Step(costed(moved, now), None)
    noted = job.with_note(
        now, f"cancel requested but RunComfy answered {answer}; following the run to its end"
    )
    return Step(noted.changed(now, cancel_sent=True), now)


def count_cancel_not_taken(
    job: Job,
    *,
    request_id: str | None,
    now: float,
    error: TransientUpstreamError,
    rng: random.Random | None = None,
) -> Step | None:
    """RunComfy did not take the cancel (5xx, 429, no answer): tried again after a backoff,
    MAX_CANCEL_TRIES in all; then the run is followed to its end without it (tried again at
    once for ever, the looks that would see the run end never come)."""
    if not follows(job, request_id) or job.cancel_sent:
        return None
    failures = job.cancel_failures + 1
    changed = job.changed(now, cancel_failures=failures, last_transient_error=error.message)
    if failures < MAX_CANCEL_TRIES:
        return Step(changed, min(job.deadline_at, now + retry_in_s(failures, error, rng)))
    gave_up = changed.with_note(
        now,
        f"RunComfy did not take the cancel ({failures} tries, last: {error.message}); "
        "following the run to its end",
    )
    return Step(gave_up.changed(now, cancel_sent=True), now)
