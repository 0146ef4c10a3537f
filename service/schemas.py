"""HTTP boundary schemas: what a request may carry and what a response shows (and the OpenAPI doc).

The inpainting input mirrors RunComfy's model page (PRODUCT.md §5). Unknown fields are errors, so a
misspelt option can never be dropped silently. Numbers must be JSON numbers (not strings, not
booleans); limits that RunComfy does not publish are ours and are documented in README.
"""

from __future__ import annotations

import json
import numbers
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validates, validates_schema
from marshmallow import validate as v

from core.http.egress import split_http_url
from core.webhooks import EVENT_TYPES, TERMINAL_EVENT_TYPES

MAX_PROMPT_CHARS = 8000
MAX_URL_CHARS = 4096
MAX_LORAS = 3
MAX_METADATA_BYTES = 4096
# Objects and arrays within objects and arrays, metadata itself the first: json.loads takes ~1,000
# levels, yet measuring or storing such metadata (deeper in the stack than the parse) ran out
# of recursion — a 500.
MAX_METADATA_DEPTH = 32
MAX_SEED = 2**53 - 1  # the largest integer every JSON parser holds exactly
IMAGE_SIZES = (
    "square_hd",
    "square",
    "portrait_4_3",
    "portrait_16_9",
    "landscape_4_3",
    "landscape_16_9",
    "auto",
)
OUTPUT_FORMATS = ("jpeg", "png", "webp")
HTTP_SCHEMES = {"http", "https"}


class StrictFloat(fields.Float):
    """A JSON number (int or float), never a string or a boolean."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValidationError("Must be a number.")
        return super()._deserialize(value, attr, data, **kwargs)


class StrictInteger(fields.Integer):
    """A JSON integer, never a string, a boolean or a number with a fraction."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(strict=True, **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValidationError("Must be an integer.")
        return super()._deserialize(value, attr, data, **kwargs)


def _well_formed(url: str) -> None:
    """What marshmallow's URL check lets through: a port out of range, control characters,
    a user name or password (a secret that every job resource and webhook would carry)."""
    try:
        split_http_url(url, "URL")
    except ValueError as exc:
        raise ValidationError(str(exc)) from None


def _http_url(**kwargs: Any) -> fields.Url:
    return fields.Url(
        schemes=HTTP_SCHEMES,
        require_tld=False,
        validate=[v.Length(max=MAX_URL_CHARS), _well_formed],
        metadata={"description": f"http(s) URL, at most {MAX_URL_CHARS} characters"},
        **kwargs,
    )


def _unit_interval(default: float) -> StrictFloat:
    return StrictFloat(
        load_default=default, validate=v.Range(0, 1), metadata={"minimum": 0, "maximum": 1}
    )


class StrictSchema(Schema):
    """Unknown fields are an error."""

    class Meta:
        unknown = RAISE


class LoraSchema(StrictSchema):
    """One LoRA: a URL, a Hugging Face repo id (owner/repo) or a path RunComfy knows."""

    path = fields.String(required=True, validate=v.Length(min=1, max=MAX_URL_CHARS))
    scale = StrictFloat(load_default=1.0, validate=v.Range(0, 4))


class InpaintInputSchema(StrictSchema):
    """The model's input fields, exactly as RunComfy takes them."""

    prompt = fields.String(required=True, validate=v.Length(min=1, max=MAX_PROMPT_CHARS))
    image_url = _http_url(required=True)
    mask_image_url = _http_url(required=True)
    control_start = _unit_interval(0.0)
    control_end = _unit_interval(0.6)
    control_scale = _unit_interval(0.75)
    strength = _unit_interval(1.0)
    loras = fields.List(
        fields.Nested(LoraSchema), load_default=list, validate=v.Length(max=MAX_LORAS)
    )
    image_size = fields.String(load_default="auto", validate=v.OneOf(IMAGE_SIZES))
    num_inference_steps = StrictInteger(load_default=20, validate=v.Range(1, 30))
    seed = StrictInteger(load_default=0, validate=v.Range(0, MAX_SEED))
    output_format = fields.String(load_default="png", validate=v.OneOf(OUTPUT_FORMATS))

    @validates("prompt")
    def _prompt_has_text(self, value: str, **_: Any) -> None:
        if not value.strip():
            raise ValidationError("Must not be blank.")

    @validates_schema
    def _control_window(self, data: dict[str, Any], **_: Any) -> None:
        start, end = data.get("control_start"), data.get("control_end")
        if start is not None and end is not None and start > end:
            raise ValidationError("Must not exceed control_end.", field_name="control_start")


