"""Preflight (PRODUCT §10): what is checked of a job's two pictures before any paid submit.

Plain functions on bytes. The API runs them at accept on the images it holds (data URIs and
uploads: a 422), a worker before the submit on the ones it fetched (the job ends `failed` with
`input_invalid`). Each image is first checked alone by core.uploads.inspect_image (it decodes,
is a PNG, JPEG or WebP, within the size and pixel limits); here is what needs both, or the mask.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image

from core.uploads import ImageFacts

IMAGE_FIELD, MASK_FIELD = "image_url", "mask_image_url"
INPUT_INVALID = "input_invalid"
INPUT_UNREACHABLE = "input_unreachable"


@dataclass(frozen=True)
class HeldImage:
    """An input picture's bytes, with what inspect_image found of them."""

    data: bytes
    facts: ImageFacts


def mask_paints_nothing(mask: HeldImage) -> bool:
    """True if every pixel of the mask is black: nothing to repaint (white = repaint).

    `mask` has passed inspect_image, so it decodes within the pixel limit; decoded again only
    if that look did not find its brightest pixel.
    """
    if mask.facts.brightest is not None:
        return mask.facts.brightest == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(mask.data)) as image:
            brightest = image.convert("L").getextrema()[1]
    return brightest == 0


def preflight_problems(image: HeldImage | None, mask: HeldImage | None) -> dict[str, str]:
    """What is wrong with the pair, by field name: as much as the pictures held can tell
    (None: that one is not held here, e.g. a URL the API does not fetch). Empty: nothing."""
    problems: dict[str, str] = {}
    if mask is not None and mask_paints_nothing(mask):
        problems[MASK_FIELD] = (
            "The mask is all black: nothing to repaint (white marks what to repaint)."
        )
    if image is not None and mask is not None:
        size, mask_size = (
            (image.facts.width, image.facts.height),
            (
                mask.facts.width,
                mask.facts.height,
            ),
        )
        if size != mask_size:
            problems.setdefault(
                MASK_FIELD,
                f"The mask is {mask_size[0]}x{mask_size[1]}, the image {size[0]}x{size[1]}: "
                "they must be the same size.",
            )
    return problems
