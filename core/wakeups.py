"""Wake-ups: tell the workers that a step is due now, without flooding the broker.

The schedules in Redis are the truth and the beat dispatches them every DISPATCH_INTERVAL_S
anyway; a wake-up only saves that wait. A wake-up is sent only when none is already pending:
the flag is set when one is sent and cleared by the dispatcher just before it claims, so
whatever became due after that claim sends a fresh one.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, ClassVar

import kombu.exceptions
import redis

from core.keys import PREFIX

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)

JOBS_QUEUE = "jobs"
WEBHOOKS_QUEUE = "webhooks"
DISPATCH_JOBS_TASK = "inpaint_gateway.dispatch_jobs"
DISPATCH_WEBHOOKS_TASK = "inpaint_gateway.dispatch_webhooks"
# A pending wake-up that was lost (broker hiccup) stops suppressing new ones after this long.
PENDING_FLAG_MS = 2000
WAKEUP_EXPIRES_S = 30  # a wake-up older than this is pointless: the beat has dispatched since


class Wakeups:
    """Sends dispatch tasks for the job and webhook schedules."""

    _FLAGS: ClassVar[dict[str, str]] = {
        DISPATCH_JOBS_TASK: PREFIX + "wakeup:jobs",
        DISPATCH_WEBHOOKS_TASK: PREFIX + "wakeup:webhooks",
    }
    _QUEUES: ClassVar[dict[str, str]] = {
        DISPATCH_JOBS_TASK: JOBS_QUEUE,
        DISPATCH_WEBHOOKS_TASK: WEBHOOKS_QUEUE,
    }

    def __init__(self, client: redis.Redis, celery: Celery) -> None:
        self.redis = client
        self.celery = celery

    def jobs(self) -> None:
        """Job steps are due now."""
        self._wake(DISPATCH_JOBS_TASK)

    def webhooks(self) -> None:
        """Webhook attempts are due now."""
        self._wake(DISPATCH_WEBHOOKS_TASK)

    def claiming(self, task_name: str) -> None:
        """A dispatcher is about to claim: later arrivals need a wake-up of their own."""
        self.redis.delete(self._FLAGS[task_name])

    def _wake(self, task_name: str) -> None:
        # Best effort: if Redis or the broker is down, the beat's next dispatch does the same.
        try:
            if self.redis.set(self._FLAGS[task_name], 1, nx=True, px=PENDING_FLAG_MS):
                self.celery.send_task(
                    task_name, queue=self._QUEUES[task_name], expires=WAKEUP_EXPIRES_S, retry=False
                )
        except (redis.RedisError, kombu.exceptions.KombuError, OSError) as exc:
            log.warning("wake-up not sent", extra={"task": task_name, "error": type(exc).__name__})
