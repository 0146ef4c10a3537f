"""Input schema of the one emulated model, checked the way the real model page describes it."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from emulator.data_uris import DataUriError, DecodedImage, decode_data_uri, is_data_uri

MODEL_ID = "tongyi-mai/z-image/turbo/inpainting/lora"
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
MAX_LORAS = 3
IMAGE_FIELDS = ("image_url", "mask_image_url")
REQUIRED_FIELDS = ("prompt", *IMAGE_FIELDS)
DEFAULT_CONTROL_START = 0.0
DEFAULT_CONTROL_END = 0.6

Detail = dict[str, Any]


def _error(loc: list[str | int], msg: str, error_type: str) -> Detail:
    return {"loc": ["body", *loc], "msg": msg, "type": error_type}


def _as_number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _check_prompt(value: object) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return "must be a non-empty string"
    return None


def _check_image_reference(value: object) -> str | None:
    if not isinstance(value, str):
        return "must be a string URL"
    if is_data_uri(value):  # decoded and checked by read_image_inputs once the schema holds
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return "must be an http(s) URL or a data:image/(png|jpeg|webp);base64 URI"
    return None


def _check_unit_float(value: object) -> str | None:
    number = _as_number(value)
    if number is None or not 0 <= number <= 1:
        return "must be a number between 0 and 1"
    return None


def _check_image_size(value: object) -> str | None:
    return None if value in IMAGE_SIZES else f"must be one of {', '.join(IMAGE_SIZES)}"


def _check_steps(value: object) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 30:
        return "must be an integer between 1 and 30"
    return None


def _check_seed(value: object) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool):
        return "must be an integer"
    return None


def _check_output_format(value: object) -> str | None:
    return None if value in OUTPUT_FORMATS else f"must be one of {', '.join(OUTPUT_FORMATS)}"


_FIELD_CHECKS: dict[str, Callable[[object], str | None]] = {
    "prompt": _check_prompt,
    "image_url": _check_image_reference,
    "mask_image_url": _check_image_reference,
    "control_start": _check_unit_float,
    "control_end": _check_unit_float,
    "control_scale": _check_unit_float,
    "strength": _check_unit_float,
    "image_size": _check_image_size,
    "num_inference_steps": _check_steps,
    "seed": _check_seed,
    "output_format": _check_output_format,
}


def _check_loras(value: object) -> list[Detail]:
    if not isinstance(value, list):
        return [_error(["loras"], "must be a list", "type_error")]
    if len(value) > MAX_LORAS:
        return [_error(["loras"], f"must have at most {MAX_LORAS} items", "too_long")]
    errors: list[Detail] = []
    for index, lora in enumerate(value):
        if not isinstance(lora, dict):
            errors.append(_error(["loras", index], "must be an object", "type_error"))
            continue
        for key in lora.keys() - {"path", "scale"}:
            errors.append(_error(["loras", index, key], "extra field not permitted", "extra"))
        path = lora.get("path")
        if not isinstance(path, str) or not path.strip():
            errors.append(
                _error(["loras", index, "path"], "must be a non-empty string", "value_error")
            )
        scale = _as_number(lora.get("scale", 1.0))
        if scale is None or not 0 <= scale <= 4:
            errors.append(
                _error(["loras", index, "scale"], "must be a number between 0 and 4", "value_error")
            )
    return errors


def validate_model_input(body: object) -> list[Detail]:
    """Return the list of problems with a submit body; empty when it is valid."""
    if not isinstance(body, dict):
        return [{"loc": ["body"], "msg": "must be a JSON object", "type": "type_error"}]
    errors: list[Detail] = []
    for name in REQUIRED_FIELDS:
        if name not in body:
            errors.append(_error([name], "field required", "missing"))
    for name, value in body.items():
        if name == "loras":
            errors.extend(_check_loras(value))
            continue
        check = _FIELD_CHECKS.get(name)
        if check is None:
            errors.append(_error([name], "extra field not permitted", "extra"))
            continue
        problem = check(value)
        if problem is not None:
            errors.append(_error([name], problem, "value_error"))
    if not errors:
        start = body.get("control_start", DEFAULT_CONTROL_START)
        end = body.get("control_end", DEFAULT_CONTROL_END)
        if start > end:
            errors.append(_error(["control_start"], "must not exceed control_end", "value_error"))
    return errors


def read_image_inputs(body: dict[str, Any]) -> tuple[dict[str, DecodedImage], list[Detail]]:
    """Decode the data-URI image fields of a valid body: the images, or the problems found."""
    decoded: dict[str, DecodedImage] = {}
    errors: list[Detail] = []
    for name in IMAGE_FIELDS:
        if not is_data_uri(body[name]):
            continue
        try:
            decoded[name] = decode_data_uri(body[name])
        except DataUriError as exc:
            errors.append(_error([name], f"data URI {exc}", "value_error"))
    return decoded, errors
