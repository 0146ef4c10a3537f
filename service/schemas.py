"""HTTP boundary schemas: what a request may carry and what a response shows (and the OpenAPI doc).

The inpainting input mirrors RunComfy's model page (PRODUCT.md §5). Unknown fields are errors, so a
misspelt option can never be dropped silently. Numbers must be JSON numbers (not strings, not
booleans); limits that RunComfy does not publish are ours and are documented in docs/api.md.
"""

from __future__ import annotations

import json
import numbers
import re
from datetime import date
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validates, validates_schema
from marshmallow import validate as v

from core.http.egress import split_http_url
from core.inputs import (
    DATA_URI_PATTERN,
    DATA_URI_RULE,
    DATA_URI_START,
    MAX_DATA_URI_CHARS,
    MAX_UPLOAD_REF_CHARS,
    UPLOAD_REF_PATTERN,
    UPLOAD_REF_RULE,
    data_uri_problem,
)
from core.jobs import COST_SOURCES, Status
from core.limits import BUDGET_PERIODS
from core.usage import MAX_USAGE_DAYS
from core.webhooks import EVENT_TYPES, TERMINAL_EVENT_TYPES

MAX_PROMPT_CHARS = 8000
MAX_URL_CHARS = 4096
MAX_LORAS = 3
MAX_METADATA_BYTES = 4096
# Objects and arrays within objects and arrays, metadata itself the first: json.loads takes ~1,000
# levels, but measuring or storing such metadata runs deeper in the stack than the parse and
# would run out of recursion.
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
JOB_STATUSES = tuple(status.value for status in Status)

# The patterns below are both the validator and the OpenAPI `pattern` (apispec copies a
# validator's regex into the document), so they are written in the syntax Python's `re` and
# ECMA-262 (JSON Schema's dialect) read alike: no \d, \s or \w (Unicode in Python, ASCII in
# ECMA), no inline flags, no lookarounds; ^ and $ anchor them for JSON Schema, whose patterns
# are unanchored, and Python matches them whole (a $ there would let a final newline through).


def _ipv6_pattern() -> str:
    """RFC 3986's IPv6address: eight 16-bit groups, one run of them elided as "::", the last
    two possibly written as an IPv4 address."""
    h16 = "[0-9A-Fa-f]{1,4}"
    ls32 = f"(?:{h16}:{h16}|{_IPV4})"

    def groups(n: int) -> str:  # n groups, each followed by ":"
        return f"(?:{h16}:){{{n}}}" if n else ""

    def upto(n: int) -> str:  # at most n+1 groups before "::"
        return f"(?:(?:{h16}:){{0,{n}}}{h16})?" if n else f"(?:{h16})?"

    forms = [f"{groups(6)}{ls32}", f"::{groups(5)}{ls32}"]
    forms += [f"{upto(i)}::{groups(4 - i)}{ls32}" for i in range(4)]
    forms += [f"{upto(4)}::{ls32}", f"{upto(5)}::{h16}", f"{upto(6)}::"]
    return "(?:" + "|".join(forms) + ")"


