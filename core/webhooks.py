"""Webhook events: which are emitted, what they carry, how they are signed (Standard Webhooks)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from standardwebhooks.webhooks import Webhook

from core.jobs import Job, Status, iso
from core.media_urls import MediaLinks

TERMINAL_EVENT_TYPES = ("job.succeeded", "job.failed", "job.cancelled", "job.expired")
PROGRESS_EVENT_TYPES = ("job.submitted", "job.running")
EVENT_TYPES = TERMINAL_EVENT_TYPES + PROGRESS_EVENT_TYPES

PENDING = "pending"
DELIVERED = "delivered"
EXHAUSTED = "exhausted"
GONE = "gone"  # the receiver answered 410: stop for good


def event_type_for(status: Status) -> str | None:
    """The event a move into `status` emits, if any."""
    return None if status is Status.QUEUED else f"job.{status.value}"


def new_webhook_id() -> str:
    """A fresh `webhook-id`: one per event, stable across every retry of it."""
    return "msg_" + secrets.token_hex(12)


@dataclass(frozen=True)
class WebhookEvent:
    """One event for one job, and the state of its delivery."""

    webhook_id: str
    job_id: str
    client_id: str
    type: str
    url: str
    body: str  # the exact bytes that are signed and sent, the same on every attempt
    created_at: float
    attempts: int = 0
    state: str = PENDING
    next_attempt_at: float | None = None

    def to_json(self) -> str:
        """The stored form."""
        return json.dumps(self.__dict__, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> WebhookEvent:
        """Inverse of to_json."""
        return cls(**json.loads(text))

    def after_attempt(self, *, state: str, next_attempt_at: float | None) -> WebhookEvent:
        """This event after one more attempt."""
        return replace(
            self, attempts=self.attempts + 1, state=state, next_attempt_at=next_attempt_at
        )


def build_event(job: Job, event_type: str, now: float, links: MediaLinks) -> WebhookEvent:
    """The event announcing `job` as it is now, its media URLs signed by `links` (every
    attempt sends these same bytes: a retry within MEDIA_URL_TTL_S carries working URLs)."""
    assert job.webhook_url is not None
    body = json.dumps(
        {"type": event_type, "timestamp": iso(now), "data": job.to_resource(links)},
        separators=(",", ":"),
    )
    return WebhookEvent(
        webhook_id=new_webhook_id(),
        job_id=job.id,
        client_id=job.client_id,
        type=event_type,
        url=job.webhook_url,
        body=body,
        created_at=now,
        next_attempt_at=now,
    )


def events_for_change(
    before: Job, after: Job, now: float, links_at: Callable[[float], MediaLinks]
) -> list[WebhookEvent]:
    """The events a client asked for that this change of `before` into `after` emits;
    `links_at(now)` signs their media URLs (asked only when there is an event)."""
    if after.status == before.status or not after.webhook_url:
        return []
    event_type = event_type_for(after.status)
    if event_type is None or event_type not in after.webhook_events:
        return []
    return [build_event(after, event_type, now, links_at(now))]


def signature_headers(
    event: WebhookEvent, webhook_secrets: list[str], now: float
) -> dict[str, str]:
    """Standard Webhooks headers for one attempt; one signature per live secret (rotation)."""
    seconds = int(now)  # signed and sent alike (a datetime of `now` could round up a second)
    at = datetime.fromtimestamp(seconds, UTC)
    signatures = [
        Webhook(secret).sign(msg_id=event.webhook_id, timestamp=at, data=event.body)
        for secret in webhook_secrets
    ]
    return {
        "webhook-id": event.webhook_id,
        "webhook-timestamp": str(seconds),
        "webhook-signature": " ".join(signatures),
        "content-type": "application/json",
        "user-agent": "inpaint-gateway-webhooks/1",
    }


def delivery_record(
    event: WebhookEvent,
    *,
    at: float,
    status_code: int | None,
    error: str | None,
    duration_ms: int,
    next_attempt_at: float | None,
) -> dict[str, Any]:
    """One attempt, as listed by GET /v1/jobs/{id}/deliveries."""
    return {
        "event_type": event.type,
        "webhook_id": event.webhook_id,
        "attempt": event.attempts + 1,
        "at": iso(at),
        "status_code": status_code,
        "error": error,
        "duration_ms": duration_ms,
        "next_attempt_at": iso(next_attempt_at),
    }
