"""A request-rate cap toward RunComfy shared by every worker (a token bucket in Redis), and a
global cool-down when RunComfy answers 429 — Celery's `rate_limit` is per worker and can do neither.
"""

from __future__ import annotations

import time

import redis

from core.keys import PREFIX

BUCKET_KEY = PREFIX + "upstream:bucket"
COOL_DOWN_KEY = PREFIX + "upstream:cool_down_until"
DEFAULT_COOL_DOWN_S = 1.0  # a 429 without Retry-After pauses every worker this long

# Returns the seconds to wait as a string (Redis would truncate a Lua number to an integer).
# `at` never moves back: a caller whose clock is behind the last one's (a step that read the
# time a little earlier, another host) refills nothing. Letting it move back credited the same
# interval again at the next call: 2,000 calls a second stamped up to 30 ms early got 10x a cap.
# `waiting` counts the callers told to come back and not due yet (it drains at the rate): each
# refused caller is told the moment its own token will be there, behind the others, so 2,000
# due jobs against a cap of 50/s come back spread over 40 s, not all again 20 ms later.
# A token granted up to 1 ms early leaves the bucket below zero: the cap holds over time.
_ACQUIRE = """
local now = tonumber(ARGV[3])
local cool = tonumber(redis.call('GET', KEYS[2]) or '0')
if cool > now then return tostring(cool - now) end
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at', 'waiting')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
local waiting = tonumber(state[3]) or 0
if now > at then
  tokens = math.min(burst, tokens + (now - at) * rate)
  waiting = math.max(0, waiting - (now - at) * rate)
  at = now
end
local wait = 0
if tokens + 0.001 * rate >= 1 then  -- up to 1 ms early is on time (rounding of the times)
  tokens = tokens - 1
else
  waiting = waiting + 1
  wait = (at - now) + (waiting - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(at),
  'waiting', tostring(waiting))
redis.call('EXPIRE', KEYS[1], 3600)
return tostring(wait)
"""

# Extend (never shorten) the cool-down.
_COOL_DOWN = """
local until_at = tonumber(ARGV[1])
if until_at > tonumber(redis.call('GET', KEYS[1]) or '0') then
  redis.call('SET', KEYS[1], tostring(until_at), 'PX', math.ceil((until_at - tonumber(ARGV[2])) * 1000) + 1000)
end
return 1
"""


class UpstreamThrottle:
    """Permission to make one RunComfy call now, or how long to wait for it."""

    def __init__(self, client: redis.Redis, *, rate_per_s: float) -> None:
        self.rate_per_s = rate_per_s
        self.burst = max(1.0, rate_per_s)
        self._acquire = client.register_script(_ACQUIRE)
        self._cool_down = client.register_script(_COOL_DOWN)

    def acquire(self, now: float | None = None) -> float:
        """0 if a call may be made now (one token taken); else seconds until one may."""
        at = time.time() if now is None else now
        return float(
            self._acquire(keys=[BUCKET_KEY, COOL_DOWN_KEY], args=[self.rate_per_s, self.burst, at])
        )

    def cool_down(self, seconds: float | None, now: float | None = None) -> None:
        """RunComfy said 429: no worker calls it again for `seconds` (default 1 s)."""
        at = time.time() if now is None else now
        wait = DEFAULT_COOL_DOWN_S if seconds is None else min(seconds, 300.0)
        self._cool_down(keys=[COOL_DOWN_KEY], args=[at + wait, at])
