"""Wake-ups: tell the workers that a step is due now, without flooding the broker.

The schedules in Redis are the truth and the beat dispatches them every DISPATCH_INTERVAL_S
anyway; a wake-up only saves that wait. A wake-up is sent only when none is already pending:
the flag is set when one is sent and cleared by the dispatcher just before it claims, so
whatever became due after that claim sends a fresh one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
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
REMOVE_EXPIRED_UPLOADS_TASK = "inpaint_gateway.remove_expired_uploads"
DISPATCH_WEBHOOKS_TASK = "inpaint_gateway.dispatch_webhooks"
# A pending wake-up that was lost (broker hiccup) stops suppressing new ones after this long.
PENDING_FLAG_MS = 2000
WAKEUP_EXPIRES_S = 30  # a wake-up older than this is pointless: the beat has dispatched since


# Arm a timed wake-up for ARGV[1] unless one is already pending at or before it.
_ARM = """
local armed = tonumber(redis.call('GET', KEYS[1]) or '0')
local target, now = tonumber(ARGV[1]), tonumber(ARGV[2])
if armed > now and armed <= target then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 1
"""


@dataclass(frozen=True)
class PendingWakeup:
    """The flag that says a wake-up is on its way, for a caller setting it in its own script."""

    task_name: str
    flag_key: str
    ttl_ms: int = PENDING_FLAG_MS


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
        self._arm = client.register_script(_ARM)

    def at(self, task_name: str, when: float, now: float) -> None:
        """Something becomes due at `when`, sooner than the beat's next tick: be there on time.

        At most one timed wake-up is pending per schedule (the earliest); when it runs, its
        dispatch arms the next one.
        """
        if when <= now:
            self._wake(task_name)
            return
        delay_s = when - now
        try:
            key = self._FLAGS[task_name] + ":at"
            if self._arm(keys=[key], args=[when, now, int(delay_s * 1000) + PENDING_FLAG_MS]):
                self.celery.send_task(
                    task_name,
                    queue=self._QUEUES[task_name],
                    countdown=delay_s,
                    expires=delay_s + WAKEUP_EXPIRES_S,
                    retry=False,
                )
        except (redis.RedisError, kombu.exceptions.KombuError, OSError) as exc:
            log.warning(
                "timed wake-up not sent", extra={"task": task_name, "error": type(exc).__name__}
            )

    def jobs(self) -> None:
        """Job steps are due now."""
        self._wake(DISPATCH_JOBS_TASK)

    def webhooks(self) -> None:
        """Webhook attempts are due now."""
        self._wake(DISPATCH_WEBHOOKS_TASK)

    def pending(self, task_name: str) -> PendingWakeup:
        """The flag to set (SET NX) with another write; if it was set, call `send`."""
        return PendingWakeup(task_name, self._FLAGS[task_name])

    def claiming(self, task_name: str) -> None:
        """A dispatcher is about to claim: later arrivals need a wake-up of their own."""
        self.redis.delete(self._FLAGS[task_name])

    def send(self, task_name: str) -> None:
        """Send the wake-up whose pending flag the caller has just set."""
        # Best effort: if the broker is down, the beat's next dispatch does the same.
        try:
            self.celery.send_task(
                task_name, queue=self._QUEUES[task_name], expires=WAKEUP_EXPIRES_S, retry=False
            )
        except (kombu.exceptions.KombuError, OSError) as exc:
            log.warning("wake-up not sent", extra={"task": task_name, "error": type(exc).__name__})

    def _wake(self, task_name: str) -> None:
        try:
            claimed = self.redis.set(self._FLAGS[task_name], 1, nx=True, px=PENDING_FLAG_MS)
        except (redis.RedisError, OSError) as exc:
            log.warning("wake-up not sent", extra={"task": task_name, "error": type(exc).__name__})
            return
        if claimed:
            self.send(task_name)
