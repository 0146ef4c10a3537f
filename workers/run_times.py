"""How long RunComfy takes to run a job of a given shape, learned from finished jobs.

Kept in one Redis hash shared by every worker (field: "<steps>:<image_size>", value: "mean count"),
read through a short in-process cache. Races between workers only blur an average.

Until a shape's first run is learned, its running jobs are polled every 2 s; each is noted (with
when it started) in a per-shape waiting set, and the first run learned brings every one of them
forward to when it should be done — the first wave of a new shape does not wait out 2 s polls.
"""

from __future__ import annotations

import time
from typing import Any

import redis

from core.keys import PREFIX

RUN_TIMES_KEY = PREFIX + "run_times"
UNLEARNED_PREFIX = PREFIX + "run_times:unlearned:"  # + shape: zset job id -> running since
UNLEARNED_TTL_S = 3600  # a shape never learned (its runs all failed) is forgotten
CACHE_S = 5.0
UNKNOWN_RECHECK_S = 0.5  # a shape not learned yet: another worker may learn it any moment
MIN_ALPHA = 0.1  # the plain mean of the first ten runs, then an exponential average
MAX_PLAUSIBLE_RUN_S = 3600.0


def shape_of(job_input: dict[str, Any]) -> str:
    """The inputs that set a turbo model's run time."""
    return f"{job_input.get('num_inference_steps', 20)}:{job_input.get('image_size', 'auto')}"


# Bring the waiting jobs of a shape just learned forward to their expected end (never later than
# already due, and only jobs still scheduled), then forget them.
# KEYS: the shape's waiting set, the job schedule; ARGV: the learned run seconds
_REPLAN = """
local waiting = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for i = 1, #waiting, 2 do
  redis.call('ZADD', KEYS[2], 'XX', 'LT', tonumber(waiting[i + 1]) + tonumber(ARGV[1]), waiting[i])
end
redis.call('DEL', KEYS[1])
return #waiting / 2
"""


class RunTimes:
    """Learned run seconds per job shape."""

    def __init__(self, client: redis.Redis, *, job_schedule_key: str) -> None:
        self.redis = client
        self.job_schedule_key = job_schedule_key
        self._cache: dict[str, float] = {}
        self._cached_at = 0.0
        self._replan = client.register_script(_REPLAN)

    def expected_s(self, job_input: dict[str, Any]) -> float | None:
        """The learned run time for this shape, or None before any was seen."""
        field = shape_of(job_input)
        age_s = time.monotonic() - self._cached_at
        if age_s > CACHE_S or (field not in self._cache and age_s > UNKNOWN_RECHECK_S):
            raw = self.redis.hgetall(RUN_TIMES_KEY)
            self._cache = {str(k): float(str(v).split()[0]) for k, v in raw.items()}
            self._cached_at = time.monotonic()
        return self._cache.get(field)

    def wait_for_first(self, job_input: dict[str, Any], job_id: str, running_since: float) -> None:
        """A running job of a shape not learned yet: have the first learned run re-plan it."""
        key = UNLEARNED_PREFIX + shape_of(job_input)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(key, {job_id: running_since})
            pipe.expire(key, UNLEARNED_TTL_S)
            pipe.execute()

    def learn(self, job_input: dict[str, Any], run_s: float) -> None:
        """Fold one observed run into the average for its shape (the first re-plans its peers)."""
        if not 0 <= run_s < MAX_PLAUSIBLE_RUN_S:
            return
        field = shape_of(job_input)
        raw = self.redis.hget(RUN_TIMES_KEY, field)
        mean, count = (float(x) for x in str(raw).split()) if raw else (run_s, 0.0)
        alpha = max(MIN_ALPHA, 1 / (count + 1))
        mean += alpha * (run_s - mean)
        self.redis.hset(RUN_TIMES_KEY, field, f"{mean:.4f} {int(count) + 1}")
        self._cache[field] = mean
        if count == 0:
            self._replan(keys=[UNLEARNED_PREFIX + field, self.job_schedule_key], args=[mean])
