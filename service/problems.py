"""Every error answer is application/problem+json (RFC 9457), and none carries a stack trace."""

from __future__ import annotations

import http
import logging
from typing import Any

import kombu.exceptions
import redis
from flask import Response, current_app, json, request
from flask_smorest import Api
from flask_smorest.utils import prepare_response
from werkzeug.exceptions import HTTPException, InternalServerError, RequestEntityTooLarge

from core.limits import RATE_WINDOW_S, Refusal
from service.schemas import ProblemSchema

log = logging.getLogger(__name__)

PROBLEM_TYPE_BASE = "https://inpaint-gateway.internal/problems/"
PROBLEM_CONTENT_TYPE = "application/problem+json"


def problem(
    status: int,
    title: str,
    detail: str,
    errors: dict[str, list[str]] | None = None,
    headers: dict[str, str] | None = None,
    extensions: dict[str, Any] | None = None,
) -> Response:
    """A problem+json response; `extensions`: members beside the standard ones (RFC 9457 §3.2)."""
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + title.lower().replace(" ", "-"),
        "title": title,
        "status": status,
        "detail": detail,
    }
    if errors is not None:
        body["errors"] = errors
    body.update(extensions or {})
    response = Response(json.dumps(body), status=status, mimetype=PROBLEM_CONTENT_TYPE)
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def flatten_field_errors(messages: Any, path: str = "") -> dict[str, list[str]]:
    """marshmallow's nested messages as {"loras.0.scale": ["..."]}: every bad field listed."""
    if not isinstance(messages, dict):
        return {path or "body": [str(m) for m in _as_list(messages)]}
    flat: dict[str, list[str]] = {}
    for key, value in messages.items():
        child = path if key == "_schema" else f"{path}.{key}" if path else str(key)
        for name, texts in flatten_field_errors(value, child).items():
            flat.setdefault(name, []).extend(texts)
    return flat


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


STORE_RETRY_AFTER_S = "1"


def store_unavailable(error: Exception) -> Response:
    """Redis (the job store or the broker) is unreachable: 503, nothing half-done, retry later."""
    log.warning("store unavailable", extra={"error": type(error).__name__})
    return problem(
        503,
        "Service Unavailable",
        "The job store is briefly unavailable. Retry; send an Idempotency-Key so that a retry "
        "can never make a second job.",
        headers={"Retry-After": STORE_RETRY_AFTER_S},
    )


RATE_POLICY_NAME = "per-minute"


def rate_limit_headers(per_min: int, remaining: int, reset_s: int) -> dict[str, str]:
    """IETF RateLimit-Policy / RateLimit fields (draft-ietf-httpapi-ratelimit-headers) for a
    client's POSTs-a-minute limit: its quota, what is left, and seconds until it is whole."""
    return {
        "RateLimit-Policy": f'"{RATE_POLICY_NAME}";q={per_min};w={int(RATE_WINDOW_S)}',
        "RateLimit": f'"{RATE_POLICY_NAME}";r={max(0, remaining)};t={max(0, reset_s)}',
    }


def limit_refused(refusal: Refusal) -> Response:
    """The answer to an accept refused by a client's limit: 429 or 402, nothing stored."""
    if refusal.kind == "too_many_jobs":
        return problem(
            429,
            "Too Many Jobs",
            f"This client has {refusal.limit} unfinished jobs, its limit (max-queued); retry "
            "once some have ended.",
            headers={"Retry-After": str(refusal.retry_after_s)},
        )
    if refusal.kind == "rate_limited":
        assert refusal.limit is not None and refusal.retry_after_s is not None
        headers = {"Retry-After": str(refusal.retry_after_s)}
        headers |= rate_limit_headers(refusal.limit, 0, refusal.retry_after_s)
        return problem(
            429,
            "Rate Limited",
            f"This client may submit {refusal.limit} jobs a minute; retry after "
            f"{refusal.retry_after_s} s.",
            headers=headers,
        )
    budget = refusal.budget or {}
    return problem(
        402,
        "Budget Exceeded",
        f"This job's estimated cost would pass the client's {budget.get('period')} budget of "
        f"{budget.get('limit_usd')} USD ({budget.get('remaining_usd')} USD remaining).",
        extensions={"budget": budget},
    )


class ProblemApi(Api):
    """flask-smorest's Api, answering errors as problem+json — and documenting them so."""

    def _register_responses(self) -> None:
        """A response component for every status (as flask-smorest registers them), the
        errors' as they are sent: problem+json, ProblemSchema (flask-smorest's would say
        application/json with its own {code, status, message} shape, which no answer has)."""
        for status in http.HTTPStatus:
            component: dict[str, Any] = {"description": status.phrase}
            if status >= 400:
                component["schema"] = ProblemSchema
            prepare_response(component, self.spec, PROBLEM_CONTENT_TYPE)
            self.spec.components.response(status.name, component, lazy=True)
        default = {"description": "Default error response", "schema": ProblemSchema}
        prepare_response(default, self.spec, PROBLEM_CONTENT_TYPE)
        self.spec.components.response(self.DEFAULT_ERROR_RESPONSE_NAME, default, lazy=True)

    def _register_error_handlers(self) -> None:
        super()._register_error_handlers()
        # OutOfMemoryError: Redis at its maxmemory refuses writes (noeviction): nothing stored.
        for error in (
            redis.ConnectionError,
            redis.TimeoutError,
            redis.exceptions.OutOfMemoryError,
            kombu.exceptions.OperationalError,
        ):
            self._app.register_error_handler(error, store_unavailable)

    def handle_http_exception(self, error: HTTPException) -> Response:  # type: ignore[override]
        """Render any HTTPException (including webargs' validation aborts) as a problem."""
        status = error.code or 500
        data = getattr(error, "data", None) or {}
        if isinstance(error, InternalServerError):
            original = getattr(error, "original_exception", None)
            if original is not None:
                log.error("unhandled error", exc_info=original)
            return problem(500, "Internal Server Error", "The server failed to handle the request.")
        messages = data.get("errors") or data.get("messages")
        errors = None
        detail = data.get("message") or error.description or error.name
        if messages is not None:
            # webargs nests errors by location: {"json": {...}} or {"query": {...}}
            if isinstance(messages, dict) and set(messages) <= {"json", "query", "headers", "form"}:
                merged: dict[str, list[str]] = {}
                for location_messages in messages.values():
                    merged.update(flatten_field_errors(location_messages))
                errors = merged
            else:
                errors = flatten_field_errors(messages)
        # Werkzeug's own text names no size; a route's own rule (a description given) does.
        if (
            isinstance(error, RequestEntityTooLarge)
            and error.description == RequestEntityTooLarge.description
        ):
            # The route's own limit (uploads raise it), else the app's.
            limit = request.max_content_length or current_app.config["MAX_CONTENT_LENGTH"]
            limit_kib = limit // 1024
            detail = f"The request body is over its limit of {limit_kib} KiB."
        if status == 400 and errors:
            detail = "; ".join(m for ms in errors.values() for m in ms)
            errors = None
        elif status == 422:
            detail = "The request body or query has invalid fields; see errors."
        headers = dict(data.get("headers") or {})
        allow = next((v for k, v in error.get_headers() if k == "Allow"), None)
        if allow is not None:  # a 405 says which methods the resource has (RFC 9110)
            headers["Allow"] = allow
        return problem(status, error.name, str(detail), errors, headers)
