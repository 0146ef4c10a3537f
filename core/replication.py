"""Waiting for a replica: a job accepted is held by one replica before its 202, when there is one.

Redis replicates asynchronously, so a write the master acknowledged can be lost if the master
dies before sending it on and Sentinel promotes the replica. `WAIT 1 <ms>` after the accept's
write makes that window the accepts a replica did not ack in time — counted and logged, the 202
answered anyway (availability over durability: the Idempotency-Key makes a client's retry safe).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

from core.keys import COUNTERS_KEY

log = logging.getLogger(__name__)

# How long a process trusts what INFO replication said about the master's replicas: a replica
# that joins (or a failover that leaves none) is noticed within this.
REPLICAS_RECHECK_S = 5.0
UNACKED_COUNTER = "jobs_accepted_without_replica_ack"


def replicas_to_wait_for(connected_replicas: int, wait_ms: int) -> int:
    """How many replicas an accept waits for: one when the master has any (and waiting is on)."""
    return 1 if connected_replicas > 0 and wait_ms > 0 else 0


class ReplicaAcks:
    """Whether the store's master has replicas (INFO replication, looked at again every
    REPLICAS_RECHECK_S), and what to do when none acked a write in time."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        wait_ms: int,
        recheck_s: float = REPLICAS_RECHECK_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = client
        self.wait_ms = wait_ms
        self.recheck_s = recheck_s
        self._clock = clock
        self._lock = threading.Lock()
        self._replicas = 0
        self._checked_at: float | None = None

    def to_wait_for(self) -> int:
        """How many replicas the next accept waits for (0: none, answer at once)."""
        if self.wait_ms <= 0:
            return 0
        now = self._clock()
        with self._lock:
            stale = self._checked_at is None or now - self._checked_at >= self.recheck_s
            if stale:
                self._checked_at = now  # one thread asks; the others use the last answer
        if stale:
            info = self.redis.info("replication")
            self._replicas = int(info.get("connected_slaves", 0))
        return replicas_to_wait_for(self._replicas, self.wait_ms)

    def not_acked(self, job_id: str) -> None:
        """No replica held the job within wait_ms: a failover now would lose it. Said, counted."""
        log.warning(
            "no replica acknowledged an accepted job in time",
            extra={"job_id": job_id, "wait_ms": self.wait_ms},
        )
        self.redis.hincrby(COUNTERS_KEY, UNACKED_COUNTER, 1)