_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_LABEL = "[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# The last label starts with a letter: one of digits (or 0x-hex) makes the name an IPv4 address
# to some parsers (0177.0.0.1, 2130706433), which the webhook check refuses.
_TOP_LABEL = "[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST = rf"(?:{_IPV4}|(?:{_LABEL}\.)*{_TOP_LABEL}|\[{_ipv6_pattern()}\])"
_PORT = "(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"
# RFC 3986's path, query and fragment characters; anything else percent-encoded.
_URL_CHAR = "(?:[A-Za-z0-9._~!$&'()*+,;=:@/-]|%[0-9A-Fa-f]{2})"
HTTP_URL_PATTERN = (
    rf"^[Hh][Tt][Tt][Pp][Ss]?://{_HOST}(?::{_PORT})?"
    rf"(?:/{_URL_CHAR}*)?(?:\?(?:{_URL_CHAR}|\?)*)?(?:#(?:{_URL_CHAR}|\?)*)?$"
)
URL_RULE = (
    f"An http or https URL (RFC 3986, ASCII, anything else percent-encoded) of at most "
    f"{MAX_URL_CHARS} characters: a host name whose last label starts with a letter, a "
    "dotted-decimal IPv4 address or a bracketed IPv6 address; no user name or password; a port, "
    "if any, 1-65535."
)
# Python's str.isspace() characters: a prompt needs one character that is not one of them.
_SPACE_CHARS = r"\t\n\x0b\x0c\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
NOT_BLANK_PATTERN = f"[^{_SPACE_CHARS}]"
# A page's cursor: the created_at (epoch seconds, as Python writes a float) and the id of the
# last job the page examined; the next page starts after it. Any such position is a valid cursor.
CURSOR_PATTERN = r"^[0-9]{1,16}\.[0-9]{1,20}_job_[0-9a-f]{24}$"
MAX_CURSOR_CHARS = 16 + 1 + 20 + 1 + 28


class WholeMatch(v.Validator):
    """The whole value matches `pattern`. apispec documents any validator with a `regex` as
    its field's `pattern` (v.Regexp's match would let a final newline pass)."""

    def __init__(self, pattern: str, *, error: str) -> None:
        self.regex = re.compile(pattern)
        self.message = error

    def found(self, value: str) -> bool:
        return self.regex.fullmatch(value) is not None

    def __call__(self, value: str) -> str:
        if not self.found(value):
            raise ValidationError(self.message)
        return value


class Contains(WholeMatch):
    """`pattern` is found somewhere in the value, as JSON Schema reads `pattern`."""

    def found(self, value: str) -> bool:
        return self.regex.search(value) is not None


class HttpUrl(WholeMatch):
    """HTTP_URL_PATTERN, saying what is wrong where split_http_url can tell."""

    def __init__(self) -> None:
        super().__init__(HTTP_URL_PATTERN, error=URL_RULE)

    def __call__(self, value: str) -> str:
        if not self.found(value):
            # No message echoes the URL: a password in it would go back in the answer.
            try:
                split_http_url(value, "URL")
            except ValueError as exc:
                raise ValidationError(f"{exc}. {URL_RULE}") from None
            raise ValidationError(URL_RULE)
        return value


IMAGE_INPUT_RULE = (
    "One of three forms: an http(s) URL, a data:image/png|jpeg|webp;base64,… URI (a body "
    "carrying one may be up to 16 MiB), or upload:upl_… (an upload of this client)."
)
_UPLOAD_REF = re.compile(UPLOAD_REF_PATTERN)


class ImageInput(v.Validator):
    """An input picture in one of its three forms, each judged by its own rule (the document's
    `anyOf`, see _image_input); the form is told by how the value starts. No message echoes
    the value: a data URI is megabytes, a URL may hold a password.

    No `regex` attribute and no v.Length: apispec would document either as the field's own
    `pattern` or `maxLength`, which only the URL form has.
    """

    def __init__(self) -> None:
        self.url = HttpUrl()

    def __call__(self, value: str) -> str:
        if value.startswith(DATA_URI_START):
            problem = data_uri_problem(value)
            if problem is not None:
                raise ValidationError(problem)
        elif value.startswith("upload:"):
            if _UPLOAD_REF.fullmatch(value) is None:
                raise ValidationError(UPLOAD_REF_RULE)
        elif len(value) > MAX_URL_CHARS:
            raise ValidationError(f"A URL must be at most {MAX_URL_CHARS} characters. {URL_RULE}")
        else:
            self.url(value)
        return value


