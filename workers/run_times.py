"""How long RunComfy takes to run a job of a given shape, learned from finished jobs.

Kept in one Redis hash shared by every worker (field: "<steps>:<image_size>", value: "mean count"),
and the shape's last RECENT_RUNS runs in a list beside it (their spread: runs of one shape vary),
read through a short in-process cache. Races between workers only blur an average.

Until a shape's first run is learned, its running jobs are polled every 2 s; each is noted (with
when it started) in a per-shape waiting set, and the first run learned brings every one of them
forward to when it should be done — the first wave of a new shape does not wait out 2 s polls.
"""

from __future__ import annotations

import math
import time
from typing import Any

import redis

from core.keys import PREFIX
from workers.polling import RunEstimate

RUN_TIMES_KEY = PREFIX + "run_times"
RECENT_PREFIX = PREFIX + "run_times:recent:"  # + shape: list of the last runs, newest first
RECENT_RUNS = 64
# With this many recent runs, their spread is used: the window between these quantiles.
MIN_RUNS_FOR_SPREAD = 8
EARLIEST_QUANTILE, LATEST_QUANTILE = 0.05, 0.95
UNLEARNED_PREFIX = PREFIX + "run_times:unlearned:"  # + shape: zset job id -> running since
UNLEARNED_TTL_S = 3600  # a shape never learned (its runs all failed) is forgotten
CACHE_S = 5.0
UNKNOWN_RECHECK_S = 0.5  # a shape not learned yet: another worker may learn it any moment
MIN_ALPHA = 0.1  # the plain mean of the first ten runs, then an exponential average
MAX_PLAUSIBLE_RUN_S = 3600.0


def shape_of(job_input: dict[str, Any]) -> str:
    """The inputs that set a turbo model's run time."""
    return f"{job_input.get('num_inference_steps', 20)}:{job_input.get('image_size', 'auto')}"


# Fold one observed run into its shape's average, in one call (no read-modify-write race between
# workers). The first run learned also brings the shape's waiting jobs forward to their expected
# end — never later than already due, and only jobs still scheduled — and forgets them.
# KEYS: the run times hash, the shape's waiting set, the job schedule, the shape's recent runs
# ARGV: shape, observed run seconds, MIN_ALPHA, RECENT_RUNS. Returns the new mean (as text: Lua
# truncates).
_LEARN = """
local run = tonumber(ARGV[2])
redis.call('LPUSH', KEYS[4], ARGV[2])
redis.call('LTRIM', KEYS[4], 0, tonumber(ARGV[4]) - 1)
local mean, count = run, 0
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if raw then
  local m, c = string.match(raw, '^(%S+) (%S+)$')
  mean, count = tonumber(m), tonumber(c)
end
mean = mean + math.max(tonumber(ARGV[3]), 1 / (count + 1)) * (run - mean)
redis.call('HSET', KEYS[1], ARGV[1], string.format('%.4f %d', mean, count + 1))
if count == 0 then
  local waiting = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  for i = 1, #waiting, 2 do
    redis.call('ZADD', KEYS[3], 'XX', 'LT', tonumber(waiting[i + 1]) + mean, waiting[i])
  end
  redis.call('DEL', KEYS[2])
end
return string.format('%.4f', mean)
"""


class RunTimes:
    """Learned run seconds per job shape."""

    def __init__(self, client: redis.Redis, *, job_schedule_key: str) -> None:
        self.redis = client
        self.job_schedule_key = job_schedule_key
        self._cache: dict[str, float] = {}
        self._windows: dict[str, RunEstimate] = {}
        self._cached_at = 0.0
        self._learn = client.register_script(_LEARN)

    def expected_s(self, job_input: dict[str, Any]) -> float | None:
        """The learned (typical) run time for this shape, or None before any was seen."""
        field = shape_of(job_input)
        self._refresh(field)
        return self._cache.get(field)

    def estimate(self, job_input: dict[str, Any]) -> RunEstimate | None:
        """When runs of this shape end: the window their recent runs ended in, or the typical
        run alone while too few are known; None before any was seen."""
        field = shape_of(job_input)
        self._refresh(field)
        typical = self._cache.get(field)
        if typical is None:
            return None
        return self._windows.get(field) or RunEstimate.exactly(typical)

    def _refresh(self, field: str) -> None:
        age_s = time.monotonic() - self._cached_at
        if not (age_s > CACHE_S or (field not in self._cache and age_s > UNKNOWN_RECHECK_S)):
            return
        raw = self.redis.hgetall(RUN_TIMES_KEY)
        means = {str(k): float(str(v).split()[0]) for k, v in raw.items()}
        with self.redis.pipeline(transaction=False) as pipe:
            for shape in means:
                pipe.lrange(RECENT_PREFIX + shape, 0, -1)
            recent = pipe.execute()
        self._windows = {
            shape: window
            for shape, runs in zip(means, recent, strict=True)
            if (window := run_window([float(r) for r in runs])) is not None
        }
        self._cache = means
        self._cached_at = time.monotonic()

    def wait_for_first(self, job_input: dict[str, Any], job_id: str, running_since: float) -> None:
        """A running job of a shape not learned yet: have the first learned run re-plan it."""
        key = UNLEARNED_PREFIX + shape_of(job_input)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(key, {job_id: running_since})
            # Runs that began over UNLEARNED_TTL_S ago are over (or their jobs expired): a shape
            # never learned (every run failing) would otherwise keep every job that ever ran.
            pipe.zremrangebyscore(key, "-inf", running_since - UNLEARNED_TTL_S)
            pipe.expire(key, UNLEARNED_TTL_S)
            pipe.execute()

    def learn(self, job_input: dict[str, Any], run_s: float) -> None:
        """Fold one observed run into the average for its shape (the first re-plans its peers)."""
        if not 0 <= run_s < MAX_PLAUSIBLE_RUN_S:
            return
        field = shape_of(job_input)
        keys = [
            RUN_TIMES_KEY,
            UNLEARNED_PREFIX + field,
            self.job_schedule_key,
            RECENT_PREFIX + field,
        ]
        self._cache[field] = float(
            self._learn(keys=keys, args=[field, run_s, MIN_ALPHA, RECENT_RUNS])
        )


def run_window(runs: list[float]) -> RunEstimate | None:
    """The window recent runs ended in (EARLIEST_QUANTILE to LATEST_QUANTILE, nearest rank),
    or None while there are fewer than MIN_RUNS_FOR_SPREAD of them."""
    if len(runs) < MIN_RUNS_FOR_SPREAD:
        return None
    ordered = sorted(runs)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    return RunEstimate(rank(EARLIEST_QUANTILE), rank(LATEST_QUANTILE))
