"""At most WEBHOOK_RECEIVER_CONCURRENCY attempts in flight per receiver, across every worker.

A receiver is a client's webhook origin (scheme, host, port): one team's slow receiver can hold
that many attempt threads, never all of them, and it is not sent more at once than that. An
attempt beyond the cap waits in the receiver's line, in order; when an attempt there ends, as many
of the first in line as there are places free are made due at once. A waiting attempt is also due
when the oldest attempt in flight must have ended (its lease), so a line moves on even if a worker
dies holding a place. An attempt that ends can hand its place straight to the first in line, so a
busy receiver's line moves at the speed of its answers, not of dispatches.

Only an attempt still parked — its schedule entry exactly as the line left it — is made due: one
that a dispatch has claimed since is already on its way, and moving its entry would let a second
dispatch claim it too.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from urllib.parse import urlsplit

import redis

from core.http.egress import DEFAULT_PORTS
from core.keys import PREFIX

LINE_PREFIX = PREFIX + "receiver:"
# When nothing is in flight but attempts ahead in line are on their way: look again this soon.
SETTLE_S = 1.0

# The places free, and whether `id` (waiting, or new: behind everyone) is among the first that
# many live attempts in line. Attempts whose event is no longer scheduled leave the line here
# (the head of a line is looked at up to 32 entries past the places free).
_HEAD = """
local function may_go(id, now, cap)
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  local free = cap - redis.call('ZCARD', KEYS[1])
  if free <= 0 then return false end
  local live = 0
  for _, w in ipairs(redis.call('ZRANGE', KEYS[2], 0, free + 31)) do
    if w == id then return true end
    if redis.call('ZSCORE', KEYS[3], w) then
      live = live + 1
      if live >= free then return false end
    else
      redis.call('ZREM', KEYS[2], w)
      redis.call('HDEL', KEYS[4], w)
    end
  end
  return true
end
"""

# KEYS: in flight (webhook id -> lease end), waiting (webhook id -> since), webhook schedule,
# parked (webhook id -> the schedule score the line gave it).
# ARGV: webhook id, now, lease end, cap, key ttl in ms, settle seconds.
# Returns "" when the attempt may go now, else when it is due at the latest (as a string: Redis
# would truncate a Lua number).
_ENTER = (
    _HEAD
    + """
local id, now = ARGV[1], tonumber(ARGV[2])
if may_go(id, now, tonumber(ARGV[4])) then
  redis.call('ZADD', KEYS[1], ARGV[3], id)
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  redis.call('ZREM', KEYS[2], id)
  redis.call('HDEL', KEYS[4], id)
  return ''
end
redis.call('ZADD', KEYS[2], 'NX', now, id)
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local due = oldest[2] or tostring(now + tonumber(ARGV[6]))
redis.call('ZADD', KEYS[3], 'XX', due, id)
redis.call('HSET', KEYS[4], id, due)
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('PEXPIRE', KEYS[4], ARGV[5])
return due
"""
)

# KEYS as above. ARGV: webhook id, now, cap, lease end or "" (hand the place over), key ttl in ms.
# The attempt leaves (its place, or its place in line). With a lease end, the first attempt still
# parked in line is handed the place: claimed for the caller under that lease, as a dispatch's
# claim and an enter would leave it. The next parked ones, up to the places free, are made due
# now. Returns {the id handed over or "", how many were made due}.
_LEAVE = """
local now, cap, lease_end = tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local free = cap - redis.call('ZCARD', KEYS[1])
local handed, made_due, taken = '', 0, 0
if free <= 0 then return {handed, made_due} end
for _, w in ipairs(redis.call('ZRANGE', KEYS[2], 0, free + 31)) do
  local score = redis.call('ZSCORE', KEYS[3], w)
  if not score then
    redis.call('ZREM', KEYS[2], w)
    redis.call('HDEL', KEYS[4], w)
  else
    local parked = redis.call('HGET', KEYS[4], w)
    local still_parked = parked and tonumber(parked) == tonumber(score)
    if still_parked and lease_end ~= '' and handed == '' then
      redis.call('ZADD', KEYS[3], lease_end, w)
      redis.call('ZADD', KEYS[1], lease_end, w)
      redis.call('PEXPIRE', KEYS[1], ARGV[5])
      redis.call('ZREM', KEYS[2], w)
      redis.call('HDEL', KEYS[4], w)
      handed = w
    elseif still_parked and tonumber(score) > now then
      redis.call('ZADD', KEYS[3], ARGV[2], w)
      redis.call('HSET', KEYS[4], w, ARGV[2])
      made_due = made_due + 1
    end
    taken = taken + 1  -- handed over, made due now, or claimed already: on its way to a place
    if taken >= free then break end
  end
end
return {handed, made_due}
"""


@dataclass(frozen=True)
class Left:
    """What an attempt leaving its receiver's line set going."""

    handed_over: str | None  # the next attempt in line, claimed for the caller with its place
    made_due: int  # attempts in line now due, for a dispatch to take


def receiver_of(client_id: str, url: str) -> str:
    """The line a webhook URL's attempts stand in: the client's receiver origin."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or DEFAULT_PORTS.get(scheme, 0)
    origin = f"{scheme}://{(parts.hostname or '').lower()}:{port}"
    # Hashed: a key stays short and plain whatever the URL holds.
    return hashlib.sha256(f"{client_id} {origin}".encode()).hexdigest()[:32]


class ReceiverLines:
    """Places in flight per receiver, and the line for them, in Redis."""

    def __init__(
        self, client: redis.Redis, *, schedule_key: str, concurrency: int, lease_s: float
    ) -> None:
        self.concurrency = concurrency
        self.lease_s = lease_s
        self._redis = client
        self._schedule_key = schedule_key
        self._enter = client.register_script(_ENTER)
        self._leave = client.register_script(_LEAVE)

    def enter(self, receiver: str, webhook_id: str, now: float) -> float | None:
        """None: the attempt may go now (a place is held until leave). Else it waits in line,
        due again when its turn comes or, at the latest, at the returned time."""
        answer = self._enter(
            keys=self._keys(receiver),
            args=[
                webhook_id, now, now + self.lease_s, self.concurrency, self._ttl_ms(), SETTLE_S
            ],
        )  # fmt: skip
        return float(answer) if answer else None

    def leave(self, receiver: str, webhook_id: str, now: float, *, hand_over: bool = False) -> Left:
        """The attempt is over (or its event is): free its place, or its place in line.

        With hand_over, the place goes straight to the first attempt in line, claimed for the
        caller, who must make it (or let its lease end); the next ones are made due.
        """
        lease_end = now + self.lease_s if hand_over else ""
        handed, made_due = self._leave(
            keys=self._keys(receiver),
            args=[webhook_id, now, self.concurrency, lease_end, self._ttl_ms()],
        )
        return Left(handed_over=handed or None, made_due=int(made_due))

    def in_flight(self, receiver: str) -> int:
        """Attempts holding a place now (leases of killed workers included until they end)."""
        return int(self._redis.zcard(self._keys(receiver)[0]))

    def _keys(self, receiver: str) -> list[str]:
        base = LINE_PREFIX + receiver
        return [base + ":in_flight", base + ":waiting", self._schedule_key, base + ":parked"]

    def _ttl_ms(self) -> int:
        return int((2 * self.lease_s + 60) * 1000)