def _image_input() -> fields.String:
    return fields.String(
        required=True,
        validate=ImageInput(),
        metadata={
            "description": IMAGE_INPUT_RULE,
            "anyOf": [
                {
                    "type": "string",
                    "maxLength": MAX_URL_CHARS,
                    "pattern": HTTP_URL_PATTERN,
                    "description": URL_RULE,
                },
                {
                    "type": "string",
                    "maxLength": MAX_DATA_URI_CHARS,
                    "pattern": DATA_URI_PATTERN,
                    "description": DATA_URI_RULE,
                },
                {
                    "type": "string",
                    "maxLength": MAX_UPLOAD_REF_CHARS,
                    "pattern": UPLOAD_REF_PATTERN,
                    "description": UPLOAD_REF_RULE,
                },
            ],
        },
    )


class StrictFloat(fields.Float):
    """A JSON number (int or float), never a string or a boolean."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValidationError("Must be a number.")
        return super()._deserialize(value, attr, data, **kwargs)


class StrictInteger(fields.Integer):
    """A JSON number without a fraction (7 or 7.0, as JSON Schema's `integer` has it), never a
    string or a boolean; taken as an int."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(strict=True, **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        if isinstance(value, float) and value.is_integer():  # finite: the parser refuses others
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValidationError("Must be an integer.")
        return super()._deserialize(value, attr, data, **kwargs)


def _http_url(more: str = "", **kwargs: Any) -> fields.String:
    return fields.String(
        validate=[v.Length(max=MAX_URL_CHARS), HttpUrl()],
        metadata={"description": f"{URL_RULE} {more}".strip()},
        **kwargs,
    )


def _unit_interval(default: float, description: str | None = None) -> StrictFloat:
    return StrictFloat(
        load_default=default,
        validate=v.Range(0, 1),
        metadata={"description": description} if description else {},
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
    """The model's input fields, exactly as RunComfy takes them.

    control_start must not exceed control_end (given or default): a 422 naming control_start.
    """

    prompt = fields.String(
        required=True,
        validate=[
            v.Length(min=1, max=MAX_PROMPT_CHARS),
            Contains(NOT_BLANK_PATTERN, error="Must not be blank."),
        ],
        metadata={"description": "Not blank: at least one character that is not white space."},
    )
    image_url = _image_input()
    mask_image_url = _image_input()
    control_start = _unit_interval(0.0, "Must not exceed control_end (given or its default).")
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

    @validates_schema
    def _control_window(self, data: dict[str, Any], **_: Any) -> None:
        start, end = data.get("control_start"), data.get("control_end")
        if start is not None and end is not None and start > end:
            raise ValidationError("Must not exceed control_end.", field_name="control_start")


INPUT_FIELDS = tuple(InpaintInputSchema().fields)


class JobCreateSchema(InpaintInputSchema):
    """POST /v1/jobs: the model input, flat, plus how to call back."""

    webhook_url = _http_url(
        "Its host must resolve, at submit, to public addresses only (or ones in the operator's "
        "WEBHOOK_ALLOWED_NETWORKS); else a 422.",
        load_default=None,
    )
    webhook_events = fields.List(
        fields.String(validate=v.OneOf(EVENT_TYPES)),
        load_default=lambda: list(TERMINAL_EVENT_TYPES),
        validate=v.Length(min=1, max=len(EVENT_TYPES)),
        metadata={
            "description": "Each event type once; default: the four terminal events.",
            "uniqueItems": True,
        },
    )
    metadata = fields.Dict(
        keys=fields.String(),
        load_default=None,
        metadata={
            "description": f"Any JSON object, echoed back: at most {MAX_METADATA_BYTES} bytes "
            f"written as compact UTF-8 JSON, at most {MAX_METADATA_DEPTH} levels of objects and "
            "arrays (itself the first).",
            # JSON Schema has no keyword for either limit: stated for tools as extensions.
            "x-max-bytes": MAX_METADATA_BYTES,
            "x-max-depth": MAX_METADATA_DEPTH,
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


class QueryInteger(fields.Integer):
    """An integer in a query string: ASCII digits (int() also takes " 5", "+5", "5_0" and
    other scripts' digits, none of which the document's `integer` allows)."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        if not isinstance(value, str) or not _QUERY_INTEGER.fullmatch(value):
            raise ValidationError("Must be an integer (ASCII digits).")
        return super()._deserialize(value, attr, data, **kwargs)


_QUERY_INTEGER = re.compile("-?[0-9]+")


class JobListQuerySchema(StrictSchema):
    """GET /v1/jobs query."""

    # No load_default: absent is no filter (the view's .get); a None default made the document
    # offer "null" as a status, which is refused.
    status = fields.String(validate=v.OneOf(JOB_STATUSES))
    limit = QueryInteger(load_default=20, validate=v.Range(1, 100))
    cursor = fields.String(
        validate=[
            v.Length(max=MAX_CURSOR_CHARS),
            WholeMatch(CURSOR_PATTERN, error="Must be a next_cursor this API returned."),
        ],
        metadata={"description": "A next_cursor from an earlier page."},
    )


class StoredImageSchema(Schema):
    """One output image kept in the gateway's media store."""

    id = fields.String(metadata={"description": "The media id: GET /v1/media/{id}."})
    sha256 = fields.String()
    content_type = fields.String()
    bytes = fields.Integer()


MAX_WAIT_S = 60


class JobGetQuerySchema(StrictSchema):
    """GET /v1/jobs/{id} query."""

    wait = QueryInteger(
        validate=v.Range(1, MAX_WAIT_S),
        metadata={
            "description": f"Seconds, 1-{MAX_WAIT_S}: answer as soon as the job is final, or "
            "after this long with the job as it stands (200 either way). An answer before "
            "then with the job not final and `Retry-After` set: the API had no free wait slot; "
            "ask again after it."
        },
    )


class OutputSchema(Schema):
    """A succeeded job's images: kept by the gateway (`stored`) or, if copying them kept
    failing past OUTPUT_COPY_DEADLINE_S, RunComfy's own."""

    images = fields.List(
        fields.String(),
        metadata={
            "description": "Signed gateway URLs, /v1/media/{id}?exp=…&sig=…, that work without a "
            "key until exp (signed afresh on every read); RunComfy's URLs when not stored."
        },
    )
    upstream_images = fields.List(
        fields.String(), metadata={"description": "RunComfy's URLs (deleted after ~7 days)."}
    )
    stored = fields.Boolean(
        metadata={"description": "The images are kept in the gateway's media store."}
    )
    media = fields.List(
        fields.Nested(StoredImageSchema),
        metadata={"description": "Per image, its stored copy ([] when not stored)."},
    )


class ErrorBodySchema(Schema):
    code = fields.String()
    message = fields.String()


class UpstreamSchema(Schema):
    request_id = fields.String()
    status = fields.String(allow_none=True)
    queue_position = fields.Integer(allow_none=True)


class CostSchema(Schema):
    """What a job cost, once known (null until then)."""

    usd = fields.Float(metadata={"description": "USD; 0 for a job that never ran at RunComfy."})
    source = fields.String(
        validate=v.OneOf(COST_SOURCES),
        metadata={
            "description": "upstream: RunComfy's own figure; list_price: the model's list "
            "price times the images."
        },
    )


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
    cost = fields.Nested(CostSchema, allow_none=True)


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


class BudgetSchema(Schema):
    """A client's budget in its current period (USD)."""

    period = fields.String(validate=v.OneOf(BUDGET_PERIODS))
    period_id = fields.String(
        metadata={"description": "The UTC day (YYYY-MM-DD) or month (YYYY-MM)."}
    )
    limit_usd = fields.Float()
    spent_usd = fields.Float(metadata={"description": "Cost of the jobs ended in the period."})
    reserved_usd = fields.Float(
        metadata={"description": "Estimated cost of the jobs accepted in it and not ended yet."}
    )
    remaining_usd = fields.Float()


class ProblemSchema(Schema):
    """application/problem+json (RFC 9457)."""

    type = fields.String()
    title = fields.String()
    status = fields.Integer()
    detail = fields.String()
    errors = fields.Dict(keys=fields.String(), values=fields.List(fields.String()))
    budget = fields.Nested(
        BudgetSchema, metadata={"description": "With budget-exceeded: the budget refused."}
    )


DAY_PATTERN = r"^[1-9][0-9]{3}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$"


class UsageQuerySchema(StrictSchema):
    """GET /v1/usage query: UTC days, inclusive, at most MAX_USAGE_DAYS; `from` alone runs to
    today, `to` alone from the first of its month, neither: the current month."""

    from_ = fields.String(
        data_key="from",
        validate=WholeMatch(DAY_PATTERN, error="Must be a day, YYYY-MM-DD."),
        metadata={
            "format": "date",
            "description": "First UTC day, YYYY-MM-DD, not after `to` and at most "
            f"{MAX_USAGE_DAYS} days before it (default: the first of `to`'s month, or this "
            "month's first).",
        },
    )
    to = fields.String(
        validate=WholeMatch(DAY_PATTERN, error="Must be a day, YYYY-MM-DD."),
        metadata={
            "format": "date",
            "description": "Last UTC day, inclusive (default: today if `from` is given, else "
            "this month's last).",
        },
    )

    @validates_schema
    def _calendar_days(self, data: dict[str, Any], **_: Any) -> None:
        for name, key in (("from", "from_"), ("to", "to")):
            if key in data:
                try:
                    date.fromisoformat(data[key])
                except ValueError:
                    raise ValidationError("Not a calendar day.", name) from None


class UsageJobsSchema(Schema):
    """Jobs by the status they ended in."""

    succeeded = fields.Integer()
    failed = fields.Integer()
    cancelled = fields.Integer()
    expired = fields.Integer()


class UsageDaySchema(Schema):
    date = fields.String(metadata={"description": "UTC day, YYYY-MM-DD."})
    jobs = fields.Nested(UsageJobsSchema, metadata={"description": "Jobs that ended that day."})
    cost_usd = fields.Float(metadata={"description": "What the jobs that ended that day cost."})


class UsageTotalSchema(Schema):
    jobs = fields.Nested(UsageJobsSchema)
    cost_usd = fields.Float()


class LimitsSchema(Schema):
    """The limits the operator set on the client; null: none of that kind."""

    max_in_flight = fields.Integer(allow_none=True)
    max_queued = fields.Integer(allow_none=True)
    rate_per_min = fields.Integer(allow_none=True)
    budget_usd = fields.Float(allow_none=True)
    budget_period = fields.String(allow_none=True, validate=v.OneOf(BUDGET_PERIODS))


class UsageSchema(Schema):
    """A client's usage per UTC day, its limits and its budget."""

    client_id = fields.String()
    from_ = fields.String(data_key="from")
    to = fields.String()
    days = fields.List(fields.Nested(UsageDaySchema))
    total = fields.Nested(UsageTotalSchema)
    limits = fields.Nested(LimitsSchema)
    budget = fields.Nested(BudgetSchema, allow_none=True)


class UploadSchema(Schema):
    """An uploaded image: what decoding it found, and how to use it (`ref` in a job)."""

    id = fields.String(required=True, metadata={"pattern": r"^upl_[0-9a-f]{32}$"})
    ref = fields.String(required=True, metadata={"pattern": r"^upload:upl_[0-9a-f]{32}$"})
    sha256 = fields.String(required=True, metadata={"pattern": "^[0-9a-f]{64}$"})
    content_type = fields.String(
        required=True, validate=v.OneOf(["image/png", "image/jpeg", "image/webp"])
    )
    width = fields.Integer(required=True, validate=v.Range(min=1))
    height = fields.Integer(required=True, validate=v.Range(min=1))
    bytes = fields.Integer(required=True, validate=v.Range(min=1, max=6 * 1024 * 1024))
    expires_at = fields.String(required=True)
