"""Data-URI image inputs, decoded strictly and held to the limits RunComfy's own clients keep."""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from PIL import Image, UnidentifiedImageError

# RunComfy's ComfyUI nodes refuse to send a PNG over 6 MiB or an image over 32 000 000 pixels,
# and keep the whole request under 64 MiB: the Model API's own limits, as far as anyone knows.
MAX_IMAGE_BYTES = 6 * 1024 * 1024
MAX_IMAGE_PIXELS = 32_000_000
MAX_REQUEST_BYTES = 64 * 1024 * 1024
DATA_URI_PATTERN = re.compile(r"data:([^;,]*)((?:;[^;,]*)*),(.*)", re.DOTALL)
PILLOW_FORMAT_BY_TYPE = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}


class DataUriError(ValueError):
    """A data URI that is malformed, not the image it claims, or over a limit."""


@dataclass(frozen=True)
class DecodedImage:
    """The bytes a data URI carried, with what the emulator learned from them."""

    body: bytes
    content_type: str
    width: int
    height: int

    @property
    def sha256(self) -> str:
        """The hex SHA-256 of the decoded bytes."""
        return hashlib.sha256(self.body).hexdigest()

    def received(self) -> dict[str, Any]:
        """What the control API reports about this input (never the bytes themselves)."""
        return {
            "kind": "data_uri",
            "content_type": self.content_type,
            "bytes": len(self.body),
            "sha256": self.sha256,
            "width": self.width,
            "height": self.height,
        }


def is_data_uri(value: object) -> bool:
    """True when `value` is a string in the data: scheme (whether or not it is a good one)."""
    return isinstance(value, str) and value[:5].lower() == "data:"


def decode_data_uri(value: str) -> DecodedImage:
    """Decode a `data:image/(png|jpeg|webp);base64,…` URI and check it; raises DataUriError."""
    match = DATA_URI_PATTERN.fullmatch(value)
    if match is None or match.group(2).lower() != ";base64":
        raise DataUriError("must be data:image/(png|jpeg|webp);base64,<data>")
    content_type = match.group(1).lower()
    if content_type not in PILLOW_FORMAT_BY_TYPE:
        raise DataUriError(
            f"media type {content_type or '(none)'!r} is not one of "
            f"{', '.join(PILLOW_FORMAT_BY_TYPE)}"
        )
    try:
        body = base64.b64decode(match.group(3), validate=True)
    except (binascii.Error, ValueError):
        raise DataUriError("is not valid base64 (strict: no whitespace, correct padding)") from None
    if not body:
        raise DataUriError("carries no data")
    if len(body) > MAX_IMAGE_BYTES:
        raise DataUriError(f"decodes to {len(body)} bytes; at most {MAX_IMAGE_BYTES} (6 MiB)")
    width, height, real_format = _inspect_image(body)
    if real_format != PILLOW_FORMAT_BY_TYPE[content_type]:
        raise DataUriError(
            f"is declared {content_type} but the bytes are {real_format or 'unknown'}"
        )
    return DecodedImage(body=body, content_type=content_type, width=width, height=height)


def _inspect_image(body: bytes) -> tuple[int, int, str | None]:
    """Width, height and Pillow format of `body`, checking the pixel count before decoding."""
    try:
        with Image.open(BytesIO(body)) as image:
            width, height = image.size
            real_format = image.format
            if width * height > MAX_IMAGE_PIXELS:
                raise DataUriError(
                    f"is {width}x{height} = {width * height} pixels; at most {MAX_IMAGE_PIXELS}"
                )
            image.load()  # a header that opens can still hide a truncated or corrupt body
    except DataUriError:
        raise
    # Pillow refuses (or, below twice its limit, warns about) a huge pixel count from the header
    # alone; tests turn that warning into an error, production only prints it and the check above
    # refuses the image: either way the same answer.
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataUriError(
            f"declares more pixels than Pillow will open (a decompression bomb); "
            f"at most {MAX_IMAGE_PIXELS}"
        ) from None
    except UnidentifiedImageError:
        raise DataUriError("is not an image (Pillow cannot identify the bytes)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise DataUriError(f"is not a decodable image: {exc}") from None
    return width, height, real_format
