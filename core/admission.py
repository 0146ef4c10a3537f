"""Upstream slots: at most RUNCOMFY_MAX_IN_FLIGHT jobs at RunComfy, across every worker, handed
out round-robin across clients so one team's burst never starves another team's job.

Each client waiting for a slot has a FIFO list of its queued jobs; the clients sit in a ring (a
sorted set scored by the turn each was last served in, newcomers first). Whenever slots are free, the
admitter takes the head job of the client served longest ago, one job per client per turn, and
makes that job due now. A job holds its slot from admission until it is final (JobStore releases
it in the same transaction as the final status).
"""

from __future__ import annotations

import time

import redis

from core.jobs import Job
from core.keys import PREFIX

IN_FLIGHT_KEY = PREFIX + "in_flight"
WAITING_CLIENTS_KEY = PREFIX + "waiting_clients"
WAITING_PREFIX = PREFIX + "waiting:"
ADMISSION_TURN_KEY = PREFIX + "admission_turn"
CLIENT_SLOTS_PREFIX = PREFIX + "in_flight:"  # each client's slots held, for its cap
CLIENT_CAPS_KEY = PREFIX + "client_caps"  # client id -> its max in flight
ADMIT_BUDGET = 500  # list entries looked at per call (dead entries of cancelled jobs included)
ADMISSION_RECHECK_S = 30.0  # a waiting job checks it is still in line this often

# The writes admission makes inside JobStore's atomic scripts, kept here so this module is the one
# owner of its keys. In JobStore's create script a new job joins its client's line and the client
# the ring: KEYS[3], KEYS[4] = line_keys(client); ARGV[2] job id, ARGV[4] client id.
JOIN_LINE_LUA = """
redis.call('RPUSH', KEYS[3], ARGV[2])
redis.call('ZADD', KEYS[4], 'NX', 0, ARGV[4])
"""
# In JobStore's commit script, once a job is final it gives back its slot: KEYS[3] = IN_FLIGHT_KEY,
# KEYS[10] = client_slots_key(client), ARGV[5] job id.
RELEASE_SLOT_LUA = """
redis.call('ZREM', KEYS[3], ARGV[5])
redis.call('ZREM', KEYS[10], ARGV[5])
"""

