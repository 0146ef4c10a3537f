"""A job's input pictures at accept (PRODUCT §10): each of `image_url` and `mask_image_url` is an
http(s) URL, a `data:image/…;base64,…` URI or an `upload:upl_…` reference.

The pictures the API holds (data URIs and uploads) are checked here, alone and as a pair, before
anything is stored; a data URI is then kept as an upload of the client, so that a job record,
its resource and its webhooks name the picture by its `upload:` ref and never carry base64.
URLs are left to the worker, which fetches them.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any

from core.preflight import IMAGE_FIELD, MASK_FIELD, HeldImage, preflight_problems
from core.uploads import (
    MAX_UPLOAD_BYTES,
    UPLOAD_ID_PATTERN,
    UPLOAD_REF_PREFIX,
    ImageFacts,
    ImageRefused,
    Upload,
    UploadStore,
    inspect_image,
)

IMAGE_FIELDS = (IMAGE_FIELD, MASK_FIELD)
DATA_URI_START = "data:"
DATA_URI_TYPES = ("image/png", "image/jpeg", "image/webp")
_DATA_URI_HEAD = re.compile(r"data:(image/(?:png|jpeg|webp));base64,")
_BASE64_CHARS = re.compile(r"[A-Za-z0-9+/]*={0,2}")
# Strict base64 (RFC 4648 §4: whole groups of four, padding only at the end) of at most 6 MiB.
# The OpenAPI document's pattern; the validator checks the same with a faster test (see
# data_uri_problem), which a test holds equal to this pattern.
DATA_URI_PATTERN = (
    r"^data:image/(png|jpeg|webp);base64,"
    r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
)
MAX_BASE64_CHARS = -(-MAX_UPLOAD_BYTES // 3) * 4
MAX_DATA_URI_CHARS = len("data:image/jpeg;base64,") + MAX_BASE64_CHARS
DATA_URI_RULE = (
    "A data URI, data:image/png|jpeg|webp;base64,<base64> (RFC 4648, padded, no line breaks) of "
    f"an image of at most {MAX_UPLOAD_BYTES // (1024 * 1024)} MiB ({MAX_DATA_URI_CHARS} "
    "characters) of the type it names."
)
UPLOAD_REF_PATTERN = rf"^{UPLOAD_REF_PREFIX}{UPLOAD_ID_PATTERN.pattern}$"
MAX_UPLOAD_REF_CHARS = len(UPLOAD_REF_PREFIX) + len("upl_") + 32
UPLOAD_REF_RULE = "An upload reference, upload:upl_ and 32 hex digits, as POST /v1/uploads answers."
# One message for another client's upload, an unknown one and an expired one: the answer must
# not tell which, or upload ids of other clients could be probed.
NO_SUCH_UPLOAD = "No upload of this client by that reference (unknown, expired or not yours)."


class InputRefused(ValueError):
    """A job's pictures cannot be taken (HTTP 422): what is wrong, by field name."""

    def __init__(self, errors: dict[str, str]) -> None:
        super().__init__("; ".join(f"{name}: {why}" for name, why in errors.items()))
        self.errors = errors


def is_data_uri(value: Any) -> bool:
    """Whether an input value is meant as a data URI (then it must be a whole, valid one)."""
    return isinstance(value, str) and value.startswith(DATA_URI_START)


def data_uri_problem(value: str) -> str | None:
    """What makes `value` not a DATA_URI_PATTERN data URI within MAX_DATA_URI_CHARS, or None.

    Equal to the pattern, without its cost: a regex of groups of four takes ~150 ms over 8 MB,
    this ~10 ms (a string of the base64 alphabet, then at most two "=", in whole groups of four
    is exactly a sequence of groups with the padding in the last).
    """
    if len(value) > MAX_DATA_URI_CHARS:
        return f"The data URI is over {MAX_DATA_URI_CHARS} characters. {DATA_URI_RULE}"
    head = _DATA_URI_HEAD.match(value)
    if head is None:
        return f"The data URI does not start data:image/png|jpeg|webp;base64,. {DATA_URI_RULE}"
    encoded = value[head.end() :]
    if len(encoded) % 4 or _BASE64_CHARS.fullmatch(encoded) is None:
        return f"The data URI's base64 is not strict, padded base64. {DATA_URI_RULE}"
    return None


def decode_data_uri(value: str) -> tuple[bytes, str]:
    """A data URI that passed data_uri_problem: its bytes and the type it declares."""
    head = _DATA_URI_HEAD.match(value)
    if head is None:
        raise ValueError("not a data URI")
    try:
        return base64.b64decode(value[head.end() :], validate=True), head.group(1)
    except binascii.Error as exc:
        raise ValueError("not base64") from exc


@dataclass(frozen=True)
class HeldInput:
    """One input picture the API holds: from a data URI (no upload yet) or an upload."""

    image: HeldImage
    upload: Upload | None


def _held_input(client_id: str, value: str, uploads: UploadStore) -> HeldInput | str | None:
    """The picture `value` names if the API holds it, None for a URL, or what is wrong."""
    if is_data_uri(value):
        try:
            data, declared = decode_data_uri(value)
            facts = inspect_image(data, declared)
        except ValueError as exc:  # ImageRefused too: a 413 of the bytes is a field's problem here
            message = str(exc) if isinstance(exc, ImageRefused) else "Not a base64 data URI."
            return f"The data URI's image: {message}"
        return HeldInput(HeldImage(data, facts), None)
    if value.startswith(UPLOAD_REF_PREFIX):
        found = uploads.load_ref(client_id, value)
        if found is None:
            return NO_SUCH_UPLOAD
        upload, data = found
        # What inspect_image found of these bytes at upload: no need to decode them again.
        facts = ImageFacts(upload.content_type, upload.width, upload.height)
        return HeldInput(HeldImage(data, facts), upload)
    return None


@dataclass(frozen=True)
class ResolvedInputs:
    """A job's input with every held picture named by its upload ref, and those uploads."""

    input: dict[str, Any]
    upload_ids: tuple[str, ...]


def resolve_inputs(
    client_id: str, job_input: dict[str, Any], uploads: UploadStore, now: float
) -> ResolvedInputs:
    """Check the pictures of `job_input` the API holds, alone and as a pair, then keep each data
    URI as an upload of the client. InputRefused (nothing stored) if one is not fit; the media
    store's errors (MediaStoreError, OSError) pass through.
    """
    held: dict[str, HeldInput] = {}
    errors: dict[str, str] = {}
    for name in IMAGE_FIELDS:
        found = _held_input(client_id, job_input[name], uploads)
        if isinstance(found, str):
            errors[name] = found
        elif found is not None:
            held[name] = found
    if errors:
        raise InputRefused(errors)
    image, mask = (held[name].image if name in held else None for name in IMAGE_FIELDS)
    problems = preflight_problems(image, mask)
    if problems:
        raise InputRefused(problems)
    resolved = dict(job_input)
    upload_ids: list[str] = []
    for name, picture in held.items():
        upload = picture.upload
        if upload is None:  # checked above: only now kept, so a refused pair leaves nothing
            upload, _ = uploads.save(client_id, picture.image.data, picture.image.facts, now)
        resolved[name] = upload.ref
        upload_ids.append(upload.id)
    return ResolvedInputs(resolved, tuple(dict.fromkeys(upload_ids)))
