"""The Redis store of jobs: job records (the truth), each client's index, the job schedule.

Every change to a job is compare-and-set: it is computed from the record as read and committed by
one Lua call only if the record is still what was read, together with everything that follows from
it — the next due step, new webhook events (written into the outbox, core/outbox.py), the release
of the job's upstream slot (core/admission.py owns those writes) — so they can never disagree.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import redis
import redis.sentinel

from core.admission import (
    ADMISSION_RECHECK_S,
    IN_FLIGHT_KEY,
    JOIN_LINE_LUA,
    RELEASE_SLOT_LUA,
    FairAdmission,
)
from core.jobs import Job
from core.keys import COUNTERS_KEY, PREFIX
from core.limits import NO_LIMITS, LimitRefused
from core.media_urls import MediaLinks, media_links, signing_key
from core.outbox import WebhookOutbox
from core.replication import ReplicaAcks
from core.schedule import DueSchedule
from core.settings import DEFAULT_MEDIA_URL_TTL_S, RedisTarget
from core.usage import (
    CHECK_AND_COUNT_ACCEPT_LUA,
    RECORD_FINAL_LUA,
    AcceptLimits,
    final_args,
    final_keys,
)
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
#       idempotency key or "", wake-up flag or "", then the limits' keys (AcceptLimits.keys)
# ARGV: job json, job id, created_at, client id, first due, index trim bound, idempotency record,
#       idempotency TTL, wake-up flag TTL ms, then the limits' arguments (AcceptLimits.args)
# Returns the idempotency key's existing record (nothing created); a refusal by a limit
# {kind, …} (nothing created); else {1 if this call set the wake-up flag (the caller sends the
# wake-up) or 0, the rate slots remaining or -1, ms until the rate window is whole again}.
_CREATE = (
    """
if KEYS[7] ~= '' then
  local first = redis.call('GET', KEYS[7])
  if first then return first end
end
"""
    + CHECK_AND_COUNT_ACCEPT_LUA
    + """
if KEYS[7] ~= '' then redis.call('SET', KEYS[7], ARGV[7], 'EX', ARGV[8]) end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[6])
"""
    + JOIN_LINE_LUA
    + """
redis.call('ZADD', KEYS[5], ARGV[5], ARGV[2])
redis.call('HINCRBY', KEYS[6], 'jobs_accepted', 1)
local woke = 0
if KEYS[8] ~= '' and redis.call('SET', KEYS[8], 1, 'NX', 'PX', ARGV[9]) then woke = 1 end
return {woke, remaining, reset_ms}
"""
)


# Every job id that turns final, published as it does: API processes holding `?wait` requests
# listen (service/waiting.py). A message no one hears costs nothing.
JOB_FINAL_CHANNEL = PREFIX + "job-final"


# Commit one job change if the record is still the one it was computed from.
# KEYS: job, job schedule, in-flight slots, webhook schedule, then — used once the job is final,
#       "" before — its usage keys (usage.final_keys: KEYS[5..9]) and its client's in-flight
#       slots (KEYS[10]), then per new event: its key, the job's event list
# ARGV: record as read, new record, next step at ("" once final), retention s, job id, then the
#       usage arguments (usage.final_args: ARGV[6..12]), then per new event: its JSON,
#       webhook id, first attempt at
# Returns 1 if committed, 0 if the record changed meanwhile (the caller reads it again).
_COMMIT_CHANGE = (
    """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[3] == '' then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[4])
  redis.call('ZREM', KEYS[2], ARGV[5])
"""
    + RELEASE_SLOT_LUA
    + RECORD_FINAL_LUA
    + f"""
redis.call('PUBLISH', '{JOB_FINAL_CHANNEL}', ARGV[5])
"""
    + """
else
  redis.call('SET', KEYS[1], ARGV[2])
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[5])
end
for i = 11, #KEYS, 2 do
  local a = 13 + (i - 11) / 2 * 3
  redis.call('SET', KEYS[i], ARGV[a], 'EX', ARGV[4])
  redis.call('RPUSH', KEYS[i + 1], ARGV[a + 1])
  redis.call('EXPIRE', KEYS[i + 1], ARGV[4])
  redis.call('ZADD', KEYS[4], ARGV[a + 2], ARGV[a + 1])
