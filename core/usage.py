"""What each client used: jobs by final status and spend per UTC day, kept long after the jobs;
the month's spend and the budget reservations; each client's figures for /metrics.

Written only in the atomic calls that store a job (core/store.py runs the Lua below inside its
own scripts), so the counts equal the jobs: a job's end is counted exactly once, in the same
write as its final status, and a reservation is made in the same write as the job.
"""

from __future__ import annotations

import calendar
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import redis

from core.jobs import FINAL_STATUSES, Job
from core.keys import PREFIX
from core.limits import (
    TOO_MANY_JOBS_RETRY_S,
    BudgetWindow,
    ClientLimits,
    Refusal,
    budget_object,
    budget_window,
    from_micro,
    to_micro,
)

USAGE_RETENTION_S = 410 * 86400  # PRODUCT §9: usage is kept at least 400 days
MAX_USAGE_DAYS = 366  # one query's span at most
CLIENT_METRICS_KEY = PREFIX + "client_metrics"
# Upper bounds (seconds) of the time-to-result histogram, accept to final status.
TIME_TO_RESULT_BUCKETS_S = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 900, 1800, math.inf)
REFUSAL_KINDS = ("too_many_jobs", "rate_limited", "budget_exceeded")


def day_key(client_id: str, day: str) -> str:
    return f"{PREFIX}usage:{client_id}:day:{day}"


def month_key(client_id: str, month: str) -> str:
    return f"{PREFIX}usage:{client_id}:month:{month}"


def reserved_key(client_id: str, window_id: str) -> str:
    return f"{PREFIX}reserved:{client_id}:{window_id}"


def unfinished_key(client_id: str) -> str:
    return f"{PREFIX}client:{client_id}:unfinished"


def rate_key(client_id: str) -> str:
    return f"{PREFIX}client:{client_id}:rate"


def spend_key(client_id: str, window: BudgetWindow) -> str:
    """The hash whose `cost` field is the client's spend in `window`."""
    part = window.id.partition(":")[2]
    return day_key(client_id, part) if window.period == "day" else month_key(client_id, part)


def time_to_result_bucket(seconds: float) -> str:
    """The histogram bucket (its upper bound, as Prometheus writes it) `seconds` falls in."""
    bound = next(b for b in TIME_TO_RESULT_BUCKETS_S if seconds <= b)
    return "+Inf" if bound == math.inf else str(float(bound))


# --- inside JobStore's create script -----------------------------------------------------------
# KEYS[9] unfinished count, KEYS[10] rate (GCRA's theoretical arrival time, ms) or "",
# KEYS[11] the budget window's spend hash or "", KEYS[12] its reservations or "",
# KEYS[13] client metrics.
# ARGV[10] client id, ARGV[11] max unfinished (0: none), ARGV[12] POSTs a minute (0: none),
# ARGV[13] now (ms), ARGV[14] budget (micro-USD), ARGV[15] this job's reservation (micro-USD),
# ARGV[16] the reservation's TTL (s), ARGV[17] usage TTL (s), ARGV[18] retry-after for too many.
# Refusals return {kind, retry_after_s, figure, figure}; they store nothing but their count.
# The rate's clock is the API host's (ARGV[13]): over a one-minute window, the milliseconds hosts
# differ by under NTP move no POST across the edge that matters.
# A job that passes is counted unfinished, spends one rate slot and reserves its estimate; the
# script then goes on with its `remaining` rate slots (-1: no rate limit) and `reset_ms` (until
# the window is whole again) for the headers.
CHECK_AND_COUNT_ACCEPT_LUA = """
local unfinished = tonumber(redis.call('GET', KEYS[9]) or '0')
local max_queued = tonumber(ARGV[11])
if max_queued > 0 and unfinished + 1 > max_queued then
  redis.call('HINCRBY', KEYS[13], ARGV[10] .. '|refused_too_many_jobs', 1)
  return {'too_many_jobs', tonumber(ARGV[18]), unfinished, max_queued}
end
local now = tonumber(ARGV[13])
local per_min = tonumber(ARGV[12])
local new_tat = 0
local remaining = -1
local reset_ms = 0
if per_min > 0 then
  local interval = 60000 / per_min
  local tat = math.max(tonumber(redis.call('GET', KEYS[10]) or '0'), now)
  new_tat = tat + interval
  if new_tat - now > 60000 + 0.001 then
    redis.call('HINCRBY', KEYS[13], ARGV[10] .. '|refused_rate_limited', 1)
    local wait_ms = new_tat - now - 60000
    return {'rate_limited', math.ceil(wait_ms / 1000), 0, per_min}
  end
  remaining = math.floor((60000 - (new_tat - now)) / interval + 0.001)
  reset_ms = math.ceil(new_tat - now)
end
local reservation = tonumber(ARGV[15])
if KEYS[11] ~= '' then
  local spent = tonumber(redis.call('HGET', KEYS[11], 'cost') or '0')
  local reserved = tonumber(redis.call('GET', KEYS[12]) or '0')
  if spent + reserved + reservation > tonumber(ARGV[14]) then
    redis.call('HINCRBY', KEYS[13], ARGV[10] .. '|refused_budget_exceeded', 1)
    return {'budget_exceeded', 0, spent, reserved}
  end
  redis.call('INCRBY', KEYS[12], reservation)
  redis.call('EXPIRE', KEYS[12], ARGV[16])
end
if per_min > 0 then redis.call('SET', KEYS[10], tostring(new_tat), 'PX', math.ceil(new_tat - now) + 1000) end
redis.call('INCR', KEYS[9])
"""

