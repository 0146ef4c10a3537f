"""What a client can ask of its jobs: accept one, cancel one, have its final webhook sent again."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from core.clients import Client
from core.http.egress import EgressPolicy, RefusedDestination
from core.inputs import NO_SUCH_UPLOAD, InputRefused, resolve_inputs
from core.jobs import Job, Status, new_job
from core.limits import budget_window, to_micro
from core.metrics import Counters
from core.settings import Settings
from core.store import IdempotencyClaim, JobStore, Step
from core.uploads import UPLOAD_REF_PREFIX, UploadStore
from core.usage import AcceptLimits
from core.wakeups import DISPATCH_JOBS_TASK, Wakeups
from core.webhooks import PENDING, TERMINAL_EVENT_TYPES, build_event

# The model makes one picture per job (it has no field asking for more): a job's estimated cost
# is the list price of one output image.
IMAGES_PER_JOB = 1


class CommandRefused(Exception):
    """The request is well-formed but cannot be done now (HTTP 409)."""


class WebhookUrlRefused(ValueError):
    """The webhook URL may not be called (HTTP 422 on `webhook_url`)."""


class PriceUnknown(Exception):
    """A budget needs the job's estimated cost, and the list price is not known (HTTP 503)."""


@dataclass(frozen=True)
class Accepted:
    """What an accept did."""

    job: Job
    is_new: bool  # False: the Idempotency-Key's first job
    rate_remaining: int | None  # POSTs left in the client's rate window, if it has one
    rate_reset_s: int = 0  # until that window is whole again


@dataclass
class JobCommands:
    """Job operations behind the HTTP API."""

    store: JobStore
    settings: Settings
    counters: Counters
    wakeups: Wakeups
    egress: EgressPolicy
    # The model's list price per output image (USD), or None while unknown: a budget reserves
    # a job's estimated cost at accept.
    list_price_usd: Callable[[], float | None]
    uploads: UploadStore

    def accept(
        self,
        client: Client,
        body: dict[str, Any],
        input_fields: tuple[str, ...],
        idempotency_key: str | None = None,
    ) -> Accepted:
        """Store a validated job request as a queued job and wake the workers.

        Its data URIs are kept as uploads of the client, and the job names them by their refs.
        Raises InputRefused if a picture held here (a data URI, an upload) or the pair is not
        fit, IdempotencyMismatch if the key came before with another body, LimitRefused if
        one of the client's limits would be passed, PriceUnknown if its budget cannot be
        checked; no job is stored then. The media store's errors (MediaStoreError, OSError)
        pass through.
        """
        webhook_url = body.get("webhook_url")
        if webhook_url is not None:
            self.check_webhook_url(webhook_url)
        client_id = client.id
        now = time.time()
        resolved = resolve_inputs(
            client_id, {name: body[name] for name in input_fields}, self.uploads, now
        )
        job = new_job(
            client_id=client_id,
            input=resolved.input,
            webhook_url=webhook_url,
            webhook_events=tuple(body["webhook_events"]),
            metadata=body.get("metadata"),
            deadline_s=self.settings.job_deadline_s,
        )
        self._keep_uploads(job, resolved.upload_ids, now)
        job, limits = self._limits_for(client, job)
        claim = IdempotencyClaim(client_id, idempotency_key, body) if idempotency_key else None
        wakeup = self.wakeups.pending(DISPATCH_JOBS_TASK)
        created = self.store.create(job, idempotency=claim, wakeup=wakeup, limits=limits)
        if not created.is_new:
            first = self.store.get_for_client(client_id, created.job_id)
            if first is None:
                raise CommandRefused(f"the Idempotency-Key's job {created.job_id} no longer exists")
            return Accepted(first, is_new=False, rate_remaining=None)
        if created.wakeup_claimed:
            self.wakeups.send(wakeup.task_name)
        return Accepted(job, True, created.rate_remaining, created.rate_reset_s)

    def _keep_uploads(self, job: Job, upload_ids: tuple[str, ...], now: float) -> None:
        """Keep each upload the job uses as long as the job lives (its record included)."""
        until = job.deadline_at + self.settings.job_retention_s
        for upload_id in upload_ids:
            if self.uploads.keep_until(job.client_id, upload_id, until, now) is None:
                ref = UPLOAD_REF_PREFIX + upload_id  # expired since it was checked
                raise InputRefused(
                    {name: NO_SUCH_UPLOAD for name, value in job.input.items() if value == ref}
                )

    def _limits_for(self, client: Client, job: Job) -> tuple[Job, AcceptLimits]:
        """The job with its budget reservation, and the limits its accept is checked against."""
        limits = client.limits
        if limits.budget_period is None:
            return job, AcceptLimits(client.id, limits, None, 0)
        price = self.list_price_usd()
        if price is None:
            raise PriceUnknown(
                "the model's list price is not known yet, so the budget cannot be checked"
            )
        estimate = price * IMAGES_PER_JOB
        window = budget_window(limits.budget_period, job.created_at)
        reserved = replace(job, reserved_usd=estimate, reserved_in=window.id)
        return reserved, AcceptLimits(client.id, limits, window, to_micro(estimate))

    def check_webhook_url(self, url: str) -> None:
        """Refuse a webhook URL we would not deliver to (checked again at every attempt)."""
        try:
            self.egress.check_url(url)
        except (RefusedDestination, ValueError) as exc:
            raise WebhookUrlRefused(str(exc)) from None

    def cancel(self, job: Job) -> Job:
        """Cancel now if RunComfy has not got the job; otherwise ask the workers to cancel it."""
        now = time.time()

        def request_cancel(j: Job) -> Step | None:
            if j.status.is_final:
                return None
            if j.status is Status.QUEUED and j.submit_started_at is None:
                cancelled = j.moved_to(Status.CANCELLED, now, cancel_requested=True)
                return Step(cancelled.with_cost(0.0, "list_price"), None)  # never at RunComfy
            if j.cancel_requested:
                return None  # asked for before: on its way (again would only force a step)
            return Step(j.changed(now, cancel_requested=True), now)

        committed = self.store.change(job.id, request_cancel)
        if committed is None:
            current = self.store.get(job.id)
            if current is None or current.status.is_final:
                raise CommandRefused(f"job {job.id} is already final")
            return current
        if committed.events:
            self.wakeups.webhooks()
        if committed.job.status.is_final:
            self.counters.add(f"jobs_finished_{committed.job.status.value}")
        else:
            self.wakeups.jobs()
        return committed.job

    def redeliver(self, job: Job) -> None:
        """Send the job's final event again (same webhook-id), from the first attempt's schedule."""
        if not job.status.is_final:
            raise CommandRefused(f"job {job.id} is not final yet")
        if not job.webhook_url:
            raise CommandRefused(f"job {job.id} has no webhook_url")
        finals = [e for e in self.store.outbox.events_of(job.id) if e.type in TERMINAL_EVENT_TYPES]
        now = time.time()
        if finals:
            event = replace(finals[-1], state=PENDING, next_attempt_at=now, attempts=0)
        else:  # the client did not ask for the final event at submit; send it now on request
            event = build_event(job, f"job.{job.status.value}", now, self.store.media_links(now))
        self.store.outbox.put_event(event, is_new=not finals)
        self.wakeups.webhooks()
