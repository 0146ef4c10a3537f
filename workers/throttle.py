"""A request-rate cap toward RunComfy shared by every worker (a token bucket in Redis), and a
global cool-down when RunComfy answers 429 — Celery's `rate_limit` is per worker and can do neither.
"""

from __future__ import annotations

import redis

from core.keys import PREFIX

BUCKET_KEY = PREFIX + "upstream:bucket"
COOL_DOWN_KEY = PREFIX + "upstream:cool_down_until"
DEFAULT_COOL_DOWN_S = 1.0  # a 429 without Retry-After pauses every worker this long

# Both scripts read Redis's clock (TIME), never a caller's: the callers are many threads on many
# hosts, and their clocks differ. With each caller's own time, a call stamped a little early
# moved the bucket back and the same interval was credited again (2,000 calls a second stamped
# up to 30 ms early got 10x a cap of 10/s through), and one host's clock ahead held every other
# host back by as much. Times are written with %.6f: tostring keeps only 14 digits (0.1 ms).
_NOW = "local t = redis.call('TIME') local now = tonumber(t[1]) + tonumber(t[2]) / 1000000"

# Returns the seconds to wait as a string (Redis would truncate a Lua number to an integer).
# A refused caller is given the next free moment after those already given one (`tail`, the
# last moment given out, +1/rate): when the tokens for all of them will have come. So 2,000 due
# jobs against a cap of 50/s come back spread over 40 s, not all again 20 ms later. (A newcomer
# may take a token first; the waiter it was meant for is then given a moment behind the rest.
# Callers told to wait out a cool-down all come back at its end: the burst goes, and the rest
# are spread as above.) A token taken up to 1 ms early leaves the bucket below zero: over time
# the cap holds. A wait is never 0: that is a grant.
_ACQUIRE = (
    _NOW
    + """
local cool = tonumber(redis.call('GET', KEYS[2]) or '0')
if cool > now then return string.format('%.6f', math.max(cool - now, 0.000001)) end
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at', 'tail')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
local tail = tonumber(state[3]) or 0
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local wait = 0
if tokens + 0.001 * rate >= 1 then
  tokens = tokens - 1
else
  tail = math.max(tail + 1 / rate, now + (1 - tokens) / rate)
  wait = math.max(tail - now, 0.000001)
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens),
  'at', string.format('%.6f', now), 'tail', string.format('%.6f', tail))
redis.call('EXPIRE', KEYS[1], 3600)
return string.format('%.6f', wait)
"""
)

# Extend (never shorten) the cool-down.
_COOL_DOWN = (
    _NOW
    + """
local until_at = now + tonumber(ARGV[1])
if until_at > tonumber(redis.call('GET', KEYS[1]) or '0') then
  redis.call('SET', KEYS[1], string.format('%.6f', until_at), 'PX',
    math.ceil(tonumber(ARGV[1]) * 1000) + 1000)
end
return 1
"""
)


class UpstreamThrottle:
    """Permission to make one RunComfy call now, or how long to wait for it."""

    def __init__(self, client: redis.Redis, *, rate_per_s: float) -> None:
        self.rate_per_s = rate_per_s
        self.burst = max(1.0, rate_per_s)
        self._acquire = client.register_script(_ACQUIRE)
        self._cool_down = client.register_script(_COOL_DOWN)

    def acquire(self) -> float:
        """0 if a call may be made now (one token taken); else seconds until one may."""
        return float(
            self._acquire(keys=[BUCKET_KEY, COOL_DOWN_KEY], args=[self.rate_per_s, self.burst])
        )

    def cool_down(self, seconds: float | None) -> None:
        """RunComfy said 429: no worker calls it again for `seconds` (default 1 s)."""
        wait = DEFAULT_COOL_DOWN_S if seconds is None else min(max(seconds, 0.0), 300.0)
        self._cool_down(keys=[COOL_DOWN_KEY], args=[wait])
