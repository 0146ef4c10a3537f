"""Thin Celery tasks: claim what is due in a schedule and take each one step, concurrently."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from celery import shared_task

from core.schedule import DueSchedule
from core.wakeups import DISPATCH_JOBS_TASK, DISPATCH_WEBHOOKS_TASK
from workers.runtime import runtime

log = logging.getLogger(__name__)

TIMED_WAKE_GAP_S = 0.1
# Threads per worker process for one batch: the work is waiting on HTTP, not CPU.
_POOL = ThreadPoolExecutor(max_workers=64, thread_name_prefix="step")


@shared_task(name=DISPATCH_JOBS_TASK, ignore_result=True)
def dispatch_jobs() -> int:
    """Take every due job step (up to a batch); returns how many were taken."""
    rt = runtime()
    return _dispatch(
        task_name=DISPATCH_JOBS_TASK,
        schedule=rt.store.job_schedule,
        lease_s=rt.settings.step_lease_s,
        step=rt.pipeline.advance,
        again=rt.wakeups.jobs,
        before_claim=lambda: rt.store.admission.admit(
            max_in_flight=rt.settings.runcomfy_max_in_flight,
            slot_ttl_s=rt.settings.job_deadline_s + rt.settings.step_lease_s,
        ),
    )


@shared_task(name=DISPATCH_WEBHOOKS_TASK, ignore_result=True)
def dispatch_webhooks() -> int:
    """Make every due webhook attempt (up to a batch); returns how many were made."""
    rt = runtime()
    return _dispatch(
        task_name=DISPATCH_WEBHOOKS_TASK,
        schedule=rt.store.webhook_schedule,
        lease_s=2 * rt.settings.webhook_timeout_s + 10,
        step=rt.delivery.deliver,
        again=rt.wakeups.webhooks,
    )


def _dispatch(
    *,
    task_name: str,
    schedule: DueSchedule,
    lease_s: float,
    step: Callable[[str], None],
    again: Callable[[], None],
    before_claim: Callable[[], object] | None = None,
) -> int:
    rt = runtime()
    rt.wakeups.claiming(task_name)
    if before_claim is not None:
        before_claim()  # e.g. admission: jobs it admits are due now and claimed below
    batch = rt.settings.dispatch_batch_size
    members = schedule.claim(limit=batch, lease_s=lease_s)
    for member, error in zip(
        members, _POOL.map(lambda m: _run_step(step, m), members), strict=True
    ):
        if error is not None:
            # The member stays claimed until its lease ends, then is due again: a retry with
            # backoff for free, and the error is in the log.
            log.error("step failed", extra={"member": member, "error": error})
    rt.counters.flush()
    if len(members) == batch:
        again()  # more may be waiting: don't leave them for the next beat
    else:
        _wake_for_next(task_name, schedule, rt.settings.dispatch_interval_s)
    return len(members)


def _wake_for_next(task_name: str, schedule: DueSchedule, tick_s: float) -> None:
    """If the next step falls before the beat's next tick could take it, wake up for it."""
    next_due = schedule.next_due_at()
    now = time.time()
    if next_due is not None and next_due < now + 2 * tick_s:
        # Steps due within a few ms of each other share one dispatch: per-task overhead stays
        # bounded at 1 / TIMED_WAKE_GAP_S dispatches a second, at a cost of that much latency.
        runtime().wakeups.at(task_name, max(next_due, now + TIMED_WAKE_GAP_S), now)


def _run_step(step: Callable[[str], None], member: str) -> str | None:
    try:
        step(member)
    except Exception as exc:  # one bad job must not stop the batch
        log.exception("step raised", extra={"member": member})
        return f"{type(exc).__name__}: {exc}"
    return None