# KEYS: in_flight, waiting_clients, due_jobs, turn counter, clients' caps
# ARGV: max_in_flight, now, slot_expires_at, waiting-list prefix, budget, client-slots prefix
# A served client goes to the back of the ring: its score becomes the next turn number, which
# only ever grows (a clock could tie or step back between two calls). A client holding as many
# slots as its cap (`clients set-limits --max-in-flight`) yields its turn the same way, its jobs
# left in its line, so nobody waits behind it; once every client in the ring has yielded in a row,
# the call ends.
_ADMIT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
local free = tonumber(ARGV[1]) - redis.call('ZCARD', KEYS[1])
local admitted = {}
local budget = tonumber(ARGV[5])
local yielded_in_a_row = 0
while free > 0 and budget > 0 do
  local head = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #head == 0 then break end
  local client = head[1]
  budget = budget - 1
  local slots = ARGV[6] .. client
  local cap = tonumber(redis.call('HGET', KEYS[5], client) or '0')
  local at_cap = false
  if cap > 0 then
    redis.call('ZREMRANGEBYSCORE', slots, '-inf', ARGV[2])
    at_cap = redis.call('ZCARD', slots) >= cap
  end
  if at_cap then
    redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[4]), client)
    yielded_in_a_row = yielded_in_a_row + 1
    if yielded_in_a_row >= redis.call('ZCARD', KEYS[2]) then break end
  else
    yielded_in_a_row = 0
    local list = ARGV[4] .. client
    local job = redis.call('LPOP', list)
    if redis.call('LLEN', list) == 0 then
      redis.call('ZREM', KEYS[2], client)
    else
      redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[4]), client)
    end
    -- Only a live job (still scheduled) that holds no slot yet is admitted; cancelled or expired
    -- jobs left in the list are dropped here.
    if job and redis.call('ZSCORE', KEYS[3], job) and not redis.call('ZSCORE', KEYS[1], job) then
      redis.call('ZADD', KEYS[1], ARGV[3], job)
      redis.call('ZADD', slots, ARGV[3], job)
      redis.call('ZADD', KEYS[3], ARGV[2], job)
      admitted[#admitted + 1] = job
      free = free - 1
    end
  end
end
return admitted
"""


# KEYS: in_flight, the client's waiting list, waiting_clients, due_jobs
# ARGV: job id, client id, recheck_at
_STAY_IN_LINE = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
local put_back = 0
if not redis.call('LPOS', KEYS[2], ARGV[1]) then
  redis.call('RPUSH', KEYS[2], ARGV[1])
  redis.call('ZADD', KEYS[3], 'NX', 0, ARGV[2])
  put_back = 1
end
redis.call('ZADD', KEYS[4], 'XX', ARGV[3], ARGV[1])
return put_back
"""


class FairAdmission:
    """The global in-flight cap, with round-robin admission across clients."""

    def __init__(self, client: redis.Redis, *, due_jobs_key: str) -> None:
        self.redis = client
        self._due_jobs_key = due_jobs_key
        self._admit = client.register_script(_ADMIT)
        self._stay_in_line = client.register_script(_STAY_IN_LINE)

    @staticmethod
    def waiting_key(client_id: str) -> str:
        return WAITING_PREFIX + client_id

    @staticmethod
    def client_slots_key(client_id: str) -> str:
        return CLIENT_SLOTS_PREFIX + client_id

    @staticmethod
    def write_cap(pipe: redis.client.Pipeline, client_id: str, max_in_flight: int | None) -> None:
        """Queue the write of a client's cap on slots held at once (None: no cap)."""
        if max_in_flight is None:
            pipe.hdel(CLIENT_CAPS_KEY, client_id)
        else:
            pipe.hset(CLIENT_CAPS_KEY, client_id, max_in_flight)

    def client_in_flight(self, client_id: str, now: float | None = None) -> int:
        """Slots the client holds now."""
        return self.client_in_flight_of(self.redis, client_id, time.time() if now is None else now)

    @classmethod
    def client_in_flight_of(cls, client: redis.Redis, client_id: str, now: float) -> int:
        """Slots `client_id` holds at `now`, read from `client`."""
        return int(client.zcount(cls.client_slots_key(client_id), now, "+inf"))

    @classmethod
    def line_keys(cls, client_id: str) -> list[str]:
        """The keys JOIN_LINE_LUA writes for a job of `client_id`, in its order."""
        return [cls.waiting_key(client_id), WAITING_CLIENTS_KEY]

    def admit(
        self, *, max_in_flight: int, slot_ttl_s: float, now: float | None = None
    ) -> list[str]:
        """Hand free slots to waiting jobs, fairly; the admitted jobs become due now."""
        at = time.time() if now is None else now
        jobs = self._admit(
            keys=[
                IN_FLIGHT_KEY,
                WAITING_CLIENTS_KEY,
                self._due_jobs_key,
                ADMISSION_TURN_KEY,
                CLIENT_CAPS_KEY,
            ],
            args=[
                max_in_flight,
                at,
                at + slot_ttl_s,
                WAITING_PREFIX,
                ADMIT_BUDGET,
                CLIENT_SLOTS_PREFIX,
            ],
        )
        return [str(j) for j in jobs]

    def holds_slot(self, job_id: str) -> bool:
        """True once the job was admitted (until it is final)."""
        return self.redis.zscore(IN_FLIGHT_KEY, job_id) is not None

    def stay_in_line(self, job: Job, recheck_at: float) -> bool:
        """A queued job not admitted yet: put it back in its line if it is missing there (True
        if it was), and look at it again at `recheck_at`. One atomic call: a job admitted
        meanwhile is left alone — due now, holding its slot — not put back and postponed."""
        put_back = self._stay_in_line(
            keys=[IN_FLIGHT_KEY, self.waiting_key(job.client_id), WAITING_CLIENTS_KEY,
                  self._due_jobs_key],
            args=[job.id, job.client_id, recheck_at],
        )  # fmt: skip
        return bool(put_back)

    def in_flight(self) -> int:
        """Slots held now."""
        return int(self.redis.zcard(IN_FLIGHT_KEY))

    def waiting(self) -> int:
        """Jobs waiting for a slot (list entries, including not yet dropped dead ones)."""
        clients = self.redis.zrange(WAITING_CLIENTS_KEY, 0, -1)
        if not clients:
            return 0
        with self.redis.pipeline(transaction=False) as pipe:
            for client_id in clients:
                pipe.llen(self.waiting_key(str(client_id)))
            return int(sum(pipe.execute()))