end
return 1
"""
)
_NOT_FINAL_KEYS: list[str] = ["", "", "", "", "", ""]
_NOT_FINAL_ARGS: list[str | float] = ["", 0, 0, 0, "", "", 0]


@dataclass(frozen=True)
class Created:
    """What JobStore.create did: the job id (the first job's, on an Idempotency-Key replay)."""

    job_id: str
    is_new: bool
    wakeup_claimed: bool  # the caller must send the wake-up whose flag this call set
    rate_remaining: int | None = None  # POSTs left in the client's rate window, if it has one
    rate_reset_s: int = 0  # until that window is whole again


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


# Connections a process may hold at once. redis-py 8's pool refuses a 101st connection
# (MaxConnectionsError); an API process runs one request per thread (API_THREADS +
# API_WAIT_SLOTS of them, each woken wait reading its job) and a worker process its step and
# delivery threads, so each may need more. The pool opens connections only as they are needed.
MAX_REDIS_CONNECTIONS = 1024


def connect_redis(target: str | RedisTarget, *, socket_timeout_s: float = 10.0) -> redis.Redis:
    """A Redis client as every process uses it: text responses, bounded waits, health checks.

    With sentinels, the client asks them for the current master on every new connection, so
    after a failover it reconnects to the promoted replica (and never writes to a replica).
    """
    url, sentinel = (target, None) if isinstance(target, str) else (target.url, target.sentinel)
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": min(5.0, socket_timeout_s),
        "health_check_interval": 15,
        "max_connections": MAX_REDIS_CONNECTIONS,
    }
    if sentinel is None:
        return redis.Redis.from_url(url, **options)
    parsed = redis.connection.parse_url(url)  # database, credentials; the sentinels name the host
    master_options = {k: v for k, v in parsed.items() if k in ("db", "username", "password")}
    if url.startswith("rediss://"):
        master_options["ssl"] = True
    sentinels = redis.sentinel.Sentinel(
        list(sentinel.addresses),
        sentinel_kwargs={
            "socket_timeout": options["socket_timeout"],
            "socket_connect_timeout": options["socket_connect_timeout"],
            "password": sentinel.password or None,
        },
    )
    client: redis.Redis = sentinels.master_for(sentinel.master, **options, **master_options)
    return client


