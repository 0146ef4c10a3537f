"""Thin Celery tasks: claim what is due in a schedule and take each one step, concurrently."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TypeVar

from celery import shared_task
from celery.signals import worker_process_shutdown, worker_shutdown

from core.schedule import DueSchedule
from core.uploads import remove_expired_uploads
from core.wakeups import (
    DISPATCH_JOBS_TASK,
    DISPATCH_WEBHOOKS_TASK,
    REMOVE_EXPIRED_UPLOADS_TASK,
)
from workers.runtime import runtime

log = logging.getLogger(__name__)
M = TypeVar("M")  # what a step is taken for: a job id, a webhook id, a held place
T = TypeVar("T")

TIMED_WAKE_GAP_S = 0.1
# A dispatch waits this long for its webhook attempts; one still running goes on without it.
ATTEMPT_WAIT_S = 0.25


class AttemptThreads:
    """This process's webhook attempts, on threads of their own.

    A receiver may take up to WEBHOOK_TIMEOUT_S to answer. If the dispatch task waited for it, a
    receiver that hangs would hold a worker slot that long — and the job steps queued behind
    it, and every other team's webhooks. Here it holds one of these threads instead; a dispatch
    claims no more attempts than there are threads free, so none waits in a queue while its
    lease runs.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="webhook")
        self._lock = threading.Lock()
        self._running = 0
        self.draining = False  # set once the worker stops: no attempt takes on another

    @property
    def running(self) -> int:
        """Attempts started and not yet ended."""
        with self._lock:
            return self._running

    def room(self) -> int:
        """How many more attempts can start now."""
        return self.size - self.running

    def may_go_on(self) -> bool:
        """Whether an attempt's thread may take the next in its receiver's line: not once the
        worker drains, nor when no other thread is free (then a dispatch takes what is due
        next, whichever receiver it is for: a busy receiver's line does not keep every
        thread)."""
        return not self.draining and self.room() > 0

    def start(self, attempt: Callable[[], None]) -> Future[None]:
        with self._lock:
            self._running += 1
        future = self._executor.submit(attempt)
        future.add_done_callback(self._ended)
        return future

    def drain(self, timeout_s: float) -> bool:
        """Wait for the attempts running now to end; False if some still run after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while self.running:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _ended(self, _: Future[None]) -> None:
        with self._lock:
            self._running -= 1


_ATTEMPTS = AttemptThreads(size=64)


@shared_task(name=DISPATCH_JOBS_TASK, ignore_result=True)
def dispatch_jobs() -> int:
    """Take every due job step (up to a batch); returns how many were taken."""
    rt = runtime()
    rt.wakeups.claiming(DISPATCH_JOBS_TASK)
    # Admission first: the jobs it admits are due now and claimed below.
    rt.store.admission.admit(
        max_in_flight=rt.settings.runcomfy_max_in_flight,
        slot_ttl_s=rt.settings.job_deadline_s + rt.settings.step_lease_s,
    )
    batch = rt.settings.dispatch_batch_size
    schedule = rt.store.job_schedule
    members = schedule.claim(limit=batch, lease_s=rt.settings.step_lease_s)
    list(rt.steps.map(functools.partial(_run_step, rt.pipeline.advance), members))
    rt.counters.flush()
    if len(members) == batch:
        rt.wakeups.jobs()  # more may be waiting: don't leave them for the next beat
    else:
        _wake_for_next(DISPATCH_JOBS_TASK, schedule, rt.settings.dispatch_interval_s)
    return len(members)


@shared_task(name=REMOVE_EXPIRED_UPLOADS_TASK, ignore_result=True)
def remove_expired_uploads_task() -> int:
    """Delete the bytes of uploads whose record has expired; returns how many."""
    return remove_expired_uploads(runtime().uploads, time.time())


@shared_task(name=DISPATCH_WEBHOOKS_TASK, ignore_result=True)
def dispatch_webhooks() -> int:
    """Start every due webhook attempt (up to a batch, and the threads free); returns how many.

    Waits ATTEMPT_WAIT_S for them: a fast receiver's attempts end within it (and are counted
    with this dispatch); a slow one's go on without it.
    """
    rt = runtime()
    rt.wakeups.claiming(DISPATCH_WEBHOOKS_TASK)
    batch = rt.settings.dispatch_batch_size
    limit = min(batch, _ATTEMPTS.room())
    if limit == 0:
        return 0  # every thread is on a slow receiver: the beat's next tick tries again
    schedule = rt.store.outbox.schedule
    members = schedule.claim(limit=limit, lease_s=rt.delivery.lease_s)
    dispatch_gone = threading.Event()
    attempts = [_ATTEMPTS.start(functools.partial(_attempt, m, dispatch_gone)) for m in members]
    wait(attempts, timeout=ATTEMPT_WAIT_S)
    dispatch_gone.set()  # from here on, an attempt that ends counts for itself
    going_on = sum(1 for attempt in attempts if not attempt.done())
    rt.counters.flush()
    if going_on:
        log.info("webhook attempts go on after their dispatch", extra={"count": going_on})
    if len(members) == batch:
        rt.wakeups.webhooks()  # more may be waiting: don't leave them for the next beat
    elif len(members) < limit:
        _wake_for_next(DISPATCH_WEBHOOKS_TASK, schedule, rt.settings.dispatch_interval_s)
    # else the threads ran out before the due attempts did: the beat's next tick takes the rest
    return len(members)


def _attempt(webhook_id: str, dispatch_gone: threading.Event) -> None:
    """One attempt; then, while its receiver has attempts in line and may_go_on, the next one,
    whose place this thread is handed (no dispatch needed)."""
    rt = runtime()
    held = _run_step(
        functools.partial(rt.delivery.deliver, take_next=_ATTEMPTS.may_go_on), webhook_id
    )
    while True:
        if dispatch_gone.is_set():  # its dispatch has flushed (or is about to): count it here
            try:
                rt.counters.flush()
            except Exception:  # a place may be held: it must still be taken (or let go) below
                log.exception("webhook attempt counts not written")
        if held is None:
            return
        held = _run_step(
            functools.partial(rt.delivery.deliver_held, take_next=_ATTEMPTS.may_go_on), held
        )


@worker_process_shutdown.connect(weak=False)
@worker_shutdown.connect(weak=False)
def _finish_attempts(**_: object) -> None:
    """A stopping worker lets the attempts it started end (at most WEBHOOK_TIMEOUT_S each); one
    cut short by a kill is due again when its lease ends, with the same webhook-id."""
    _ATTEMPTS.draining = True
    if not _ATTEMPTS.running:
        return
    if not _ATTEMPTS.drain(timeout_s=runtime().settings.webhook_timeout_s + 5):
        log.warning(
            "webhook attempts cut short by shutdown; each is due again when its lease ends",
            extra={"count": _ATTEMPTS.running},
        )
    runtime().counters.flush()


def _wake_for_next(task_name: str, schedule: DueSchedule, tick_s: float) -> None:
    """If the next step falls before the beat's next tick could take it, wake up for it."""
    next_due = schedule.next_due_at()
    now = time.time()
    if next_due is not None and next_due < now + 2 * tick_s:
        # Steps due within a few ms of each other share one dispatch: per-task overhead stays
        # bounded at 1 / TIMED_WAKE_GAP_S dispatches a second, at a cost of that much latency.
        runtime().wakeups.at(task_name, max(next_due, now + TIMED_WAKE_GAP_S), now)


def _run_step(step: Callable[[M], T], member: M) -> T | None:
    """One step, and what it returns; an error is logged (once, with its traceback) and stops
    nothing else.

    The member stays claimed until its lease ends, then is due again: a retry with backoff for
    free.
    """
    try:
        return step(member)
    except Exception:
        log.exception("step failed; due again when its lease ends", extra={"member": member})
        return None
