"""What every /v1 route shares: its OpenAPI extras, and no query where it takes none."""

from __future__ import annotations

from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from flask import request
from flask_smorest import Blueprint, abort


def documenter(blp: Blueprint) -> Callable[..., Callable[[Callable[..., Any]], Callable[..., Any]]]:
    """The `documented` decorator for the routes of `blp`."""

    def documented(
        operation_id: str,
        *problems: HTTPStatus,
        parameters: list[dict[str, Any]] | None = None,
        responses: dict[int, Any] | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """A route's OpenAPI extras: its operationId (what links name), bearer auth, the problems
        it may answer besides its schema's 422 (401 and 503 on every route: a bad key, the job
        store down), `parameters`, and more of its `responses` (links, headers)."""

        def decorate(view: Callable[..., Any]) -> Callable[..., Any]:
            for status in (HTTPStatus.UNAUTHORIZED, *problems, HTTPStatus.SERVICE_UNAVAILABLE):
                view = blp.alt_response(status.value, response=status.name)(view)
            extra: dict[str, Any] = (
                {"parameters": parameters} if parameters else {}
            )  # [] hid the query's
            if responses:
                extra["responses"] = responses
            return blp.doc(operationId=operation_id, security=[{"bearer": []}], **extra)(view)

        return decorate

    return documented


def refuse_stray_query() -> None:
    """A query on a route that takes none is a 422, as an unknown field anywhere else is."""
    if request.query_string:
        stray = sorted(request.args)
        if stray:
            abort(422, errors={"query": {name: ["Unknown field."] for name in stray}})
