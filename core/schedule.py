"""Durable schedules in Redis: what is due when, claimed in batches under a lease."""

from __future__ import annotations

import time

import redis

# Take up to ARGV[2] members due by ARGV[1], and push each to ARGV[3] (the lease's end), atomically:
# whoever claims a member owns it until the lease ends; if that worker dies, the member simply
# becomes due again. This is what makes a lost Celery message or a SIGKILLed worker harmless.
_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  redis.call('ZADD', KEYS[1], ARGV[3], member)
end
return due
"""


class DueSchedule:
    """A sorted set of members (job ids, webhook ids) scored by when their next step is due."""

    def __init__(self, client: redis.Redis, key: str) -> None:
        self.key = key
        self._redis = client
        self._claim = client.register_script(_CLAIM)

    def put(self, pipe: redis.client.Pipeline | redis.Redis, member: str, due_at: float) -> None:
        """Make `member` due at `due_at` (replacing any earlier time)."""
        pipe.zadd(self.key, {member: due_at})

    def postpone(self, member: str, due_at: float) -> None:
        """Move a scheduled member to `due_at`; a member no longer scheduled stays unscheduled."""
        self._redis.zadd(self.key, {member: due_at}, xx=True)

    def remove(self, pipe: redis.client.Pipeline | redis.Redis, member: str) -> None:
        """Nothing more is due for `member`."""
        pipe.zrem(self.key, member)

    def claim(self, *, limit: int, lease_s: float, now: float | None = None) -> list[str]:
        """Take up to `limit` due members and hold them for `lease_s` seconds."""
        at = time.time() if now is None else now
        members = self._claim(keys=[self.key], args=[at, limit, at + lease_s])
        return [str(m) for m in members]

    def due_at(self, member: str) -> float | None:
        """When `member` is next due, or None if nothing is scheduled."""
        score = self._redis.zscore(self.key, member)
        return None if score is None else float(score)

    def next_due_at(self) -> float | None:
        """When the earliest member is due (a claimed one: when its lease ends)."""
        first = self._redis.zrange(self.key, 0, 0, withscores=True)
        return float(first[0][1]) if first else None  # type: ignore[index]

    def overdue_count(self, now: float | None = None) -> int:
        """How many members are due now (a backlog figure for metrics)."""
        return int(self._redis.zcount(self.key, "-inf", time.time() if now is None else now))

    def size(self) -> int:
        """How many members are scheduled at all."""
        return int(self._redis.zcard(self.key))
