"""/v1/usage: what the calling client used per UTC day, its limits and its budget."""

from __future__ import annotations

import time
from datetime import date
from http import HTTPStatus
from typing import Any

from flask.views import MethodView
from flask_smorest import abort

from core.usage import MAX_USAGE_DAYS, UsageBook, usage_span
from service.auth import authenticate, current_client
from service.context import ctx
from service.parsing import StrictBlueprint
from service.routes import documenter
from service.schemas import UsageQuerySchema, UsageSchema

blp = StrictBlueprint(
    "usage", __name__, url_prefix="/v1", description="What the calling client used and may use."
)
documented = documenter(blp)


@blp.before_request
def _admit_request() -> None:
    """Every /v1/usage request: the caller's key first (401)."""
    authenticate()


@blp.route("/usage")
class Usage(MethodView):
    @documented("getUsage", HTTPStatus.BAD_REQUEST)
    @blp.arguments(UsageQuerySchema(), location="query")
    @blp.response(200, UsageSchema)
    def get(self, query: dict[str, Any]) -> dict[str, Any]:
        """Jobs by final status and spend per UTC day (inclusive; default: this month), with
        the client's limits and budget."""
        now = time.time()
        first, last = usage_span(
            date.fromisoformat(query["from_"]) if "from_" in query else None,
            date.fromisoformat(query["to"]) if "to" in query else None,
            now,
        )
        if first > last:
            abort(422, errors={"query": {"from": ["Must not be after to."]}})
        if (last - first).days + 1 > MAX_USAGE_DAYS:
            abort(422, errors={"query": {"to": [f"At most {MAX_USAGE_DAYS} days in one query."]}})
        client = current_client()
        book = UsageBook(ctx().redis)
        return {
            "client_id": client.id,
            "from_": first.isoformat(),  # UsageSchema writes it as "from"
            "to": last.isoformat(),
            **book.usage(client.id, first, last),
            "limits": client.limits.to_dict(),
            "budget": book.budget(client.id, client.limits, now),
        }
