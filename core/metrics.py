"""Metrics shared by every replica: counters kept in Redis, exposed by the API's /metrics."""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterator

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from core.keys import COUNTERS_KEY
from core.store import JobStore

# Every counter the gateway keeps, with its help text: one place, so names cannot drift.
COUNTER_HELP = {
    "jobs_accepted": "Jobs accepted by POST /v1/jobs.",
    "jobs_finished_succeeded": "Jobs that ended succeeded.",
    "jobs_finished_failed": "Jobs that ended failed.",
    "jobs_finished_cancelled": "Jobs that ended cancelled.",
    "jobs_finished_expired": "Jobs that ended expired (deadline).",
    "upstream_submits": "Submit calls made to RunComfy.",
    "upstream_polls": "Status/result calls made to RunComfy.",
    "upstream_cancels": "Cancel calls made to RunComfy.",
    "upstream_transient_errors": "RunComfy calls that failed in a way worth retrying.",
    "upstream_calls_postponed": (
        "Job steps postponed by the shared RunComfy request-rate cap (RUNCOMFY_MAX_RPS) or a "
        "429's cool-down."
    ),
    "submit_outcome_unknown": "Submits whose outcome was unknown (possible duplicate generation).",
    "webhook_attempts": "Webhook delivery attempts.",
    "webhook_delivered": "Webhook events delivered (2xx).",
    "webhook_failed_attempts": "Webhook attempts that did not get a 2xx.",
    "webhook_exhausted": "Webhook events that ran out of retries.",
    "webhook_attempts_waited": (
        "Webhook attempts put back in their receiver's line: it had WEBHOOK_RECEIVER_CONCURRENCY "
        "attempts in flight."
    ),
    "webhook_places_handed_over": (
        "Receiver places handed by an ended attempt straight to the next attempt in line."
    ),
}


class Counters:
    """Increment-only counters in one Redis hash (global across workers and API replicas).

    Buffered (workers): increments are kept in memory and written by flush(), once per dispatch
    instead of a Redis call per count; a killed worker loses at most one batch's counts.
    """

    def __init__(self, client: redis.Redis, *, buffered: bool = False) -> None:
        self.redis = client
        self.buffered = buffered
        self._pending: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def add(self, name: str, amount: int = 1) -> None:
        """Count `amount` more of `name` (a key of COUNTER_HELP)."""
        if name not in COUNTER_HELP:
            raise KeyError(f"unknown counter {name!r}")
        if not self.buffered:
            self.redis.hincrby(COUNTERS_KEY, name, amount)
            return
        with self._lock:
            self._pending[name] += amount

    def flush(self) -> None:
        """Write buffered increments (one round trip)."""
        with self._lock:
            pending, self._pending = self._pending, collections.Counter()
        if pending:
            with self.redis.pipeline(transaction=False) as pipe:
                for name, amount in pending.items():
                    pipe.hincrby(COUNTERS_KEY, name, amount)
                pipe.execute()

    def read(self) -> dict[str, int]:
        """Every counter's current value (0 for those never counted)."""
        raw = self.redis.hgetall(COUNTERS_KEY)
        values = {str(k): int(v) for k, v in raw.items()}
        return {name: values.get(name, 0) for name in COUNTER_HELP}


GAUGE_HELP = {
    "jobs_live": "Jobs not yet final.",
    "jobs_steps_overdue": "Job steps due now and not yet taken.",
    "webhooks_pending": "Webhook events waiting for delivery.",
    "webhooks_overdue": "Webhook attempts due now and not yet taken.",
    "jobs_waiting_for_slot": "Queued jobs waiting for an upstream slot.",
    "upstream_in_flight": "Upstream slots held (cap RUNCOMFY_MAX_IN_FLIGHT).",
}


class GatewayCollector(Collector):
    """Reads counters and queue figures from Redis at scrape time."""

    def __init__(self, store: JobStore, counters: Counters) -> None:
        self.store = store
        self.counters = counters

    def describe(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        """The metrics without their values: registering needs no Redis (it may be down)."""
        for name, help_text in COUNTER_HELP.items():
            yield CounterMetricFamily(f"inpaint_gateway_{name}", help_text)
        for name, help_text in GAUGE_HELP.items():
            yield GaugeMetricFamily(f"inpaint_gateway_{name}", help_text)

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        """One sample per counter, plus live backlog gauges."""
        for name, value in self.counters.read().items():
            family = CounterMetricFamily(f"inpaint_gateway_{name}", COUNTER_HELP[name])
            family.add_metric([], value)
            yield family
        for name, value in self._gauges().items():
            gauge = GaugeMetricFamily(f"inpaint_gateway_{name}", GAUGE_HELP[name])
            gauge.add_metric([], value)
            yield gauge

    def _gauges(self) -> dict[str, int]:
        return {
            "jobs_live": self.store.job_schedule.size(),
            "jobs_steps_overdue": self.store.job_schedule.overdue_count(),
            "webhooks_pending": self.store.outbox.schedule.size(),
            "webhooks_overdue": self.store.outbox.schedule.overdue_count(),
            "jobs_waiting_for_slot": self.store.admission.waiting(),
            "upstream_in_flight": self.store.admission.in_flight(),
        }
