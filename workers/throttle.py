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

# The bucket is a hash: `tokens` as of `at`, and `tail`, the last moment given to a caller told
# to wait. PLACES_KEY holds each waiting caller's moment (a sorted set by caller id). Tokens come
# back at `rate` a second from `at`, up to `burst`; a cool-down moves `at` to its end, so none
# come back before it.
#
# Both scripts read Redis's clock (TIME), never a caller's: the callers are many threads on many
# hosts, and their clocks differ. With each caller's own time, a call stamped a little early
# would move the bucket back and the same interval be credited again (at 2,000 calls a second
# stamped up to 30 ms early, 10x a cap of 10/s would get through), and one host's clock ahead
# would hold every other host back by as much. Times are written with %.6f: tostring keeps only 14 digits (0.1 ms).
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
local function moment(x) return string.format('%.6f', x) end
local function store()
  redis.call('HSET', KEYS[1], 'tokens', moment(tokens), 'at', moment(at), 'tail', moment(tail))
  redis.call('EXPIRE', KEYS[1], 3600)
end
"""

# First come, first served, and never past the cap. A caller is granted a call only when a token
# is there. One told to wait is given a place: the next free moment after the places already
# given (`tail` + 1/rate), or when the next token comes if that is later; until 0.25 s past every
# place held, newcomers queue behind them, so none takes the token of a waiter coming back and
# sends it to the back again (and again). A waiter back at its moment takes its token. One that
# finds none — it came back late, with more others than the tokens saved up meanwhile — goes to
# the back of the line: the places of those that came on time stay theirs (each moment is given
# once). So 2,000 due jobs against a cap of 50/s come back spread over 40 s, in the order they
# came. A caller back early keeps its place. A token taken up to 1 ms early leaves the bucket
# below zero: over time the cap holds. A caller that can do without the call (ARGV[6] = 1) is
# refused without a place. Returns the seconds to wait as a string (Redis would truncate a Lua
# number to an integer); a wait is never 0: that is a grant.
_ACQUIRE = (
    _STATE
    + """
local caller, held_s, kept_s, optional = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - kept_s)
local mine = tonumber(redis.call('ZSCORE', KEYS[2], caller))
if mine and mine > now + 0.001 then
  return moment(math.max(mine - now, 0.000001))
end
local wait = 0
local ready = at + (1 - tokens) / rate
if ready <= now + 0.001 and (mine or redis.call('ZCOUNT', KEYS[2], now - held_s, '+inf') == 0) then
  if mine then redis.call('ZREM', KEYS[2], caller) end
  tokens = tokens - 1
elseif optional == '1' then
  wait = math.max(ready - now, 0.000001)
else
  tail = math.max(tail + 1 / rate, ready)
  wait = math.max(tail - now, 0.000001)
  redis.call('ZADD', KEYS[2], moment(tail), caller)
  redis.call('EXPIRE', KEYS[2], 3600)
end
store()
return moment(wait)
"""
)

# Extend (never shorten) the cool-down. At its end one call may go, then one per 1/rate: the
# tokens saved up before the 429 are dropped, so the calls do not resume with a burst. Every
# place held moves back by the pause added, so the line keeps its order (at most one entry per
# job in flight: one pass over them per 429 that extends the pause by more than 50 ms).
_COOL_DOWN = (
    _STATE
    + """
local until_at = now + tonumber(ARGV[3])
if until_at > at + 0.05 then  -- 429s a few ms apart: one pass over the places, not one each
  local pause = until_at - at
  at = until_at
  tokens = math.min(tokens, 1)
  tail = tail + pause
  local places = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  for i = 1, #places, 2 do
    redis.call('ZADD', KEYS[2], moment(tonumber(places[i + 1]) + pause), places[i])
  end
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
        return self._call(caller, optional=False)

    def acquire_if_free(self, caller: str) -> bool:
        """A call now if a token is there and no one waits in line for it (one token taken);
        else no, and no place taken: for a call a step can do without, or leave to the next."""
        return self._call(caller, optional=True) <= 0

    def _call(self, caller: str, *, optional: bool) -> float:
        return float(
            self._acquire(
                keys=[BUCKET_KEY, PLACES_KEY],
                args=[
                    self.rate_per_s, self.burst, caller, PLACE_HELD_S, PLACE_KEPT_S,
                    "1" if optional else "0",
                ],
            )
        )  # fmt: skip

    def cool_down(self, seconds: float | None) -> None:
        """RunComfy said 429: no worker calls it again for `seconds` (default 1 s)."""
        wait = DEFAULT_COOL_DOWN_S if seconds is None else min(max(seconds, 0.0), MAX_COOL_DOWN_S)
        self._cool_down(keys=[BUCKET_KEY, PLACES_KEY], args=[self.rate_per_s, self.burst, wait])
