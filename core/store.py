"""The Redis store: job records (the truth), their indexes, schedules and webhook outbox.

Every change to a job is compare-and-set: it is computed from the record as read and committed by
one Lua call only if the record is still what was read, together with everything that follows from
it — the next due step, webhook events, the in-flight slot — so they can never disagree.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from core.admission import (
    ADMISSION_RECHECK_S,
    IN_FLIGHT_KEY,
    WAITING_CLIENTS_KEY,
    FairAdmission,
)
from core.jobs import Job
from core.keys import COUNTERS_KEY, PREFIX
from core.schedule import DueSchedule
from core.wakeups import PendingWakeup
from core.webhooks import WebhookEvent, events_for_change

DEFAULT_CHANGE_RETRIES = 20
LIST_CHUNK = 100
LIST_EXAMINE_LIMIT = 5000  # a status filter over a long history pages on from here


IDEMPOTENCY_TTL_S = 24 * 3600


class IdempotencyMismatch(Exception):
    """The Idempotency-Key was used before with a different body (HTTP 409)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"this Idempotency-Key was used for job {job_id} with a different body")
        self.job_id = job_id


@dataclass(frozen=True)
class IdempotencyClaim:
    """A client's Idempotency-Key and the body it came with."""

    client_id: str
    key: str
    body: dict[str, Any]

    @property
    def redis_key(self) -> str:
        digest = hashlib.sha256(self.key.encode()).hexdigest()
        return f"{PREFIX}idempotency:{self.client_id}:{digest}"

    @property
    def body_hash(self) -> str:
        canonical = json.dumps(self.body, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


# KEYS: job, client index, client's waiting line, waiting clients, job schedule, counters,
#       idempotency key or "", wake-up flag or ""
# ARGV: job json, job id, created_at, client id, first due, index trim bound, idempotency record,
#       idempotency TTL, wake-up flag TTL ms
# Returns the idempotency key's existing record (nothing created); else 1 if this call set the
# wake-up flag (the caller sends the wake-up), or nil.
_CREATE = """
if KEYS[7] ~= '' then
  local first = redis.call('GET', KEYS[7])
  if first then return first end
  redis.call('SET', KEYS[7], ARGV[7], 'EX', ARGV[8])
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[6])
redis.call('RPUSH', KEYS[3], ARGV[2])
redis.call('ZADD', KEYS[4], 'NX', 0, ARGV[4])
redis.call('ZADD', KEYS[5], ARGV[5], ARGV[2])
redis.call('HINCRBY', KEYS[6], 'jobs_accepted', 1)
if KEYS[8] ~= '' and redis.call('SET', KEYS[8], 1, 'NX', 'PX', ARGV[9]) then return 1 end
return false
"""


# Commit one job change if the record is still the one it was computed from.
# KEYS: job, job schedule, in-flight slots, webhook schedule, then per new event: its key, the
#       job's event list
# ARGV: record as read, new record, next step at ("" once final), retention s, job id, then per
#       new event: its JSON, webhook id, first attempt at
# Returns 1 if committed, 0 if the record changed meanwhile (the caller reads it again).
_COMMIT_CHANGE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[3] == '' then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[4])
  redis.call('ZREM', KEYS[2], ARGV[5])
  redis.call('ZREM', KEYS[3], ARGV[5])
else
  redis.call('SET', KEYS[1], ARGV[2])
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[5])
end
for i = 5, #KEYS, 2 do
  local a = 6 + (i - 5) / 2 * 3
  redis.call('SET', KEYS[i], ARGV[a], 'EX', ARGV[4])
  redis.call('RPUSH', KEYS[i + 1], ARGV[a + 1])
  redis.call('EXPIRE', KEYS[i + 1], ARGV[4])
  redis.call('ZADD', KEYS[4], ARGV[a + 2], ARGV[a + 1])
end
return 1
"""


@dataclass(frozen=True)
class Created:
    """What JobStore.create did: the job id (the first job's, on an Idempotency-Key replay)."""

    job_id: str
    is_new: bool
    wakeup_claimed: bool  # the caller must send the wake-up whose flag this call set


@dataclass(frozen=True)
class Step:
    """A job as changed by one step, and when its next step is due (None once final)."""

    job: Job
    next_step_at: float | None


@dataclass(frozen=True)
class Record:
    """A job with the exact stored text it was read from (or written as): what a
    compare-and-set checks against."""

    job: Job
    raw: str


@dataclass(frozen=True)
class Committed:
    """What a successful change wrote."""

    job: Job
    events: list[WebhookEvent]
    record: Record  # the job as now stored: `seen` for the caller's next change


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


def connect_redis(url: str, *, socket_timeout_s: float = 10.0) -> redis.Redis:
    """A Redis client as every process uses it: text responses, bounded waits, health checks."""
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=min(5.0, socket_timeout_s),
        health_check_interval=15,
    )


