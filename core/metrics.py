"""Metrics shared by every replica: counters kept in Redis, exposed by the API's /metrics."""

from __future__ import annotations

import collections
import re
import threading
from collections.abc import Iterator

import redis
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from core.account import KINDS as ACCOUNT_TROUBLE_KINDS
from core.account import AccountState
from core.jobs import FINAL_STATUSES
from core.keys import COUNTERS_KEY
from core.limits import from_micro
from core.store import JobStore
from core.usage import (
    REFUSAL_KINDS,
    TIME_TO_RESULT_BUCKETS_S,
    UsageBook,
    time_to_result_bucket,
)

# Every counter the gateway keeps, with its help text: one place, so names cannot drift.
COUNTER_HELP = {
    "jobs_accepted": "Jobs accepted by POST /v1/jobs.",
    "jobs_accepted_without_replica_ack": (
        "Jobs accepted while the master had a replica that did not hold them within "
        "REDIS_REPLICA_WAIT_MS (a failover then would lose them)."
    ),
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
    "outputs_stored": "Output images copied into the media store.",
    "output_copy_failures": (
        "Copies of a finished run's output that failed (the job looks again; past "
        "OUTPUT_COPY_DEADLINE_S it succeeds with RunComfy's URLs, not stored)."
    ),
    "submit_outcome_unknown": "Submits whose outcome was unknown (possible duplicate generation).",
    "input_refused_input_invalid": (
        "Jobs failed before their submit: a picture is not an image, too big, or fails preflight "
        "(mask all black, sizes differ), or its upload is gone."
    ),
    "input_refused_input_unreachable": (
        "Jobs failed before their submit: a picture's URL could not be fetched (refused address, "
        "DNS, connection, timeout, non-2xx answer, redirect)."
    ),
    "account_refusals_out_of_balance": (
        "RunComfy calls refused because the account is out of balance (402, 400002); the jobs "
        "wait, none fails for it."
    ),
    "account_refusals_token_refused": (
        "RunComfy calls refused because the account's token is refused (401/403, 400004); the "
        "jobs wait, none fails for it."
    ),
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


# Counters split by one label whose values come from outside (RunComfy's words): name -> (label,
# help text). Each keeps at most MAX_LABEL_VALUES distinct values; the rest are counted under
# OTHER_LABEL_VALUE, so an upstream answering a new word every time cannot grow the metric (and
# every scrape) without end.
LABELLED_COUNTER_HELP = {
    "upstream_unknown_statuses": (
        "word",
        "Looks at a RunComfy request that answered a status word the gateway does not know; the "
        "request is followed on until a known end or the job's deadline.",
    ),
}
MAX_LABEL_VALUES = 20
MAX_LABEL_VALUE_CHARS = 32
OTHER_LABEL_VALUE = "other"
_LABEL_VALUE_UNSAFE = re.compile(r"[^a-z0-9_]")

# Count one label value in a labelled counter's hash, under `other` once the hash holds
# MAX_LABEL_VALUES values besides it (one call: concurrent flushes cannot pass the cap).
# KEYS: the counter's hash. ARGV: label value, amount, MAX_LABEL_VALUES, OTHER_LABEL_VALUE.
_ADD_LABELLED = """
local value = ARGV[1]
if redis.call('HEXISTS', KEYS[1], value) == 0 then
  local kept = redis.call('HLEN', KEYS[1]) - redis.call('HEXISTS', KEYS[1], ARGV[4])
  if kept >= tonumber(ARGV[3]) then value = ARGV[4] end
end
return redis.call('HINCRBY', KEYS[1], value, ARGV[2])
"""


def label_value(word: str) -> str:
    """`word` as a label value: lower case, [a-z0-9_] only, at most MAX_LABEL_VALUE_CHARS."""
    value = _LABEL_VALUE_UNSAFE.sub("_", word.strip().lower())[:MAX_LABEL_VALUE_CHARS]
    return value or OTHER_LABEL_VALUE


def labelled_counter_key(name: str) -> str:
    """The Redis hash of one labelled counter: label value -> count."""
    return f"{COUNTERS_KEY}:{name}"


class Counters:
    """Increment-only counters in one Redis hash (global across workers and API replicas).

    Buffered (workers): increments are kept in memory and written by flush(), once per dispatch
    instead of a Redis call per count; a killed worker loses at most one batch's counts.
    """

    def __init__(self, client: redis.Redis, *, buffered: bool = False) -> None:
        self.redis = client
        self.buffered = buffered
        self._pending: collections.Counter[str] = collections.Counter()
        self._pending_labelled: collections.Counter[tuple[str, str]] = collections.Counter()
        self._lock = threading.Lock()
        self._add_labelled = client.register_script(_ADD_LABELLED)

    def add(self, name: str, amount: int = 1) -> None:
        """Count `amount` more of `name` (a key of COUNTER_HELP)."""
        if name not in COUNTER_HELP:
            raise KeyError(f"unknown counter {name!r}")
        if not self.buffered:
            self.redis.hincrby(COUNTERS_KEY, name, amount)
            return
        with self._lock:
            self._pending[name] += amount

    def add_labelled(self, name: str, word: str, amount: int = 1) -> None:
        """Count `amount` more of `name` (a key of LABELLED_COUNTER_HELP) for `word`."""
        if name not in LABELLED_COUNTER_HELP:
            raise KeyError(f"unknown labelled counter {name!r}")
        value = label_value(word)
        if not self.buffered:
            self._count_labelled(self.redis, name, value, amount)
            return
        with self._lock:
            self._pending_labelled[name, value] += amount

    def flush(self) -> None:
        """Write buffered increments (one round trip)."""
        with self._lock:
            pending, self._pending = self._pending, collections.Counter()
            labelled, self._pending_labelled = self._pending_labelled, collections.Counter()
        if pending or labelled:
            with self.redis.pipeline(transaction=False) as pipe:
                for name, amount in pending.items():
                    pipe.hincrby(COUNTERS_KEY, name, amount)
                for (name, value), amount in labelled.items():
                    self._count_labelled(pipe, name, value, amount)
                pipe.execute()

    def _count_labelled(self, client: redis.Redis, name: str, value: str, amount: int) -> None:
        keys = [labelled_counter_key(name)]
        self._add_labelled(
            keys=keys, args=[value, amount, MAX_LABEL_VALUES, OTHER_LABEL_VALUE], client=client
        )

    def read(self) -> dict[str, int]:
        """Every counter's current value (0 for those never counted)."""
        raw = self.redis.hgetall(COUNTERS_KEY)
        values = {str(k): int(v) for k, v in raw.items()}
        return {name: values.get(name, 0) for name in COUNTER_HELP}

    def read_labelled(self, name: str) -> dict[str, int]:
        """One labelled counter's values: label value -> count (values never counted left out)."""
        raw = self.redis.hgetall(labelled_counter_key(name))
        return {str(k): int(v) for k, v in raw.items()}


GAUGE_HELP = {
    "jobs_live": "Jobs not yet final.",
    "jobs_steps_overdue": "Job steps due now and not yet taken.",
    "webhooks_pending": "Webhook events waiting for delivery.",
    "webhooks_overdue": "Webhook attempts due now and not yet taken.",
    "jobs_waiting_for_slot": "Queued jobs waiting for an upstream slot.",
    "upstream_in_flight": "Upstream slots held (cap RUNCOMFY_MAX_IN_FLIGHT).",
    "account_out_of_balance": "1 while RunComfy answers that the account is out of balance.",
    "account_token_refused": "1 while RunComfy refuses the account's token.",
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
        for name, (label, help_text) in LABELLED_COUNTER_HELP.items():
            yield CounterMetricFamily(f"inpaint_gateway_{name}", help_text, labels=[label])
        for name, help_text in GAUGE_HELP.items():
            yield GaugeMetricFamily(f"inpaint_gateway_{name}", help_text)

    def collect(self) -> Iterator[Metric]:
        """One sample per counter, plus live backlog gauges."""
        for name, value in self.counters.read().items():
            family = CounterMetricFamily(f"inpaint_gateway_{name}", COUNTER_HELP[name])
            family.add_metric([], value)
            yield family
        for name, (label, help_text) in LABELLED_COUNTER_HELP.items():
            labelled = CounterMetricFamily(f"inpaint_gateway_{name}", help_text, labels=[label])
            for word, count in sorted(self.counters.read_labelled(name).items()):
                labelled.add_metric([word], count)
            yield labelled
        for name, value in self._gauges().items():
            gauge = GaugeMetricFamily(f"inpaint_gateway_{name}", GAUGE_HELP[name])
            gauge.add_metric([], value)
            yield gauge
        yield from self._client_families()

    def _client_families(self) -> Iterator[Metric]:
        """Each client's figures, labelled by client id (clients are few: an operator makes
        each one)."""
        jobs = CounterMetricFamily(
            "inpaint_gateway_client_jobs", "Jobs that ended, by client and status.",
            labels=["client_id", "status"],
        )  # fmt: skip
        spend = CounterMetricFamily(
            "inpaint_gateway_client_spend_usd", "What the client's ended jobs cost (USD).",
            labels=["client_id"],
        )  # fmt: skip
        refusals = CounterMetricFamily(
            "inpaint_gateway_client_refusals",
            "POSTs refused by the client's limits, by kind.",
            labels=["client_id", "kind"],
        )
        ttr = HistogramMetricFamily(
            "inpaint_gateway_client_time_to_result_seconds",
            "Seconds from accept to final status, by client.",
            labels=["client_id"],
        )
        for client_id, figures in sorted(UsageBook(self.store.redis).client_metrics().items()):
            for status in sorted(s.value for s in FINAL_STATUSES):
                jobs.add_metric([client_id, status], figures.get(f"jobs_{status}", 0))
            spend.add_metric([client_id], from_micro(figures.get("spend", 0)))
            for kind in REFUSAL_KINDS:
                refusals.add_metric([client_id, kind], figures.get(f"refused_{kind}", 0))
            buckets, running = [], 0
            for bound in TIME_TO_RESULT_BUCKETS_S:
                label = time_to_result_bucket(bound)
                running += figures.get(f"ttr_{label}", 0)
                buckets.append((label, running))
            ttr.add_metric([client_id], buckets, figures.get("ttr_ms", 0) / 1000)
        yield from (jobs, spend, refusals, ttr)

    def _gauges(self) -> dict[str, int]:
        trouble = AccountState(self.store.redis).current()
        return {
            **{
                f"account_{kind}": int(trouble is not None and trouble.kind == kind)
                for kind in ACCOUNT_TROUBLE_KINDS
            },
            "jobs_live": self.store.job_schedule.size(),
            "jobs_steps_overdue": self.store.job_schedule.overdue_count(),
            "webhooks_pending": self.store.outbox.schedule.size(),
            "webhooks_overdue": self.store.outbox.schedule.overdue_count(),
            "jobs_waiting_for_slot": self.store.admission.waiting(),
            "upstream_in_flight": self.store.admission.in_flight(),
        }
