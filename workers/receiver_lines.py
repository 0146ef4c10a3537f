"""At most WEBHOOK_RECEIVER_CONCURRENCY attempts in flight per receiver, across every worker.

A receiver is a client's webhook origin (scheme, host, port): one team's slow receiver can hold
that many attempt threads, never all of them, and it is not hammered with more than it can
answer. An attempt beyond the cap waits in the receiver's line; when an attempt there ends, the
first in line is made due at once. Each waiting attempt is also made due when the oldest attempt
in flight must have ended (its lease), so a line moves on even if a worker dies holding a place.
"""

from __future__ import annotations

import hashlib
from urllib.parse import urlsplit

import redis

from core.keys import PREFIX

LINE_PREFIX = PREFIX + "receiver:"
DEFAULT_PORTS = {"http": 80, "https": 443}

# KEYS: in flight (webhook id -> lease end), waiting (webhook id -> since), webhook schedule.
# ARGV: webhook id, now, lease end, cap, key ttl in ms.
# Returns "" when the attempt may go now, else when it is due at the latest (as a string: Redis
# would truncate a Lua number).
_ENTER = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[4]) then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  redis.call('ZREM', KEYS[2], ARGV[1])
  return ''
end
redis.call('ZADD', KEYS[2], 'NX', ARGV[2], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
redis.call('ZADD', KEYS[3], 'XX', oldest[2], ARGV[1])
return oldest[2]
"""

# KEYS as above. ARGV: webhook id, now. Frees the place and makes the first still-scheduled
# attempt in line due now; returns its webhook id, or false if the line is empty.
_LEAVE = """
redis.call('ZREM', KEYS[1], ARGV[1])
for _ = 1, 20 do
  local first = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
  if not first then return false end
  redis.call('ZREM', KEYS[2], first)
  if redis.call('ZSCORE', KEYS[3], first) then
    redis.call('ZADD', KEYS[3], ARGV[2], first)
    return first
  end
end
return false
"""


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
        """None: the attempt may go now (a place is held until leave). Else it stays in line,
        due again when a place frees or, at the latest, at the returned time."""
        answer = self._enter(
            keys=self._keys(receiver),
            args=[webhook_id, now, now + self.lease_s, self.concurrency, self._ttl_ms()],
        )
        return float(answer) if answer else None

    def leave(self, receiver: str, webhook_id: str, now: float) -> str | None:
        """Free the attempt's place; the webhook id made due next in its stead, if any."""
        first = self._leave(keys=self._keys(receiver), args=[webhook_id, now])
        return str(first) if first else None

    def in_flight(self, receiver: str) -> int:
        """Attempts holding a place now (leases of killed workers included until they end)."""
        return int(self._redis.zcard(self._keys(receiver)[0]))

    def _keys(self, receiver: str) -> list[str]:
        base = LINE_PREFIX + receiver
        return [base + ":in_flight", base + ":waiting", self._schedule_key]

    def _ttl_ms(self) -> int:
        return int((2 * self.lease_s + 60) * 1000)