# --- inside JobStore's commit script, once a job is final --------------------------------------
# KEYS[5] the day's usage, KEYS[6] the month's, KEYS[7] the job's reservation or "",
# KEYS[8] unfinished count, KEYS[9] client metrics.
# ARGV[6] status, ARGV[7] cost (micro-USD), ARGV[8] reservation (micro-USD), ARGV[9] usage TTL,
# ARGV[10] client id, ARGV[11] time-to-result bucket, ARGV[12] time to result (ms).
RECORD_FINAL_LUA = """
redis.call('HINCRBY', KEYS[5], ARGV[6], 1)
redis.call('HINCRBY', KEYS[5], 'cost', ARGV[7])
redis.call('EXPIRE', KEYS[5], ARGV[9])
redis.call('HINCRBY', KEYS[6], 'cost', ARGV[7])
redis.call('EXPIRE', KEYS[6], ARGV[9])
if KEYS[7] ~= '' then
  -- A reservation outliving its key's TTL would leave a negative count with no TTL: dropped.
  if tonumber(redis.call('DECRBY', KEYS[7], ARGV[8])) < 0 then redis.call('DEL', KEYS[7]) end
end
if tonumber(redis.call('GET', KEYS[8]) or '0') > 0 then redis.call('DECR', KEYS[8]) end
redis.call('HINCRBY', KEYS[9], ARGV[10] .. '|jobs_' .. ARGV[6], 1)
redis.call('HINCRBY', KEYS[9], ARGV[10] .. '|spend', ARGV[7])
redis.call('HINCRBY', KEYS[9], ARGV[10] .. '|ttr_' .. ARGV[11], 1)
redis.call('HINCRBY', KEYS[9], ARGV[10] .. '|ttr_ms', ARGV[12])
"""


@dataclass(frozen=True)
class AcceptLimits:
    """The limits an accept is checked against, as the create script takes them."""

    client_id: str
    limits: ClientLimits
    window: BudgetWindow | None  # the budget's current period, if a budget is set
    reservation_micro: int  # the job's estimated cost, reserved against the budget

    def keys(self) -> list[str]:
        window = self.window
        return [
            unfinished_key(self.client_id),
            rate_key(self.client_id) if self.limits.rate_per_min else "",
            spend_key(self.client_id, window) if window else "",
            reserved_key(self.client_id, window.id) if window else "",
            CLIENT_METRICS_KEY,
        ]

    def args(self, now: float) -> list[str | int | float]:
        limits = self.limits
        return [
            self.client_id,
            limits.max_queued or 0,
            limits.rate_per_min or 0,
            repr(now * 1000),
            to_micro(limits.budget_usd or 0.0),
            self.reservation_micro,
            int(self.window.ends_at - now) + 2 * 86400 if self.window else 0,
            USAGE_RETENTION_S,
            TOO_MANY_JOBS_RETRY_S,
        ]

    def refusal(self, answer: list[Any]) -> Refusal:
        """The create script's refusal as a Refusal."""
        kind, retry_after, first, second = str(answer[0]), int(answer[1]), answer[2], answer[3]
        if kind == "too_many_jobs":
            return Refusal("too_many_jobs", retry_after_s=retry_after, limit=int(second))
        if kind == "rate_limited":
            return Refusal("rate_limited", retry_after_s=max(1, retry_after), limit=int(second))
        assert self.window is not None
        budget = budget_object(self.limits, self.window, int(first), int(second))
        return Refusal("budget_exceeded", budget=budget)