INPUT_FIELDS = tuple(InpaintInputSchema().fields)


class JobCreateSchema(InpaintInputSchema):
    """POST /v1/jobs: the model input, flat, plus how to call back."""

    webhook_url = _http_url(load_default=None)
    webhook_events = fields.List(
        fields.String(validate=v.OneOf(EVENT_TYPES)),
        load_default=lambda: list(TERMINAL_EVENT_TYPES),
        validate=v.Length(min=1, max=len(EVENT_TYPES)),
        metadata={"description": "default: the four terminal events"},
    )
    metadata = fields.Dict(
        keys=fields.String(),
        load_default=None,
        metadata={
            "description": f"any JSON object up to {MAX_METADATA_BYTES} bytes and "
            f"{MAX_METADATA_DEPTH} levels of nesting, echoed back"
        },
    )

    @validates("metadata")
    def _metadata_size(self, value: dict[str, Any] | None, **_: Any) -> None:
        if value is None:
            return
        if _nested_deeper_than(value, MAX_METADATA_DEPTH):
            raise ValidationError(f"Must not nest more than {MAX_METADATA_DEPTH} levels deep.")
        if (
            len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
            > MAX_METADATA_BYTES
        ):
            raise ValidationError(f"Must be at most {MAX_METADATA_BYTES} bytes of JSON.")

    @validates("webhook_events")
    def _unique_events(self, value: list[str], **_: Any) -> None:
        if len(set(value)) != len(value):
            raise ValidationError("Must not repeat an event type.")


def _nested_deeper_than(value: Any, depth: int) -> bool:
    """Whether JSON `value` holds objects or arrays more than `depth` levels deep (itself the
    first), looked at a level at a time: no recursion."""
    level = [value]
    for _ in range(depth):
        inner = [
            child
            for container in level
            for child in (container.values() if isinstance(container, dict) else container)
            if isinstance(child, dict | list)
        ]
        if not inner:
            return False
        level = inner
    return True


class JobListQuerySchema(StrictSchema):
    """GET /v1/jobs query."""

    # No load_default: absent is no filter (the view's .get); a None default made the document
    # offer "null" as a status, which is refused.
    status = fields.String(
        validate=v.OneOf(
            ["queued", "submitted", "running", "succeeded", "failed", "cancelled", "expired"]
        ),
    )
    limit = fields.Integer(load_default=20, validate=v.Range(1, 100))
    cursor = fields.String(validate=v.Length(max=200))


class OutputSchema(Schema):
    images = fields.List(fields.String())


class ErrorBodySchema(Schema):
    code = fields.String()
    message = fields.String()


class UpstreamSchema(Schema):
    request_id = fields.String()
    status = fields.String(allow_none=True)
    queue_position = fields.Integer(allow_none=True)


class JobSchema(Schema):
    """The job resource (also the `data` of every webhook)."""

    id = fields.String()
    status = fields.String()
    created_at = fields.String()
    updated_at = fields.String()
    finished_at = fields.String(allow_none=True)
    input = fields.Dict()
    output = fields.Nested(OutputSchema, allow_none=True)
    error = fields.Nested(ErrorBodySchema, allow_none=True)
    upstream = fields.Nested(UpstreamSchema, allow_none=True)
    webhook_url = fields.String(allow_none=True)
    webhook_events = fields.List(fields.String())
    metadata = fields.Dict(allow_none=True)
    cancel_requested = fields.Boolean()


class JobPageSchema(Schema):
    jobs = fields.List(fields.Nested(JobSchema))
    next_cursor = fields.String(allow_none=True)


class DeliverySchema(Schema):
    event_type = fields.String()
    webhook_id = fields.String()
    attempt = fields.Integer()
    at = fields.String()
    status_code = fields.Integer(allow_none=True)
    error = fields.String(allow_none=True)
    duration_ms = fields.Integer()
    next_attempt_at = fields.String(allow_none=True)


class DeliveriesSchema(Schema):
    deliveries = fields.List(fields.Nested(DeliverySchema))


class ProblemSchema(Schema):
    """application/problem+json (RFC 9457)."""

    type = fields.String()
    title = fields.String()
    status = fields.Integer()
    detail = fields.String()
    errors = fields.Dict(keys=fields.String(), values=fields.List(fields.String()))
