"""What a client can ask of its jobs: accept one, cancel one, have its final webhook sent again."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

from core.http.egress import EgressPolicy, RefusedDestination
from core.jobs import Job, Status, new_job
from core.metrics import Counters
from core.settings import Settings
from core.store import IdempotencyClaim, JobStore, Step
from core.wakeups import DISPATCH_JOBS_TASK, Wakeups
from core.webhooks import PENDING, TERMINAL_EVENT_TYPES, build_event


class CommandRefused(Exception):
    """The request is well-formed but cannot be done now (HTTP 409)."""


class WebhookUrlRefused(ValueError):
    """The webhook URL may not be called (HTTP 422 on `webhook_url`)."""


@dataclass
class JobCommands:
    """Job operations behind the HTTP API."""

    store: JobStore
    settings: Settings
    counters: Counters
    wakeups: Wakeups
    egress: EgressPolicy

    def accept(
        self,
        client_id: str,
        body: dict[str, Any],
        input_fields: tuple[str, ...],
        idempotency_key: str | None = None,
    ) -> tuple[Job, bool]:
        """Store a validated job request as a queued job and wake the workers.

        Returns the job and whether it is new (False: the Idempotency-Key's first job).
        Raises IdempotencyMismatch if the key came before with another body.
        """
        webhook_url = body.get("webhook_url")
        if webhook_url is not None:
            self.check_webhook_url(webhook_url)
        job = new_job(
            client_id=client_id,
            input={name: body[name] for name in input_fields},
            webhook_url=webhook_url,
            webhook_events=tuple(body["webhook_events"]),
            metadata=body.get("metadata"),
            deadline_s=self.settings.job_deadline_s,
        )
        claim = IdempotencyClaim(client_id, idempotency_key, body) if idempotency_key else None
        wakeup = self.wakeups.pending(DISPATCH_JOBS_TASK)
        created = self.store.create(job, idempotency=claim, wakeup=wakeup)
        if not created.is_new:
            first = self.store.get_for_client(client_id, created.job_id)
            if first is None:
                raise CommandRefused(f"the Idempotency-Key's job {created.job_id} no longer exists")
            return first, False
        if created.wakeup_claimed:
            self.wakeups.send(wakeup.task_name)
        return job, True

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
                return Step(j.moved_to(Status.CANCELLED, now, cancel_requested=True), None)
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
            event = build_event(job, f"job.{job.status.value}", now)
        self.store.outbox.put_event(event, is_new=not finals)
        self.wakeups.webhooks()
