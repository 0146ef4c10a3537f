"""What happens to a webhook event after each attempt."""

from __future__ import annotations

import base64
import time

import pytest
from standardwebhooks.webhooks import Webhook

from core.retry_after import parse_retry_after_s
from core.webhooks import DELIVERED, EXHAUSTED, GONE, PENDING, WebhookEvent, signature_headers
from workers.delivery import AttemptResult, next_state

SCHEDULE = (0.0, 5.0, 300.0)


def event(attempts: int) -> WebhookEvent:
    return WebhookEvent(
        "msg_1", "job_1", "cli_1", "job.succeeded", "https://x", "{}", 0.0, attempts=attempts
    )


@pytest.mark.parametrize("code", [200, 201, 204, 299])
def test_any_2xx_delivers(code: int) -> None:
    assert next_state(event(0), AttemptResult(code, None), SCHEDULE, 100.0) == (DELIVERED, None)


def test_410_stops_for_good() -> None:
    assert next_state(event(0), AttemptResult(410, "HTTP 410"), SCHEDULE, 100.0) == (GONE, None)


@pytest.mark.parametrize("code", [None, 301, 302, 400, 401, 404, 500, 503])
def test_everything_else_retries_on_the_schedule(code: int | None) -> None:
    assert next_state(event(0), AttemptResult(code, "x"), SCHEDULE, 100.0) == (PENDING, 105.0)
    assert next_state(event(1), AttemptResult(code, "x"), SCHEDULE, 100.0) == (PENDING, 400.0)
    assert next_state(event(2), AttemptResult(code, "x"), SCHEDULE, 100.0) == (EXHAUSTED, None)


@pytest.mark.parametrize("code", [429, 503])
def test_retry_after_is_honoured_when_longer(code: int) -> None:
    assert next_state(event(0), AttemptResult(code, "x", 60.0), SCHEDULE, 100.0) == (PENDING, 160.0)
    assert next_state(event(1), AttemptResult(code, "x", 60.0), SCHEDULE, 100.0) == (PENDING, 400.0)


def test_retry_after_is_ignored_on_other_codes() -> None:
    assert next_state(event(0), AttemptResult(500, "x", 60.0), SCHEDULE, 100.0) == (PENDING, 105.0)


@pytest.mark.parametrize(
    ("header", "expected"),
    [(None, None), ("", None), ("7", 7.0), ("-3", 0.0), ("soon", None),
     ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0)],
)  # fmt: skip
def test_retry_after_header_forms(header: str | None, expected: float | None) -> None:
    assert parse_retry_after_s(header) == expected


def test_retry_after_http_date_in_the_future() -> None:
    assert parse_retry_after_s("Wed, 21 Oct 2015 07:28:30 GMT", now=1445412480.0) == 30.0


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.9999995, 0.9999999])
def test_the_signature_is_over_the_timestamp_sent(fraction: float) -> None:
    """A receiver verifies with the webhook-timestamp header: signing with the attempt's time
    as a datetime rounded .9999995 s up to the next second, and every receiver refused it."""
    now = float(int(time.time())) + fraction
    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    sent = event(0)
    headers = signature_headers(sent, [secret], now)
    assert headers["webhook-timestamp"] == str(int(now))
    Webhook(secret).verify(sent.body, headers)  # raises if the signature does not match
