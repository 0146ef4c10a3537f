"""Exceptions mirroring the gateway's problem+json answers, one class per problem type."""

from __future__ import annotations

from typing import Any

import requests

from inpaint_gateway_client._models import Job


class GatewayError(Exception):
    """The gateway answered with a problem (RFC 9457): its status, type, title and detail."""

    def __init__(
        self,
        status: int,
        type: str,
        title: str,
        detail: str,
        body: dict[str, Any] | None = None,
        *,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {title}: {detail}" if detail else f"{status} {title}")
        self.status = status
        self.type = type
        self.title = title
        self.detail = detail
        self.body = body or {}
        # Seconds the answer's Retry-After asks for; None when it names none.
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, title={self.title!r}, detail={self.detail!r})"


class ValidationError(GatewayError):
    """422: fields that are invalid, under `.errors` as {"field": ["message", …]}."""

    @property
    def errors(self) -> dict[str, list[str]]:
        """Every bad field with its messages."""
        errors = self.body.get("errors")
        return errors if isinstance(errors, dict) else {}

    def __str__(self) -> str:
        fields = "; ".join(f"{name}: {' '.join(texts)}" for name, texts in self.errors.items())
        return f"{super().__str__()} ({fields})" if fields else super().__str__()


class AuthError(GatewayError):
    """401 or 403: the API key is missing, wrong, revoked or expired."""


class NotFound(GatewayError):
    """404: no such job or upload for this client."""


class Conflict(GatewayError):
    """409: the job is already final, or an Idempotency-Key was reused with another body."""


class RateLimited(GatewayError):
    """429 rate-limited: the client's submissions a minute are spent."""


class TooManyJobs(GatewayError):
    """429 too-many-jobs: the client has as many unfinished jobs as it may."""


class BudgetExceeded(GatewayError):
    """402: the job's estimated cost would pass the client's budget (`.budget`)."""

    @property
    def budget(self) -> dict[str, Any]:
        """The budget as the gateway reported it: period, limit_usd, spent_usd, remaining_usd…"""
        budget = self.body.get("budget")
        return budget if isinstance(budget, dict) else {}


class ServerError(GatewayError):
    """5xx: the gateway could not answer now; retry later (with an idempotency key)."""


class GatewayUnavailable(GatewayError):
    """The gateway could not be reached: connection refused, DNS, timeout (the cause chained)."""

    def __init__(self, detail: str) -> None:
        super().__init__(0, "", "Gateway Unavailable", detail)


def _problem_kind(type_url: str) -> str:
    return type_url.rstrip("/").rsplit("/", 1)[-1]


def error_from_response(response: requests.Response) -> GatewayError:
    """The exception for a non-2xx answer, chosen by its problem type, then by its status."""
    try:
        parsed = response.json()
    except ValueError:
        parsed = None
    body: dict[str, Any] = parsed if isinstance(parsed, dict) else {}
    status = response.status_code
    retry_after = _seconds(response.headers.get("Retry-After"))
    type_url = str(body.get("type") or "")
    title = str(body.get("title") or response.reason or "Error")
    detail = str(body.get("detail") or "")
    kind = _problem_kind(type_url)
    cls: type[GatewayError]
    if kind == "too-many-jobs":
        cls = TooManyJobs
    elif kind == "rate-limited":
        cls = RateLimited
    elif kind == "budget-exceeded" or status == 402:
        cls = BudgetExceeded
    elif status == 422:
        cls = ValidationError
    elif status in (401, 403):
        cls = AuthError
    elif status == 404:
        cls = NotFound
    elif status == 409:
        cls = Conflict
    elif status == 429:
        cls = RateLimited
    elif status >= 500:
        cls = ServerError
    else:
        cls = GatewayError
    return cls(status, type_url, title, detail, body, retry_after=retry_after)


def _seconds(value: str | None) -> float | None:
    # Retry-After may also be an HTTP date; the gateway sends seconds, so a date counts as absent.
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class ChecksumMismatch(GatewayError):
    """A downloaded output's sha256 is not the one the gateway recorded: nothing was kept."""

    def __init__(self, media_id: str, expected: str, actual: str) -> None:
        super().__init__(
            0, "", "Checksum Mismatch", f"{media_id}: sha256 {actual}, expected {expected}"
        )


class WaitTimeout(TimeoutError):
    """The job was not final within the wait's timeout; it goes on (`.job` as last seen)."""

    def __init__(self, job: Job, timeout_s: float) -> None:
        super().__init__(f"job {job.id} is still {job.status} after {timeout_s:g} s")
        self.job = job