class JobStore:
    """Job records, each client's index of them, the job schedule; `outbox` holds their webhooks."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        retention_s: int,
        media_base_url: str = "",
        media_url_ttl_s: int = DEFAULT_MEDIA_URL_TTL_S,
        replica_wait_ms: int = 0,
    ) -> None:
        self.redis = client
        self.replica_acks = ReplicaAcks(client, wait_ms=replica_wait_ms)
        self.retention_s = retention_s
        # Webhook payloads sign their media URLs on this base (PUBLIC_BASE_URL; "": the path).
        self.media_base_url = media_base_url
        self.media_url_ttl_s = media_url_ttl_s
        self.job_schedule = DueSchedule(client, PREFIX + "due:jobs")
        self.outbox = WebhookOutbox(client, retention_s=retention_s)
        self.admission = FairAdmission(client, due_jobs_key=self.job_schedule.key)
        self._create = client.register_script(_CREATE)
        self._commit_change = client.register_script(_COMMIT_CHANGE)

    def media_links(self, now: float) -> MediaLinks:
        """How the job resources of webhook events built at `now` sign their media URLs."""
        return media_links(signing_key(self.redis), self.media_base_url, now, self.media_url_ttl_s)

    # --- keys -----------------------------------------------------------------------------

    @staticmethod
    def job_key(job_id: str) -> str:
        return f"{PREFIX}job:{job_id}"

    @staticmethod
    def client_index_key(client_id: str) -> str:
        return f"{PREFIX}client:{client_id}:jobs"

    # --- jobs -----------------------------------------------------------------------------

    def create(
        self,
        job: Job,
        *,
        idempotency: IdempotencyClaim | None = None,
        wakeup: PendingWakeup | None = None,
        limits: AcceptLimits | None = None,
    ) -> Created:
        """Store a new job, index it, and put it in line for an upstream slot.

        With an idempotency claim, a key already used by this client (within its TTL) creates
        nothing and returns the id of the job it created first — or raises IdempotencyMismatch
        if that job was created from a different body. One Lua call: atomic, so concurrent
        identical requests make one job. Admission makes the job due; the schedule entry
        written here is only the safety net. With `wakeup`, the same call claims its pending
        flag (one round trip per accepted job instead of two); the caller sends the wake-up.
        With `limits`, the same call checks the client's limits and raises LimitRefused
        (nothing stored) if one would be passed; the job is counted unfinished either way.
        """
        checked = limits or AcceptLimits(job.client_id, NO_LIMITS, None, 0)
        keys = [
            self.job_key(job.id),
            self.client_index_key(job.client_id),
            *self.admission.line_keys(job.client_id),
            self.job_schedule.key,
            COUNTERS_KEY,
            idempotency.redis_key if idempotency is not None else "",
            wakeup.flag_key if wakeup is not None else "",
            *checked.keys(),
        ]
        idempotency_record = ""
        if idempotency is not None:
            idempotency_record = json.dumps({"body": idempotency.body_hash, "job_id": job.id})
        args = [
            job.to_json(),
            job.id,
            job.created_at,
            job.client_id,
            min(job.deadline_at, job.created_at + ADMISSION_RECHECK_S),
            job.created_at - self.retention_s,
            idempotency_record,
            IDEMPOTENCY_TTL_S,
            wakeup.ttl_ms if wakeup is not None else 0,
            *checked.args(job.created_at),
        ]
        replicas = self.replica_acks.to_wait_for()
        if not replicas:
            return _created(job.id, self._create(keys=keys, args=args), idempotency, checked)
        # WAIT counts the writes of its own connection: one pipeline sends both on one.
        with self.redis.pipeline(transaction=False) as pipe:
            self._create(keys=keys, args=args, client=pipe)
            pipe.execute_command("WAIT", replicas, self.replica_acks.wait_ms)
            answer, acked = pipe.execute()
        created = _created(job.id, answer, idempotency, checked)
        if created.is_new and int(acked) < replicas:
            self.replica_acks.not_acked(job.id)
        return created

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
        after: tuple[float, str] | None = decode_cursor(cursor) if cursor else None
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
        next_cursor = encode_cursor(*last) if last is not None and not exhausted else None
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
            when = after.updated_at or time.time()
            events = events_for_change(current.job, after, when, self.media_links)
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
            self.outbox.schedule.key,
        ]
        args: list[bytes | str | float] = [
            raw_before,
            written.raw,
            "" if job.status.is_final else repr(next_step_at),
            self.retention_s,
            job.id,
        ]
        if job.status.is_final:
            keys += [*final_keys(job), FairAdmission.client_slots_key(job.client_id)]
            args += final_args(job)
        else:
            keys += _NOT_FINAL_KEYS
            args += _NOT_FINAL_ARGS
        for event in events:  # new events: the same writes as WebhookOutbox.put_event(is_new=True)
            keys += [
                self.outbox.event_key(event.webhook_id),
                self.outbox.job_events_key(event.job_id),
            ]
            args += [event.to_json(), event.webhook_id, event.next_attempt_at or event.created_at]
        return bool(self._commit_change(keys=keys, args=args))


def _created(
    job_id: str, answer: Any, idempotency: IdempotencyClaim | None, checked: AcceptLimits
) -> Created:
    """What the create script's answer says was done (see _CREATE)."""
    if isinstance(answer, list) and isinstance(answer[0], str):
        raise LimitRefused(checked.refusal(answer))
    if not isinstance(answer, str):
        woke, remaining, reset_ms = answer
        return Created(
            job_id,
            is_new=True,
            wakeup_claimed=woke == 1,
            rate_remaining=None if remaining < 0 else int(remaining),
            rate_reset_s=math.ceil(int(reset_ms) / 1000),
        )
    record = json.loads(answer)
    if idempotency is None or record["body"] != idempotency.body_hash:
        raise IdempotencyMismatch(record["job_id"])
    return Created(str(record["job_id"]), is_new=False, wakeup_claimed=False)


def encode_cursor(score: float, job_id: str) -> str:
    """A page's position as "<created_at>_<job id>": plain text, so the API's document can state
    its whole shape, and every string of that shape is a place to start a page from."""
    # Positional, exactly the same float: repr would write 1e-05 for what a timestamp never is.
    return f"{Decimal(repr(score)):f}_{job_id}"


def decode_cursor(cursor: str) -> tuple[float, str]:
    created_text, separator, job_id = cursor.partition("_")
    try:
        created_at = float(created_text)
    except ValueError:
        created_at = math.nan
    if not separator or not job_id or not math.isfinite(created_at):
        raise ValueError("cursor is not one this API returned")
    return created_at, job_id