class JobStore:
    """Job records, per-client index, the job and webhook schedules, deliveries."""

    def __init__(self, client: redis.Redis, *, retention_s: int) -> None:
        self.redis = client
        self.retention_s = retention_s
        self.job_schedule = DueSchedule(client, PREFIX + "due:jobs")
        self.webhook_schedule = DueSchedule(client, PREFIX + "due:webhooks")
        self.admission = FairAdmission(client, due_jobs_key=self.job_schedule.key)
        self._create = client.register_script(_CREATE)
        self._commit_change = client.register_script(_COMMIT_CHANGE)
        self._reset_event = client.register_script(_RESET_EVENT)
        self._unschedule_settled = client.register_script(_UNSCHEDULE_SETTLED)

    # --- keys -----------------------------------------------------------------------------

    @staticmethod
    def job_key(job_id: str) -> str:
        return f"{PREFIX}job:{job_id}"

    @staticmethod
    def client_index_key(client_id: str) -> str:
        return f"{PREFIX}client:{client_id}:jobs"

    @staticmethod
    def event_key(webhook_id: str) -> str:
        return f"{PREFIX}event:{webhook_id}"

    @staticmethod
    def job_events_key(job_id: str) -> str:
        return f"{PREFIX}job:{job_id}:events"

    @staticmethod
    def deliveries_key(job_id: str) -> str:
        return f"{PREFIX}job:{job_id}:deliveries"

    # --- jobs -----------------------------------------------------------------------------

    def create(
        self,
        job: Job,
        *,
        idempotency: IdempotencyClaim | None = None,
        wakeup: PendingWakeup | None = None,
    ) -> Created:
        """Store a new job, index it, and put it in line for an upstream slot.

        With an idempotency claim, a key already used by this client (within its TTL) creates
        nothing and returns the id of the job it created first — or raises IdempotencyMismatch
        if that job was created from a different body. One Lua call: atomic, so concurrent
        identical requests make one job. Admission makes the job due; the schedule entry
        written here is only the safety net. With `wakeup`, the same call claims its pending
        flag (one round trip per accepted job instead of two); the caller sends the wake-up.
        """
        keys = [
            self.job_key(job.id),
            self.client_index_key(job.client_id),
            self.admission.waiting_key(job.client_id),
            WAITING_CLIENTS_KEY,
            self.job_schedule.key,
            COUNTERS_KEY,
            idempotency.redis_key if idempotency is not None else "",
            wakeup.flag_key if wakeup is not None else "",
        ]
        idempotency_record = ""
        if idempotency is not None:
            idempotency_record = json.dumps({"body": idempotency.body_hash, "job_id": job.id})
        answer = self._create(
            keys=keys,
            args=[
                job.to_json(),
                job.id,
                job.created_at,
                job.client_id,
                min(job.deadline_at, job.created_at + ADMISSION_RECHECK_S),
                job.created_at - self.retention_s,
                idempotency_record,
                IDEMPOTENCY_TTL_S,
                wakeup.ttl_ms if wakeup is not None else 0,
            ],
        )
        if not isinstance(answer, str):
            return Created(job.id, is_new=True, wakeup_claimed=answer == 1)
        record = json.loads(answer)
        if idempotency is None or record["body"] != idempotency.body_hash:
            raise IdempotencyMismatch(record["job_id"])
        return Created(str(record["job_id"]), is_new=False, wakeup_claimed=False)

    def get(self, job_id: str) -> Job | None:
        """The job record, or None."""
        record = self.read(job_id)
        return record.job if record is not None else None

    def read(self, job_id: str) -> Record | None:
        """The job record with its stored text (to pass to `change` as `seen`), or None."""
        raw: str | None = self.redis.get(self.job_key(job_id))  # type: ignore[assignment]  # text
        return Record(Job.from_json(raw), raw) if raw is not None else None

    def get_for_client(self, client_id: str, job_id: str) -> Job | None:
        """The job if it exists and belongs to `client_id` (else None: no existence leak)."""
        job = self.get(job_id)
        return job if job is not None and job.client_id == client_id else None

    def list_for_client(
        self, client_id: str, *, status: str | None, limit: int, cursor: str | None
    ) -> tuple[list[Job], str | None]:
        """A page of the client's jobs, newest first, optionally of one status.

        The cursor is the (created_at, id) of the last row examined; rows tied on created_at come
        in descending id order, so the next page skips those at or above the cursor's id.
        """
        index = self.client_index_key(client_id)
        after: tuple[float, str] | None = _decode_cursor(cursor) if cursor else None
        max_score: float | str = after[0] if after else "+inf"
        jobs: list[Job] = []
        last: tuple[float, str] | None = None
        offset, examined, exhausted = 0, 0, False
        while len(jobs) < limit and examined < LIST_EXAMINE_LIMIT:
            rows: list[tuple[str, float]] = self.redis.zrevrangebyscore(  # type: ignore[assignment]
                index, max_score, "-inf", start=offset, num=LIST_CHUNK, withscores=True
            )
            offset += len(rows)
            exhausted = len(rows) < LIST_CHUNK
            ids = [member for member, _ in rows]
            raws = self.redis.mget([self.job_key(i) for i in ids]) if ids else []
            for job_id, (_, score), raw in zip(ids, rows, raws, strict=True):
                if after is not None and score == after[0] and job_id >= after[1]:
                    continue
                examined += 1
                last = (score, job_id)
                if raw is None:  # expired past retention; the index trims lazily
                    continue
                job = Job.from_json(raw)
                if status is None or job.status.value == status:
                    jobs.append(job)
                    if len(jobs) == limit:
                        exhausted = exhausted and job_id == ids[-1]
                        break
            if exhausted:
                break
        next_cursor = _encode_cursor(*last) if last is not None and not exhausted else None
        return jobs, next_cursor

    def change(
        self,
        job_id: str,
        step: Callable[[Job], Step | None],
        *,
        seen: Record | None = None,
        retries: int = DEFAULT_CHANGE_RETRIES,
    ) -> Committed | None:
        """Apply `step` to the current record, compare-and-set; None if `step` declined.

        `step` may be called more than once (after a concurrent change) and must be pure.
        `seen`: the record as the caller last read or wrote it. The first attempt computes from
        it instead of reading again (a worker step reads the job, calls RunComfy, then changes
        it: one Redis call less); if the job changed since, the compare-and-set refuses and
        `step` runs again on a fresh read, as after any concurrent change.
        """
        current = seen if seen is not None else self.read(job_id)
        for _ in range(retries):
            if current is None:
                return None
            result = step(current.job)
            if result is None:
                return None
            after = result.job
            events = events_for_change(current.job, after, after.updated_at or time.time())
            written = Record(after, after.to_json())
            if self._commit(current.raw, written, result.next_step_at, events):
                return Committed(after, events, written)
            current = self.read(job_id)  # changed meanwhile: compute again from the new record
        raise RuntimeError(f"job {job_id}: too much contention to apply a change")

    def _commit(
        self,
        raw_before: str,
        written: Record,
        next_step_at: float | None,
        events: list[WebhookEvent],
    ) -> bool:
        """Write the changed job, its schedule entry or slot release, and its new events."""
        job = written.job
        if not job.status.is_final:
            assert next_step_at is not None, "a live job always has a next step"
        keys = [
            self.job_key(job.id),
            self.job_schedule.key,
            IN_FLIGHT_KEY,
            self.webhook_schedule.key,
        ]
        args: list[bytes | str | float] = [
            raw_before,
            written.raw,
            "" if job.status.is_final else repr(next_step_at),
            self.retention_s,
            job.id,
        ]
        for event in events:  # new events: the same writes as put_event(is_new=True)
            keys += [self.event_key(event.webhook_id), self.job_events_key(event.job_id)]
            args += [event.to_json(), event.webhook_id, event.next_attempt_at or event.created_at]
        return bool(self._commit_change(keys=keys, args=args))

    # --- webhook outbox ---------------------------------------------------------------------

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
                self.webhook_schedule.put(pipe, event.webhook_id, due_at)
                pipe.execute()
            return
        self._reset_event(
            keys=[self.event_key(event.webhook_id), self.webhook_schedule.key],
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
            for _ in range(DEFAULT_CHANGE_RETRIES):
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
                        self.webhook_schedule.put(pipe, event.webhook_id, event.next_attempt_at)
                    elif kept or stored is None:
                        self.webhook_schedule.remove(pipe, event.webhook_id)
                    pipe.execute()
                    return kept, (event if kept else stored)
                except redis.WatchError:
                    continue
        raise RuntimeError(f"event {event.webhook_id}: too much contention to record an attempt")

    def unschedule_settled_event(self, webhook_id: str) -> None:
        """Take an event found not pending (or gone) off the schedule — unless a redelivery has
        made it pending again since it was read."""
        self._unschedule_settled(
            keys=[self.event_key(webhook_id), self.webhook_schedule.key], args=[webhook_id]
        )

    def deliveries(self, job_id: str) -> list[dict[str, Any]]:
        """Every delivery attempt for a job, oldest first."""
        return [json.loads(r) for r in self.redis.lrange(self.deliveries_key(job_id), 0, -1)]


def _encode_cursor(score: float, job_id: str) -> str:
    return base64.urlsafe_b64encode(f"{score!r}|{job_id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        score, job_id = text.split("|", 1)
        created_at = float(score)
        if not math.isfinite(created_at):
            raise ValueError(score)
        return created_at, job_id
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError("cursor is not one this API returned") from exc
