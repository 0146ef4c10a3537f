"""A request-rate cap toward RunComfy shared by every worker (a token bucket in Redis), and a
global cool-down when RunComfy answers 429 — Celery's `rate_limit` is per worker and can do neither.
"""

from __future__ import annotations

import redis

from core.keys import PREFIX

BUCKET_KEY = PREFIX + "upstream:bucket"
PLACES_KEY = PREFIX + "upstream:places"
DEFAULT_COOL_DOWN_S = 1.0  # a 429 without Retry-After pauses every worker this long
MAX_COOL_DOWN_S = 300.0
# A place given to a refused caller is held for it this long after its moment: a step comes
# back up to a dispatch tick (0.1 s) and a claim late. Until then, newcomers queue behind it.
PLACE_HELD_S = 0.25
PLACE_KEPT_S = 60.0  # a place not taken by then is dropped (its job ended, or its worker died)

# The bucket is a hash: `tokens` as of `at`, and `tail`, the last moment given to a refused
# caller; PLACES_KEY holds each refused caller's moment (a sorted set by caller id). Tokens come
# back at `rate` a second from `at`, up to `burst`; a cool-down moves `at` to its end, so none
# come back before it.
#
# Both scripts read Redis's clock (TIME), never a caller's: the callers are many threads on many
# hosts, and their clocks differ. With each caller's own time, a call stamped a little early
# moved the bucket back and the same interval was credited again (2,000 calls a second stamped
# up to 30 ms early got 10x a cap of 10/s through), and one host's clock ahead held every other
# host back by as much. Times are written with %.6f: tostring keeps only 14 digits (0.1 ms).
_STATE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at', 'tail')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
local tail = tonumber(state[3]) or 0
if now > at then
  tokens = math.min(burst, tokens + (now - at) * rate)
  at = now
end
local function store()
  redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens),
    'at', string.format('%.6f', at), 'tail', string.format('%.6f', tail))
  redis.call('EXPIRE', KEYS[1], 3600)
end
"""

# First come, first served. A refused caller is given a place: the next free moment after the
# places already given (`tail` + 1/rate), or when the next token comes if that is later. When it
# comes back at its moment, the token is its own: a newcomer queues behind every place held, so
# it cannot take that token and send the waiter to the back again (and again). So 2,000 due jobs
# against a cap of 50/s come back spread over 40 s, in the order they came — and the same after
# a cool-down, not all at its end. A caller back early keeps its place. A token taken up to 1 ms
# early leaves the bucket below zero: over time the cap holds. Returns the seconds to wait as a
# string (Redis would truncate a Lua number to an integer); a wait is never 0: that is a grant.
_ACQUIRE = (
    _STATE
    + """
local caller, held_s, kept_s = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - kept_s)
local mine = tonumber(redis.call('ZSCORE', KEYS[2], caller))
if mine and mine > now + 0.001 then
  return string.format('%.6f', math.max(mine - now, 0.000001))
end
local wait = 0
local ready = at + (1 - tokens) / rate
if mine and at <= now + 0.001 then
  redis.call('ZREM', KEYS[2], caller)
  tokens = tokens - 1
elseif ready <= now + 0.001 and redis.call('ZCOUNT', KEYS[2], now - held_s, '+inf') == 0 then
  tokens = tokens - 1
else  -- no token, a line ahead, or (for a place come due) a cool-down: to the back of the line
  tail = math.max(tail + 1 / rate, ready)
  wait = math.max(tail - now, 0.000001)
  redis.call('ZADD', KEYS[2], tail, caller)
  redis.call('EXPIRE', KEYS[2], 3600)
end
store()
return string.format('%.6f', wait)
"""
)

# Extend (never shorten) the cool-down. At its end one call may go, then one per 1/rate: the
# tokens saved up before the 429 are dropped, so the calls do not resume with a burst.
_COOL_DOWN = (
    _STATE
    + """
local until_at = now + tonumber(ARGV[3])
if until_at > at then
  at = until_at
  tokens = math.min(tokens, 1)
  store()
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

    def acquire(self, caller: str) -> float:
        """0 if `caller` (a job id) may make a call now (one token taken); else seconds until it
        may — its place in line, which it keeps until it comes back."""
        return float(
            self._acquire(
                keys=[BUCKET_KEY, PLACES_KEY],
                args=[self.rate_per_s, self.burst, caller, PLACE_HELD_S, PLACE_KEPT_S],
            )
        )

    def cool_down(self, seconds: float | None) -> None:
        """RunComfy said 429: no worker calls it again for `seconds` (default 1 s)."""
        wait = DEFAULT_COOL_DOWN_S if seconds is None else min(max(seconds, 0.0), MAX_COOL_DOWN_S)
        self._cool_down(keys=[BUCKET_KEY], args=[self.rate_per_s, self.burst, wait])
