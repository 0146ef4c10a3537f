"""Checking that a webhook delivery came from the gateway (Standard Webhooks signatures)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from inpaint_gateway_client._models import Event, Job


class InvalidWebhook(Exception):
    """A delivery whose signature, timestamp or body does not hold: do not act on it."""


def verify_webhook(body: bytes | str, headers: Mapping[str, str], secret: str) -> Event:
    """The delivery's event once its signature verifies with the client's `whsec_` secret."""
    # standardwebhooks looks headers up in lower case; frameworks hand them over in any case.
    lowered = {name.lower(): value for name, value in headers.items()}
    text = body.decode() if isinstance(body, bytes) else body
    try:
        Webhook(secret).verify(text, lowered)
        payload: Any = json.loads(text)
    except (WebhookVerificationError, ValueError) as exc:
        raise InvalidWebhook(str(exc)) from exc
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), dict):
        raise InvalidWebhook("the body is not a gateway event")
    return Event(
        type=str(payload.get("type", "")),
        timestamp=str(payload.get("timestamp", "")),
        job=Job.from_json(payload["data"]),
        webhook_id=lowered["webhook-id"],
    )
