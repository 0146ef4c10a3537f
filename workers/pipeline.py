"""One step of a job's life: submit, look, cancel or expire — the calls and the commits.

`JobPipeline.advance(job_id)` is the only entry point. It reads the record, takes the one step the
record calls for (at most a couple of short HTTP calls), and commits the outcome compare-and-set
together with when the next step is due. What each step decides from what RunComfy said is in
workers/decisions.py; here are the calls to RunComfy, Redis and the metrics around it. Nothing
here waits for RunComfy: the next look is a time in the job schedule, not a sleep. Running a
step twice, or concurrently, changes nothing twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from core.account import TOKEN_REFUSED, AccountState
from core.admission import ADMISSION_RECHECK_S
from core.jobs import Job, JobError, Status, StoredImage
from core.metrics import Counters
from core.pricing import ListPrice
from core.settings import Settings
from core.store import Committed, JobStore, Record, Step
from core.uploads import UploadStore
from workers import decisions
from workers.decisions import (
    MAX_CANCEL_TRIES as MAX_CANCEL_TRIES,
)
from workers.decisions import (
    MAX_UNANSWERED_SUBMITS as MAX_UNANSWERED_SUBMITS,
)
from workers.decisions import Move
from workers.outputs import OutputCopier, OutputCopyFailed
from workers.run_times import RunTimes
from workers.runcomfy import (
    QUEUED_STATUSES,
    AccountRefusedError,
    PermanentUpstreamError,
    RequestState,
    RunComfyClient,
    TransientUpstreamError,
    UnknownRequestError,
    UnusableAnswerError,
    UpstreamError,
)
from workers.throttle import UpstreamThrottle
from workers.upstream_inputs import ImageFetcher, PictureRefused, UpstreamInputs

log = logging.getLogger(__name__)

SUBMIT, PROBE = "submit", "probe"  # how a job may submit (JobPipeline._submit_permit)


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
    uploads: UploadStore  # input pictures held here, and where output copies are kept
    clock: Callable[[], float] = time.time
    # Built on the store's Redis and the RunComfy client unless given.
    account: AccountState | None = None
    list_price: ListPrice | None = None
    # Built on the settings and `uploads` unless given.
    inputs: UpstreamInputs | None = None
    outputs: OutputCopier | None = None

    def __post_init__(self) -> None:
        if self.outputs is None:
            self.outputs = OutputCopier(
                uploads=self.uploads,
                runcomfy_base_url=self.settings.runcomfy_base_url,
                keep_s=self.settings.job_retention_s,
                connections=self.settings.dispatch_batch_size,
            )
        if self.account is None:
            self.account = AccountState(self.store.redis)
        if self.inputs is None:
            fetcher = ImageFetcher(
                allowed_networks=self.settings.input_allowed_networks,
                timeout_s=self.settings.input_fetch_timeout_s,
                connections_per_host=self.settings.dispatch_batch_size,
            )
            self.inputs = UpstreamInputs(
                uploads=self.uploads, fetcher=fetcher, forward=self.settings.input_forward
            )
        if self.list_price is None:
            self.list_price = ListPrice(self.store.redis, fetch=self.runcomfy.list_price_usd)

    def advance(self, job_id: str) -> None:
        """Take the next step the job record calls for."""
        record = self.store.read(job_id)
        if record is None or record.job.status.is_final:
            self.store.job_schedule.remove(self.store.redis, job_id)
            return
        job = record.job
        now = self.clock()
        move = decisions.next_move(job, now, step_lease_s=self.settings.step_lease_s)
        if move is Move.EXPIRE:
            self._last_look_then_expire(record)
        elif move is Move.SETTLE_INTERRUPTED_SUBMIT:
            self._submit_outcome_unknown(job, decisions.INTERRUPTED_SUBMIT, answered=False)
        elif move is Move.CANCEL_HERE:
            self._commit(job.id, partial(decisions.end_if_live, status=Status.CANCELLED, now=now))
        elif move is Move.SUBMIT:
            if not self.store.admission.holds_slot(job.id):
                self._wait_for_slot(job, now)
            else:
                permit = self._submit_permit(job, now)
                if permit is not None and self._may_call_upstream(job, now):
                    self._submit(record, probing=permit == PROBE)
        elif move is not Move.LEAVE_TO_SUBMITTER and self._may_call_upstream(job, now):
            if move is Move.CANCEL_UPSTREAM:
                self._cancel_upstream(record)
            else:
                self._look(record)

    def _on_transient(self, exc: TransientUpstreamError) -> None:
        """Count it; a 429 pauses every worker's calls (global cool-down)."""
        self.counters.add("upstream_transient_errors")
        if exc.http_status == 429:
            self.throttle.cool_down(exc.retry_after_s)

    # --- the account's own trouble -----------------------------------------------------------

    def _submit_permit(self, job: Job, now: float) -> str | None:
        """SUBMIT, or PROBE while RunComfy refuses the account — the one submit per
        account.PROBE_INTERVAL_S that tries whether that is over — or None: the job waits for
        the account (queued, never failed)."""
        assert self.account is not None
        trouble = self.account.current()
        if trouble is None:
            return SUBMIT
        if self.account.take_probe():
            log.info("probing whether the account's trouble is over", extra={"job_id": job.id})
            return PROBE
        waiting = partial(decisions.wait_for_account, mark=None, now=now, kind=trouble.kind)
        if self._commit(job.id, waiting) is not None:
            self.account.note_waiting(job.id, now)
        return None

    def _on_account_refused(self, job: Job, exc: AccountRefusedError) -> None:
        """Report the refusal where every replica sees it; count it."""
        assert self.account is not None
        self.counters.add(f"account_refusals_{exc.kind}")
        if self.account.report(exc.kind, exc.message, self.clock()):
            log.error(
                "RunComfy refuses the account; queued jobs wait for it",
                extra={"job_id": job.id, "kind": exc.kind, "error": exc.message},
            )

    def _account_fine_again(self, kind: str | None = None) -> None:
        """RunComfy took a call again: clear the trouble (of `kind`, if given) and make the
        jobs that waited on it due now."""
        assert self.account is not None
        if not self.account.clear(kind):
            return
        log.warning("RunComfy takes the account's calls again")
        now = self.clock()
        for job_id in self.account.take_waiting():
            self.store.job_schedule.postpone(job_id, now)
        self.on_slot_freed()  # wakes the job dispatch, as for a freed slot

    def _list_price(self) -> float | None:
        assert self.list_price is not None
        return self.list_price.usd_per_image()

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

    def _another_call(self, job: Job) -> bool:
        """A further RunComfy call in this step, beside the one its token was taken for: only
        if the rate cap has a token free for it (no place in line taken); counted as a poll."""
        if not self.throttle.acquire_if_free(job.id):
            return False
        self.counters.add("upstream_polls")
        return True

    # --- submit -----------------------------------------------------------------------------

    def _submit(self, record: Record, *, probing: bool = False) -> None:
        """Mark the job, submit it, and store the request id RunComfy answers with. `probing`:
        the account was in trouble; an accepted submit shows it is over.

        The payload is built first (pictures fetched or loaded, preflighted): a job whose
        pictures cannot go upstream fails here, never marked as submitting, never sent."""
        job = record.job
        assert self.inputs is not None
        try:
            payload = self.inputs.payload_for(job)
        except PictureRefused as exc:
            self._refuse_inputs(record, exc)
            return
        now = self.clock()
        marking = partial(
            decisions.mark_submitting,
            now=now,
            lease_s=self.settings.step_lease_s,
            notes=payload.notes,
        )
        marked = self._commit(job.id, marking, seen=record)
        if marked is None:
            return
        self.counters.add("upstream_submits")
        try:
            request_id = self.runcomfy.submit(payload.body).request_id
        except UpstreamError as exc:
            self._submit_refused(marked.job, exc)
            return
        if probing:
            self._account_fine_again()
        recording = partial(
            decisions.record_request,
            mark=now,
            request_id=request_id,
            accepted_at=self.clock(),
            expected_run=self.run_times.estimate(job.input),
        )
        ids = {"job_id": job.id, "client_id": job.client_id, "upstream_request_id": request_id}
        if self._commit(job.id, recording, seen=marked.record) is None:
            # The job ended meanwhile (expired or deleted): don't leave a paid run behind.
            log.warning(
                "job ended while its submit was answered; cancelling its request", extra=ids
            )
            self._best_effort_cancel(request_id)
        else:
            log.info("submitted", extra=ids)

    def _refuse_inputs(self, record: Record, exc: PictureRefused) -> None:
        """The job's pictures cannot go upstream: it fails, nothing submitted."""
        job = record.job
        self.counters.add(f"input_refused_{exc.code}")
        log.warning(
            "job's input pictures refused before its submit",
            extra={
                "job_id": job.id,
                "client_id": job.client_id,
                "error_code": exc.code,
                "error": exc.message,
            },
        )
        refusing = partial(
            decisions.refuse_inputs,
            error=JobError(exc.code, exc.message),
            now=self.clock(),
            list_price_usd=self._list_price() if job.submit_unknown_outcomes else None,
        )
        self._commit(job.id, refusing, seen=record)

    def _submit_refused(self, marked: Job, exc: UpstreamError) -> None:
        """The submit `marked` (the job as marked for it) made got no usable answer."""
        if isinstance(exc, AccountRefusedError):  # nothing queued or paid: wait, do not fail
            self._on_account_refused(marked, exc)
            waiting = partial(
                decisions.wait_for_account,
                mark=marked.submit_started_at,
                now=self.clock(),
                kind=exc.kind,
            )
            if self._commit(marked.id, waiting) is not None:
                assert self.account is not None
                self.account.note_waiting(marked.id, self.clock())
            return
        if isinstance(exc, TransientUpstreamError):
            self._on_transient(exc)
            if exc.maybe_processed:
                self._submit_outcome_unknown(
                    marked,
                    exc.message,
                    answered=not exc.went_unanswered,
                    retry_after_s=exc.retry_after_s,
                )
                return
            retrying = partial(
                decisions.retry_submit_later,
                mark=marked.submit_started_at,
                now=self.clock(),
                error=exc,
            )
            self._commit(marked.id, retrying)
            return
        runs_charged, price = 0, None
        if isinstance(exc, UnusableAnswerError):  # accepted, most likely, but not to be followed
            self.counters.add("submit_outcome_unknown")
            error = JobError(
                "upstream_bad_response",
                f"RunComfy's answer to the submit cannot be used ({exc.message}); it may be "
                "running the job, untracked; not submitting it again",
            )
            runs_charged, price = 1, self._list_price()
        else:
            error = JobError("upstream_rejected", f"RunComfy refused the job: {exc.message}")
        failing = partial(
            decisions.fail_submit,
            mark=marked.submit_started_at,
            error=error,
            now=self.clock(),
            runs_charged=runs_charged,
            list_price_usd=price,
        )
        self._commit(marked.id, failing)

    def _submit_outcome_unknown(
        self, job: Job, reason: str, *, answered: bool, retry_after_s: float | None = None
    ) -> None:
        """RunComfy may or may not have accepted the submit that `job` (as it was marked) made:
        SUBMIT_UNKNOWN decides (see decisions.settle_unknown_submit)."""
        self.counters.add("submit_outcome_unknown")
        rule = self.settings.submit_unknown
        log.warning(
            "submit outcome unknown",
            extra={"job_id": job.id, "client_id": job.client_id, "reason": reason, "rule": rule},
        )
        settling = partial(
            decisions.settle_unknown_submit,
            mark=job.submit_started_at,
            now=self.clock(),
            reason=reason,
            answered=answered,
            rule=rule,
            retry_after_s=retry_after_s,
            list_price_usd=self._list_price(),
        )
        self._commit(job.id, settling)

    # --- look -------------------------------------------------------------------------------

    def _look(self, record: Record) -> None:
        """Ask RunComfy where the job's request is, and commit what that changes."""
        job = record.job
        request_id = job.request_id
        assert request_id is not None
        try:
            state, output_pending = self._ask(job, request_id)
        except TransientUpstreamError as exc:
            self._on_transient(exc)
            self._commit(job.id, partial(decisions.retry_look_later, now=self.clock(), error=exc))
            return
        except AccountRefusedError as exc:
            self._follow_through_account_trouble(job, request_id, exc)
            return
        # The request reached RunComfy and may have run: charged one run at the list price.
        except UnknownRequestError as exc:
            message = f"RunComfy no longer knows the request: {exc.message}"
            self._fail(job.id, "upstream_request_lost", message, runs_charged=1)
            return
        except PermanentUpstreamError as exc:
            message = f"RunComfy gave an answer we cannot use: {exc.message}"
            failed = self._fail(job.id, "upstream_bad_response", message, runs_charged=1)
            if failed is not None:  # no longer followed: not left running, paid for
                self._cancel_left_behind(failed.job)
            return
        if job.account_waits:  # looks were refused for the account: the token is taken again
            self._account_fine_again(TOKEN_REFUSED)
        if output_pending:  # over, by /status: the next step, due now, fetches the output
            seeing = partial(decisions.note_seen_finished, request_id=request_id)
            self._commit(job.id, partial(seeing, status=state.status, now=self.clock()))
            return
        if not state.is_known:
            self.counters.add_labelled("upstream_unknown_statuses", state.status)
            if job.unknown_status_looks == 0:
                ids = {"job_id": job.id, "upstream_request_id": request_id}
                log.warning("RunComfy answered a status not known; following it on", extra=ids)
        self._apply_state(record, request_id, state)

    def _follow_through_account_trouble(
        self, job: Job, request_id: str, exc: AccountRefusedError
    ) -> None:
        """A look or cancel refused for the account: keep following the request (it may be
        running, paid for), asked again within account.RECHECK_S."""
        self._on_account_refused(job, exc)
        following = partial(
            decisions.follow_through_account_trouble,
            request_id=request_id,
            now=self.clock(),
            kind=exc.kind,
        )
        if self._commit(job.id, following) is not None:
            assert self.account is not None
            self.account.note_waiting(job.id, self.clock())

    def _ask(self, job: Job, request_id: str) -> tuple[RequestState, bool]:
        """One look's calls: what RunComfy says of the request, and whether /status says the
        run is over while the rate cap has no token for /result now (the output is pending).

        /result answers in one call both "not done yet" and the final output; /status adds the
        queue position, which decides how soon to look again while queued. The first look asks
        /result (a fast run may well be done by then); a queued one, /status. A second call in
        the look takes a token of its own (the rate cap counts calls, not looks), only if one is
        free: the position can wait; the output, a next step.
        """
        self.counters.add("upstream_polls")
        queued = job.upstream is None or job.upstream.status in (None, *QUEUED_STATUSES)
        ask_status = queued and job.polls > 0
        state = self.runcomfy.status(request_id) if ask_status else self.runcomfy.result(request_id)
        if state.is_queued and not ask_status and self._another_call(job):
            ask_status, state = True, self.runcomfy.status(request_id)
        if state.is_finished and ask_status:  # /status never carries the output
            if not self._another_call(job):
                return state, True
            state = self.runcomfy.result(request_id)
        return state, False

    def _apply_state(self, record: Record, request_id: str, state: RequestState) -> None:
        """Commit what a look saw — a success only once its output is copied into the media
        store (or the copy is given up: decisions.settle_output_copy_failure); teach RunTimes
        what a finished run took."""
        job = record.job
        stored, failure = self._copy_outputs(job, request_id, state)
        now = self.clock()
        expected_run = self.run_times.estimate(job.input)
        # Only a success RunComfy gave no cost for is charged at the list price.
        needs_price = state.images is not None and state.cost_usd is None
        list_price_usd = self._list_price() if needs_price else None
        applying: Callable[[Job], Step | None]
        if failure is not None:
            applying = partial(
                decisions.settle_output_copy_failure,
                request_id=request_id,
                state=state,
                now=now,
                reason=str(failure),
                will_not_improve=failure.will_not_improve,
                copy_deadline_s=self.settings.output_copy_deadline_s,
                expected_run=expected_run,
                list_price_usd=list_price_usd,
            )
        else:
            applying = partial(
                decisions.apply_look,
                request_id=request_id,
                state=state,
                now=now,
                expected_run=expected_run,
                list_price_usd=list_price_usd,
                stored_media=stored,
            )
        committed = self._commit(job.id, applying, seen=record)
        if committed is None:
            return
        after = committed.job
        if after.status is Status.SUCCEEDED:
            # Held back by failed copies at earlier looks, this look says nothing of when the
            # run ended (one given up at once, as for a refused host, is as any other success).
            run_s = (
                None
                if job.output_copy_failures
                else decisions.observed_run_s(job, after, state, now)
            )
            if run_s is not None:
                self.run_times.learn(after.input, run_s)
        elif (
            expected_run is None
            and job.status is Status.SUBMITTED
            and after.status is Status.RUNNING
            and after.running_since is not None
        ):  # seen running, nothing learned: the shape's first learned run re-plans it
            self.run_times.wait_for_first(after.input, after.id, after.running_since)

    def _copy_outputs(
        self, job: Job, request_id: str, state: RequestState
    ) -> tuple[tuple[StoredImage, ...] | None, OutputCopyFailed | None]:
        """The output's copies in the media store, or why they could not be made; (None, None)
        when the look saw no output (or the job no longer follows the request)."""
        if state.images is None or not decisions.follows(job, request_id):
            return None, None
        assert self.outputs is not None
        try:
            stored = self.outputs.copy_all(job.client_id, state.images, self.clock())
        except OutputCopyFailed as exc:
            self.counters.add("output_copy_failures")
            log.warning(
                "copying a finished run's output failed",
                extra={
                    "job_id": job.id,
                    "client_id": job.client_id,
                    "upstream_request_id": request_id,
                    "error": str(exc),
                },
            )
            return None, exc
        self.counters.add("outputs_stored", len(stored))
        return stored, None

    # --- cancel and deadline ----------------------------------------------------------------

    def _cancel_upstream(self, record: Record) -> None:
        """Ask RunComfy to cancel the job's request; commit what it answered."""
        job = record.job
        request_id = job.request_id
        assert request_id is not None
        try:
            self.counters.add("upstream_cancels")
            outcome = self.runcomfy.cancel(request_id)
        except TransientUpstreamError as exc:
            self._on_transient(exc)
            counting = partial(
                decisions.count_cancel_not_taken,
                request_id=request_id,
                now=self.clock(),
                error=exc,
            )
            self._commit(job.id, counting)
            return
        except AccountRefusedError as exc:  # not "not cancellable": sent again when it can be
            self._follow_through_account_trouble(job, request_id, exc)
            return
        except UpstreamError as exc:
            cancelled, answer = False, exc.message
        else:
            cancelled, answer = outcome.cancelled, outcome.outcome
        settling = partial(
            decisions.settle_cancel,
            request_id=request_id,
            cancelled=cancelled,
            answer=answer,
            now=self.clock(),
        )
        self._commit(job.id, settling)

    def _last_look_then_expire(self, record: Record) -> None:
        """At the deadline, one last look if a token is free: a run RunComfy finished by the
        deadline ends the job as it ended (a look planned for the deadline — looks are capped
        there — comes just too late to see it). Anything else expires; a look that fails or has
        no token changes nothing of that."""
        job = record.job
        request_id = job.request_id
        if (
            request_id is not None
            and job.status in (Status.SUBMITTED, Status.RUNNING)
            and self._another_call(job)
        ):
            try:
                state = self.runcomfy.result(request_id)
            except TransientUpstreamError as exc:
                self._on_transient(exc)  # a 429 pauses every worker's calls all the same
            except UpstreamError:
                pass
            else:
                if decisions.finished_by_deadline(job, state):
                    self._apply_state(record, request_id, state)
                    return
        self._expire(job)

    def _expire(self, job: Job) -> None:
        """End the job expired, cancelling what it leaves running at RunComfy."""
        # Cancelled before the final write (a worker dying after it leaves nothing undone), and
        # after it the request the expired record holds if it is another: a submit answered
        # between this step's read and its write left that run paid for and untracked.
        read_id = decisions.request_left_running(job)
        cancelled = read_id is not None and self._best_effort_cancel(read_id)
        expiring = partial(
            decisions.expire,
            now=self.clock(),
            deadline_s=self.settings.job_deadline_s,
            cancelled_request=read_id if cancelled else None,
            list_price_usd=self._list_price(),
        )
        committed = self._commit(job.id, expiring)
        if committed is not None and committed.job.request_id != read_id:
            self._cancel_left_behind(committed.job)

    def _cancel_left_behind(self, ended: Job) -> str | None:
        """`ended` is ended here while RunComfy may still queue or run its request: cancel it.
        Returns the request id cancelled, if any."""
        request_id = decisions.request_left_running(ended)
        if request_id is not None:
            self._best_effort_cancel(request_id)
        return request_id

    def _best_effort_cancel(self, request_id: str) -> bool:
        """Ask RunComfy once to cancel `request_id`; True if it did (it was still queued)."""
        try:
            self.counters.add("upstream_cancels")
            return self.runcomfy.cancel(request_id).cancelled
        except UpstreamError as exc:
            log.info(
                "cancel on the way out failed",
                extra={"upstream_request_id": request_id, "error": exc.message},
            )
            return False

    # --- commits ----------------------------------------------------------------------------

    def _fail(self, job_id: str, code: str, message: str, *, runs_charged: int) -> Committed | None:
        error = JobError(code, message)
        failing = partial(
            decisions.end_if_live,
            status=Status.FAILED,
            now=self.clock(),
            error=error,
            runs_charged=runs_charged,
            list_price_usd=self._list_price() if runs_charged else None,
        )
        return self._commit(job_id, failing)

    def _commit(
        self, job_id: str, step: Callable[[Job], Step | None], *, seen: Record | None = None
    ) -> Committed | None:
        """store.change with `step` (a decision), then what a committed change sets off."""
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
                    "cost_usd": job.cost_usd,
                    "cost_source": job.cost_source,
                },
            )
        if committed.events:
            self.on_events()
        return committed
