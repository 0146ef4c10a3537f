"""`GET /v1/jobs/{id}?wait=N`: answer as soon as the job is final, without polling Redis.

The store publishes every job id that turns final on one channel, in the same script that makes
it final (core/store.py, JOB_FINAL_CHANNEL). Each API process keeps one subscription to it, on a
thread of its own started at the first wait, and wakes the requests waiting on that id. A waiting
request holds one of the process's gunicorn threads (gthread), so a process takes at most
`slots` waits at once and keeps its other threads for everything else: a wait beyond that is
answered at once, with `Retry-After`.

A wait never trusts the channel alone: it registers before it reads the job (a job that turns
final between the read and the wait still wakes it), reads it again at least every RECHECK_S
(a message lost while the subscription was down), and after N s answers the job as it stands.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import redis

from core.jobs import Job
from core.store import JOB_FINAL_CHANNEL

log = logging.getLogger(__name__)

RECHECK_S = 5.0  # a wait reads its job again at least this often, whatever the channel says
LISTEN_POLL_S = 1.0  # how long the listener blocks for a message before it looks around
RECONNECT_BACKOFF_S = (0.1, 0.5, 1.0, 2.0)


class JobEndWaits:
    """This process's one subscription to jobs turning final, and the waits on them."""

    def __init__(self, client: redis.Redis, *, slots: int) -> None:
        self.client = client
        self.slots = threading.BoundedSemaphore(slots)
        self._waits: dict[str, set[threading.Event]] = {}
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._listener: threading.Thread | None = None
        self._closing = threading.Event()

    def wait_for_end(
        self, job_id: str, read: Callable[[], Job | None], timeout_s: float
    ) -> tuple[Job | None, bool]:
        """The job once final, or as it stands after `timeout_s`; and whether it was waited for
        (False: no wait slot was free, so it was read at once)."""
        if not self.slots.acquire(blocking=False):
            return read(), False
        try:
            self._start_listening()
            deadline = time.monotonic() + timeout_s
            with self._registered(job_id) as ended:
                job = read()
                while job is not None and not job.status.is_final:
                    left_s = deadline - time.monotonic()
                    if left_s <= 0:
                        break
                    ended.wait(min(left_s, RECHECK_S))
                    ended.clear()
                    job = read()
            return job, True
        finally:
            self.slots.release()

    @contextmanager
    def _registered(self, job_id: str) -> Iterator[threading.Event]:
        ended = threading.Event()
        with self._lock:
            self._waits.setdefault(job_id, set()).add(ended)
        try:
            yield ended
        finally:
            with self._lock:
                waits = self._waits.get(job_id)
                if waits is not None:
                    waits.discard(ended)
                    if not waits:
                        del self._waits[job_id]

    def _start_listening(self) -> None:
        """The listener thread, started by the first wait of the process (after gunicorn's
        fork: a thread does not survive one); returns once it is subscribed, or after a short
        while if Redis does not answer (the wait's rechecks cover that)."""
        with self._lock:
            if self._listener is None:
                self._listener = threading.Thread(
                    target=self._listen, name="job-end-listener", daemon=True
                )
                self._listener.start()
        self._subscribed.wait(LISTEN_POLL_S)

    def _listen(self) -> None:
        failures = 0
        while not self._closing.is_set():
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(JOB_FINAL_CHANNEL)
                while not self._closing.is_set():
                    message = pubsub.get_message(timeout=LISTEN_POLL_S)
                    if not self._subscribed.is_set() and pubsub.subscribed:
                        self._subscribed.set()
                        failures = 0
                    if message is not None and message.get("type") == "message":
                        self._wake(str(message["data"]))
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                self._subscribed.clear()
                self._wake_all()  # each reads its job again: an end may have gone unheard
                delay_s = RECONNECT_BACKOFF_S[min(failures, len(RECONNECT_BACKOFF_S) - 1)]
                # Once a spell: a Redis that stays down for minutes fills no log with it.
                log.log(
                    logging.WARNING if failures == 0 else logging.DEBUG,
                    "job-end subscription lost; subscribing again",
                    extra={"error": type(exc).__name__, "retry_in_s": delay_s},
                )
                failures += 1
                self._closing.wait(delay_s)
            finally:
                pubsub.close()

    def _wake(self, job_id: str) -> None:
        with self._lock:
            waits = list(self._waits.get(job_id, ()))
        for ended in waits:
            ended.set()

    def _wake_all(self) -> None:
        with self._lock:
            waits = [ended for group in self._waits.values() for ended in group]
        for ended in waits:
            ended.set()

    def close(self) -> None:
        """Stop the listener (tests; a gunicorn worker simply exits)."""
        self._closing.set()
        if self._listener is not None:
            self._listener.join(LISTEN_POLL_S * 2)
