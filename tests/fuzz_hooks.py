"""schemathesis hooks (SCHEMATHESIS_HOOKS=tests.fuzz_hooks): the rules JSON Schema cannot state,
met by generated cases — a body's control_start <= control_end (given or its default), a
usage query's days in order and at most MAX_USAGE_DAYS apart, a job read's wait short, an upload's bytes an image
of the type it declares, and a job's data URI or upload ref a picture the client has.

A job's picture as a data URI or an upload ref is only known good by decoding it, and the pair
by comparing them: a well-formed one is replaced by a data URI of a real picture (a red image,
a white mask, of one size); a malformed one stays, to be refused. tests/test_inputs.py sends
every kind of bad picture instead.

An upload's body is bytes, which JSON Schema cannot describe: whether they are an image is known
only by decoding them. So its positive cases carry a real image of their declared type, and its
negative cases are left out: no schema mutation of bytes says what a bad image is.
tests/test_uploads.py sends every kind of bad upload instead."""

from __future__ import annotations

import base64
import io
import re
from datetime import UTC, date, datetime
from typing import Any

import schemathesis
from PIL import Image

from core.inputs import (
    DATA_URI_PATTERN,
    MAX_DATA_URI_CHARS,
    MAX_UPLOAD_REF_CHARS,
    UPLOAD_REF_PATTERN,
)
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


UPLOADS_PATH = "/v1/uploads"
IMAGE_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}


def image_of(content_type: str) -> bytes:
    """A small real image of `content_type` (PNG for any other)."""
    out = io.BytesIO()
    Image.new("RGB", (4, 3), "red").save(out, format=IMAGE_FORMATS.get(content_type, "PNG"))
    return out.getvalue()


HELD_FORMS = (
    (re.compile(DATA_URI_PATTERN), MAX_DATA_URI_CHARS),
    (re.compile(UPLOAD_REF_PATTERN), MAX_UPLOAD_REF_CHARS),
)
PICTURES = {"image_url": "red", "mask_image_url": "white"}


def _picture_uri(color: str) -> str:
    out = io.BytesIO()
    Image.new("RGB", (4, 3), color).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def with_real_pictures(body: Any) -> Any:
    """A job body whose well-formed data URIs and upload refs name real pictures of one size.

    Only values of the document's form: a case made invalid on purpose stays invalid."""
    if not isinstance(body, dict):
        return body
    real = {}
    for name, color in PICTURES.items():
        value = body.get(name)
        if isinstance(value, str) and any(
            len(value) <= most and form.search(value) for form, most in HELD_FORMS
        ):
            real[name] = _picture_uri(color)
    return {**body, **real} if real else body


def with_short_wait(query: Any) -> Any:
    """A job read's valid `wait` (1-60 s) made 1 s: a generated wait of up to a minute per
    request would spend the run's time limit waiting. Invalid ones stay, to be refused."""
    if not isinstance(query, dict) or "wait" not in query:
        return query
    wait = query["wait"]
    if (
        isinstance(wait, int | str)
        and re.fullmatch("[0-9]{1,2}", str(wait))
        and 1 <= int(wait) <= 60
    ):
        return {**query, "wait": 1}
    return query


def is_upload(case: Any) -> bool:
    return bool(case.path == UPLOADS_PATH and case.method.upper() == "POST")


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    """Every phase's cases (map_body does not reach the coverage phase's)."""
    if is_upload(case):
        media_type = str(getattr(case, "media_type", "") or "")
        data = image_of(media_type)
        case.body = {"file": data} if media_type.startswith("multipart/") else data
        return case
    case.body = with_control_window(case.body)
    if case.path == "/v1/jobs" and case.method.upper() == "POST":
        case.body = with_real_pictures(case.body)
    if case.path == "/v1/jobs/{job_id}" and case.method.upper() == "GET":
        case.query = with_short_wait(case.query)
    if case.path == "/v1/usage":
        case.query = with_usage_span(case.query, datetime.now(UTC).date())
    return case
