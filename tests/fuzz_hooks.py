"""schemathesis hooks (SCHEMATHESIS_HOOKS=tests.fuzz_hooks): the rules JSON Schema cannot state,
met by generated cases — a body's control_start <= control_end (given or its default), and a
usage query's days in order and at most MAX_USAGE_DAYS apart."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

import schemathesis

from core.usage import MAX_USAGE_DAYS
from service.schemas import InpaintInputSchema

CONTROL_END_DEFAULT = InpaintInputSchema().fields["control_end"].load_default


def _unit(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1


def with_control_window(body: Any) -> Any:
    """A body whose control window is inverted, with control_end raised to control_start.

    Only where both are numbers in range: a case made invalid on purpose stays invalid.
    """
    if not isinstance(body, dict) or not _unit(body.get("control_start")):
        return body
    end = body.get("control_end", CONTROL_END_DEFAULT)
    if _unit(end) and body["control_start"] > end:
        return {**body, "control_end": body["control_start"]}
    return body


def _day(value: Any) -> date | None:
    try:
        return date.fromisoformat(value) if isinstance(value, str) and len(value) == 10 else None
    except ValueError:
        return None


def with_usage_span(query: Any, today: date) -> Any:
    """A usage query whose span is inverted or too long, with `from` moved within `to`'s reach.

    Only where the days given are calendar days: a case made invalid on purpose stays invalid.
    `from` alone runs to today, `to` alone starts at its month's first (service/usage.py)."""
    if not isinstance(query, dict) or "from" not in query:
        return query
    first, last = _day(query["from"]), _day(query["to"]) if "to" in query else today
    if first is None or last is None:
        return query
    if first > last or (last - first).days >= MAX_USAGE_DAYS:
        return {**query, "from": last.isoformat()}
    return query


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    """Every phase's cases (map_body does not reach the coverage phase's)."""
    case.body = with_control_window(case.body)
    if case.path == "/v1/usage":
        case.query = with_usage_span(case.query, datetime.now(UTC).date())
    return case
