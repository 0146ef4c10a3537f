"""Python client for inpaint-gateway: submit inpainting jobs, wait, download, verify webhooks."""

from __future__ import annotations

from inpaint_gateway_client._client import Client
from inpaint_gateway_client._errors import (
    AuthError,
    BudgetExceeded,
    ChecksumMismatch,
    Conflict,
    GatewayError,
    GatewayUnavailable,
    NotFound,
    RateLimited,
    ServerError,
    TooManyJobs,
    ValidationError,
    WaitTimeout,
)
from inpaint_gateway_client._models import FINAL_STATUSES, Event, Job, Media, Upload, Usage
from inpaint_gateway_client._webhooks import InvalidWebhook, verify_webhook

__all__ = [
    "FINAL_STATUSES",
    "AuthError",
    "BudgetExceeded",
    "ChecksumMismatch",
    "Client",
    "Conflict",
    "Event",
    "GatewayError",
    "GatewayUnavailable",
    "InvalidWebhook",
    "Job",
    "Media",
    "NotFound",
    "RateLimited",
    "ServerError",
    "TooManyJobs",
    "Upload",
    "Usage",
    "ValidationError",
    "WaitTimeout",
    "verify_webhook",
]
