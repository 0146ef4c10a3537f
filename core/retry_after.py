"""The HTTP Retry-After header (RFC 9110 §10.2.3), read as seconds from now."""

from __future__ import annotations

import email.utils
import time


def parse_retry_after_s(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait, from either form (delta-seconds or an HTTP date); None if absent/unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
