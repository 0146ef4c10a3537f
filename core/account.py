"""The paid RunComfy account's own trouble, seen by every worker and API replica through Redis.

RunComfy answers out of balance (402, `400002`) or refuses the token (401/403, `400004`) for the
account, not for a job (PRODUCT §9): no job is failed for it. A worker refused so reports it
here; while it lasts, queued jobs wait instead of each sending a doomed submit — one submit per
PROBE_INTERVAL_S across all workers tries whether it is over (`take_probe`), the other jobs come
back within RECHECK_S. The first submit accepted again clears it (a look answered again clears
a refused token), and the jobs that waited on it are made due at once (`take_waiting`).
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from core.keys import PREFIX

OUT_OF_BALANCE = "out_of_balance"
TOKEN_REFUSED = "token_refused"
KINDS = (OUT_OF_BALANCE, TOKEN_REFUSED)
TROUBLE_KEY = PREFIX + "account:trouble"  # hash: kind, since, detail
PROBE_KEY = PREFIX + "account:probe"
WAITING_KEY = PREFIX + "account:waiting"  # sorted set: job ids waiting on the account
PROBE_INTERVAL_S = 10.0  # at most one probe submit per this, across all workers
RECHECK_S = 30.0  # PRODUCT §9: a job waiting on the account is re-checked at least this often
WAIT_MIN_S = 20.0  # a job not probing comes back between this and RECHECK_S (spread out)
# A report not renewed this long is forgotten: with no job left to probe (nothing queued), a
# spell nobody sees end would otherwise be reported by /readyz for ever. Waiting jobs renew it
# every RECHECK_S at most.
TROUBLE_TTL_S = 300

# KEYS: trouble. ARGV: kind, detail, now, ttl. A spell of the same kind keeps its `since`.
# Returns 1 if a spell (or a new kind of trouble) begins.
_REPORT = """
local was = redis.call('HGET', KEYS[1], 'kind')
redis.call('HSET', KEYS[1], 'kind', ARGV[1], 'detail', ARGV[2])
if was ~= ARGV[1] then redis.call('HSET', KEYS[1], 'since', ARGV[3]) end
redis.call('EXPIRE', KEYS[1], ARGV[4])
if was ~= ARGV[1] then return 1 end
return 0
"""

# KEYS: trouble. ARGV: the kind to clear ('' for any). Returns 1 if a spell was cleared.
_CLEAR = """
local was = redis.call('HGET', KEYS[1], 'kind')
if not was or (ARGV[1] ~= '' and was ~= ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""

# KEYS: waiting. Every job id waiting on the account, the set emptied in the same step.
_TAKE_WAITING = """
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
redis.call('DEL', KEYS[1])
return ids
"""


@dataclass(frozen=True)
class AccountTrouble:
    """What is wrong with the account: `kind` (OUT_OF_BALANCE or TOKEN_REFUSED), since when
    (epoch s), and RunComfy's last words on it."""

    kind: str
    since: float
    detail: str


class AccountState:
    """The account's trouble, if any, in Redis (one record for the whole deployment)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._report = client.register_script(_REPORT)
        self._clear = client.register_script(_CLEAR)
        self._take_waiting = client.register_script(_TAKE_WAITING)

    def current(self) -> AccountTrouble | None:
        """The trouble the account is in now, or None when it is fine (as last seen)."""
        raw: dict[str, str] = self.redis.hgetall(TROUBLE_KEY)  # type: ignore[assignment]
        try:
            return AccountTrouble(raw["kind"], float(raw["since"]), raw.get("detail", ""))
        except (KeyError, ValueError):
            return None

    def report(self, kind: str, detail: str, now: float) -> bool:
        """RunComfy refused a call for the account (`kind`); True if a spell begins now."""
        assert kind in KINDS, kind
        return bool(self._report(keys=[TROUBLE_KEY], args=[kind, detail, now, TROUBLE_TTL_S]))

    def clear(self, kind: str | None = None) -> bool:
        """RunComfy took a call again: the trouble (only of `kind`, if given) is over. True if
        there was one (the caller then wakes the jobs that waited on it)."""
        return bool(self._clear(keys=[TROUBLE_KEY], args=[kind or ""]))

    def take_probe(self) -> bool:
        """The right to send the one submit that tries whether the trouble is over (one per
        PROBE_INTERVAL_S across all workers)."""
        return bool(self.redis.set(PROBE_KEY, "1", nx=True, px=int(PROBE_INTERVAL_S * 1000)))

    def note_waiting(self, job_id: str, now: float) -> None:
        """`job_id` waits on the account: it is made due as soon as the trouble is over."""
        self.redis.zadd(WAITING_KEY, {job_id: now})

    def take_waiting(self) -> list[str]:
        """Every job waiting on the account, no longer noted as waiting."""
        return [str(job_id) for job_id in self._take_waiting(keys=[WAITING_KEY])]
