"""JSON bodies the emulated upstream answers with."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from flask import Response, jsonify

from emulator.requests_state import EmulatedRequest, Phase


def error_response(
    http_status: int,
    error_code: int,
    error_message: str,
    *,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Response:
    """Return RunComfy's error body `{"error_code", "error_message", ...}` with `http_status`."""
    response = jsonify({"error_code": error_code, "error_message": error_message, **extra})
    response.status_code = http_status
    response.headers.update(headers or {})
    return response


def iso_utc(moment: datetime | None) -> str | None:
    """Format a UTC datetime as ISO-8601 with a `Z` suffix."""
    if moment is None:
        return None
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def request_urls(base_url: str, request_id: str) -> dict[str, str]:
    """Return the absolute status, result and cancel URLs of a request."""
    prefix = f"{base_url}/v1/requests/{request_id}"
    return {
        "status_url": f"{prefix}/status",
        "result_url": f"{prefix}/result",
        "cancel_url": f"{prefix}/cancel",
    }


def status_body(emulated: EmulatedRequest, now_monotonic: float, base_url: str) -> dict[str, Any]:
    """Return the /status body at `now_monotonic`."""
    phase = emulated.phase(now_monotonic)
    urls = request_urls(base_url, emulated.request_id)
    body: dict[str, Any] = {
        "request_id": emulated.request_id,
        "status": emulated.status_value(phase),
        "status_url": urls["status_url"],
        "result_url": urls["result_url"],
    }
    if phase is Phase.IN_QUEUE:
        body["queue_position"] = emulated.queue_position(now_monotonic)
    if emulated.plan.no_status:
        del body["status"]
    return body


def output_url_of(emulated: EmulatedRequest, base_url: str) -> str:
    """The URL /result names for the request's output: the emulator's own, or where its
    directives point it (another host; a path that is already gone)."""
    base = f"http://{emulated.plan.output_host}" if emulated.plan.output_host else base_url
    gone = "gone/" if emulated.plan.output_gone else ""
    return f"{base}/outputs/{gone}{emulated.output_name}"


def result_body(
    emulated: EmulatedRequest, phase: Phase, base_url: str, *, with_cost: bool = False
) -> dict[str, Any]:
    """Return the /result body for a request in `phase` (settled first when done); with
    `with_cost` (`?include_cost=true`), a finished one carries its `cost` in USD."""
    status = emulated.result_status(phase)
    finished_at: datetime | None = None
    if phase is Phase.CANCELLED:
        finished_at = emulated.cancelled_at
    elif status in ("succeeded", "failed"):
        finished_at = emulated.finished_at
    body: dict[str, Any] = {
        "request_id": emulated.request_id,
        "status": status,
        "created_at": iso_utc(emulated.created_at),
        "finished_at": iso_utc(finished_at),
    }
    if status == "failed" and emulated.failure is not None:
        body["error"] = emulated.failure.as_error_field()
    if status == "succeeded" and emulated.output_name is not None:
        output_url = output_url_of(emulated, base_url)
        if emulated.plan.output_style == "image":
            body["output"] = {"image": output_url}
        else:
            body["output"] = {"images": [output_url]}
    cost = emulated.cost_usd(status)
    if with_cost and cost is not None:
        body["cost"] = cost
    if emulated.plan.no_status:
        del body["status"]
    return body