def final_keys(job: Job) -> list[str]:
    """RECORD_FINAL_LUA's keys for `job`, now final."""
    assert job.finished_at is not None
    at = datetime.fromtimestamp(job.finished_at, UTC)
    return [
        day_key(job.client_id, f"{at:%Y-%m-%d}"),
        month_key(job.client_id, f"{at:%Y-%m}"),
        reserved_key(job.client_id, job.reserved_in) if job.reserved_in else "",
        unfinished_key(job.client_id),
        CLIENT_METRICS_KEY,
    ]


def final_args(job: Job) -> list[str | float]:
    """RECORD_FINAL_LUA's arguments for `job`, now final."""
    assert job.finished_at is not None
    took_s = max(0.0, job.finished_at - job.created_at)
    return [
        job.status.value,
        to_micro(job.cost_usd or 0.0),
        to_micro(job.reserved_usd),
        USAGE_RETENTION_S,
        job.client_id,
        time_to_result_bucket(took_s),
        round(took_s * 1000),
    ]


def month_span(now: float) -> tuple[date, date]:
    """The UTC month `now` falls in: its first and last day."""
    today = datetime.fromtimestamp(now, UTC).date()
    return today.replace(day=1), today.replace(day=calendar.monthrange(today.year, today.month)[1])


def usage_span(first: date | None, last: date | None, now: float) -> tuple[date, date]:
    """The days a usage query covers: both given; `first` alone, up to today; `last` alone, from
    the first of its month; neither, the current month (UTC)."""
    if first is None and last is None:
        return month_span(now)
    if first is None:
        assert last is not None
        return last.replace(day=1), last
    return first, last if last is not None else datetime.fromtimestamp(now, UTC).date()


def days_between(first: date, last: date) -> Iterator[date]:
    """Every day from `first` to `last`, inclusive."""
    for offset in range((last - first).days + 1):
        yield first + timedelta(days=offset)


class UsageBook:
    """Reads what clients used."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def usage(self, client_id: str, first: date, last: date) -> dict[str, Any]:
        """Jobs by final status and spend per day from `first` to `last`, and their total."""
        days = list(days_between(first, last))
        with self.redis.pipeline(transaction=False) as pipe:
            for day in days:
                pipe.hgetall(day_key(client_id, day.isoformat()))
            rows: list[dict[str, str]] = pipe.execute()
        total_jobs = dict.fromkeys(sorted(s.value for s in FINAL_STATUSES), 0)
        total_micro = 0
        listed = []
        for day, row in zip(days, rows, strict=True):
            jobs = {status: int(row.get(status, 0)) for status in total_jobs}
            micro = int(row.get("cost", 0))
            for status, count in jobs.items():
                total_jobs[status] += count
            total_micro += micro
            listed.append({"date": day.isoformat(), "jobs": jobs, "cost_usd": from_micro(micro)})
        return {
            "days": listed,
            "total": {"jobs": total_jobs, "cost_usd": from_micro(total_micro)},
        }

    def budget(self, client_id: str, limits: ClientLimits, now: float) -> dict[str, Any] | None:
        """The budget object for the current period, or None without a budget."""
        if limits.budget_period is None:
            return None
        window = budget_window(limits.budget_period, now)
        spent = self.redis.hget(spend_key(client_id, window), "cost")
        reserved = self.redis.get(reserved_key(client_id, window.id))
        return budget_object(limits, window, int(spent or 0), int(reserved or 0))

    def unfinished(self, client_id: str) -> int:
        """The client's jobs accepted and not final yet."""
        return int(self.redis.get(unfinished_key(client_id)) or 0)

    def client_metrics(self) -> dict[str, dict[str, int]]:
        """Each client's figures for /metrics: {client id: {name: value}}."""
        per_client: dict[str, dict[str, int]] = {}
        for field, value in self.redis.hgetall(CLIENT_METRICS_KEY).items():
            client_id, _, name = str(field).partition("|")
            per_client.setdefault(client_id, {})[name] = int(value)
        return per_client
