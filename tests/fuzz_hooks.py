"""schemathesis hooks (SCHEMATHESIS_HOOKS=tests.fuzz_hooks): the one body rule JSON Schema
cannot state, control_start <= control_end (given or its default), met by generated bodies."""

from __future__ import annotations

from typing import Any

import schemathesis

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


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    """Every phase's cases (map_body does not reach the coverage phase's)."""
    case.body = with_control_window(case.body)
    return case
