"""The webhook outbox in Redis: each event with its delivery state, the schedule of attempts
due, and every attempt made (a job's deliveries).

A job change writes its new events in the same transaction as the job (JobStore.change, through
`new_event_writes`); everything after that — attempts, redeliveries — goes through here.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from core.keys import PREFIX
from core.schedule import DueSchedule
from core.webhooks import WebhookEvent

WATCH_RETRIES = 20

# A redelivery's reset of an event: made due now unless an attempt holds it (its schedule entry
# claimed: the score is a lease's end, not the stored event's next attempt). That attempt, when
# it ends, finds the event changed and makes it due (record_attempt).
# KEYS: the event, the webhook schedule. ARGV: the reset event (JSON), webhook id, due at, TTL.
_RESET_EVENT = """
local stored = redis.call('GET', KEYS[1])
local score = redis.call('ZSCORE', KEYS[2], ARGV[2])
local claimed = false
if stored and score then
  local was = cjson.decode(stored)
  claimed = was.state == 'pending' and was.next_attempt_at ~= cjson.null
    and tonumber(score) ~= tonumber(was.next_attempt_at)
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[4])
if not claimed then redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2]) end
return claimed and 1 or 0
"""

# KEYS: the event, the webhook schedule. ARGV: webhook id.
_UNSCHEDULE_SETTLED = """
local stored = redis.call('GET', KEYS[1])
if stored and cjson.decode(stored).state == 'pending' then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""


class WebhookOutbox:
    """Webhook events, their schedule and their delivery attempts."""

    def __init__(self, client: redis.Redis, *, retention_s: int) -> None:
        self.redis = client
        self.retention_s = retention_s
        self.schedule = DueSchedule(client, PREFIX + "due:webhooks")
        self._reset_event = client.register_script(_RESET_EVENT)
        self._unschedule_settled = client.register_script(_UNSCHEDULE_SETTLED)

    @staticmethod
    def event_key(webhook_id: str) -> str:
        return f"{PREFIX}event:{webhook_id}"

    @staticmethod
    def job_events_key(job_id: str) -> str:
        return f"{PREFIX}job:{job_id}:events"

    @staticmethod
    def deliveries_key(job_id: str) -> str:
        return f"{PREFIX}job:{job_id}:deliveries"

    def put_event(self, event: WebhookEvent, *, is_new: bool) -> None:
        """Store an event (new, or reset for redelivery) and make it due — unless an attempt
        of it is under way (its schedule entry claimed under a lease): that attempt then finds
        the event changed when it ends, and makes it due itself (record_attempt), so the two
        never run at once."""
        due_at = event.next_attempt_at or event.created_at
        if is_new:
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.set(self.event_key(event.webhook_id), event.to_json(), ex=self.retention_s)
                pipe.rpush(self.job_events_key(event.job_id), event.webhook_id)
                pipe.expire(self.job_events_key(event.job_id), self.retention_s)
                self.schedule.put(pipe, event.webhook_id, due_at)
                pipe.execute()
            return
        self._reset_event(
            keys=[self.event_key(event.webhook_id), self.schedule.key],
            args=[event.to_json(), event.webhook_id, repr(due_at), self.retention_s],
        )  # fmt: skip

    def get_event(self, webhook_id: str) -> WebhookEvent | None:
        """One event with its delivery state."""
        raw = self.redis.get(self.event_key(webhook_id))
        return WebhookEvent.from_json(raw) if raw is not None else None

    def events_of(self, job_id: str) -> list[WebhookEvent]:
        """Every event emitted for a job, oldest first."""
        ids = self.redis.lrange(self.job_events_key(job_id), 0, -1)
        raws = self.redis.mget([self.event_key(str(i)) for i in ids]) if ids else []
        return [WebhookEvent.from_json(r) for r in raws if r is not None]

    def record_attempt(
        self, was: WebhookEvent, event: WebhookEvent, attempt: dict[str, Any]
    ) -> tuple[bool, WebhookEvent | None]:
        """Store the attempt, and the event's new delivery state (`event`) if the stored event
        is still `was`, the one attempted: (True, event). If it changed meanwhile (a redelivery
        reset it), the reset stands and its schedule entry is left as the attempt holds it, for
        the caller to make due once it has let go of its receiver's place: (False, the stored
        event, None if it is gone)."""
        key = self.event_key(event.webhook_id)
        with self.redis.pipeline(transaction=True) as pipe:
            for _ in range(WATCH_RETRIES):
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    stored = WebhookEvent.from_json(raw) if raw is not None else None
                    pipe.multi()
                    pipe.rpush(self.deliveries_key(event.job_id), json.dumps(attempt))
                    pipe.expire(self.deliveries_key(event.job_id), self.retention_s)
                    kept = stored == was
                    if kept:
                        pipe.set(key, event.to_json(), ex=self.retention_s)
                    if kept and event.next_attempt_at is not None:
                        self.schedule.put(pipe, event.webhook_id, event.next_attempt_at)
                    elif kept or stored is None:
                        self.schedule.remove(pipe, event.webhook_id)
                    pipe.execute()
                    return kept, (event if kept else stored)
                except redis.WatchError:
                    continue
        raise RuntimeError(f"event {event.webhook_id}: too much contention to record an attempt")

    def unschedule_settled_event(self, webhook_id: str) -> None:
        """Take an event found not pending (or gone) off the schedule — unless a redelivery has
        made it pending again since it was read."""
        self._unschedule_settled(
            keys=[self.event_key(webhook_id), self.schedule.key], args=[webhook_id]
        )

    def deliveries(self, job_id: str) -> list[dict[str, Any]]:
        """Every delivery attempt for a job, oldest first."""
        return [json.loads(r) for r in self.redis.lrange(self.deliveries_key(job_id), 0, -1)]
