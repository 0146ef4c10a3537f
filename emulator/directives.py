"""Per-request directives written into the prompt as `[emulator:KEY]` or `[emulator:KEY=VALUE]`."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

DIRECTIVE_PATTERN = re.compile(r"\[emulator:([A-Za-z0-9_-]+)(?:=([^\]]*))?\]")
DIRECTIVE_NAMES = (
    "fail",
    "queue",
    "run",
    "run-spread",
    "image",
    "images",
    "error",
    "submit-200-error",
    "submit-500",
    "submit-429",
    "submit-503",
    "submit-no-id",
    "submit-504",
    "bad-status",
    "no-status",
    "queued-word",
    "running-word",
    "no-output",
    "poll-500",
    "poll-429",
    "cancel-503",
    "output-host",
    "output-gone",
)
ERROR_SHAPE_VALUES = ("string", "object", "list")
# A status word the emulator may answer in place of in_queue / in_progress: RunComfy's other
# words (pending, waiting, starting, processing) or one no client knows.
STATUS_WORD_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,39}")
# Where `output-host=` points the output URLs: a host name or address, and a port.
OUTPUT_HOST_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}(:[0-9]{1,5})?")


class DirectiveError(ValueError):
    """A directive in the prompt is unknown or has a bad value."""


@dataclass(frozen=True)
class Directives:
    """What the prompt asks the emulator to do with this one request."""

    fail: bool = False
    queue_s: float | None = None
    run_s: float | None = None
    run_spread_s: float | None = None  # the run lasts run_s plus a random 0 to this
    output_style: str | None = None
    error_shape: str | None = None
    submit_200_error: bool = False
    submit_status: int | None = None
    submit_no_id: bool = False  # accepted (and billed), but the answer lacks request_id
    bad_status: bool = False
    no_status: bool = False  # every answer about it leaves out `status`
    queued_word: str | None = None  # the status word while queued, in place of in_queue
    running_word: str | None = None  # the status word while running, in place of in_progress
    no_output: bool = False
    poll_500_count: int = 0
    poll_429_count: int = 0
    cancel_unavailable: bool = False  # every cancel of it answers 503
    # The output URL names http://this-host[:port]/ in place of the emulator: an answer naming
    # a host that is not RunComfy's (a gateway must never fetch it).
    output_host: str | None = None
    output_gone: bool = False  # the output URL answers 404 at once (RunComfy deleted it)


def parse_directives(prompt: str) -> Directives:
    """Read every `[emulator:...]` token of the prompt; unknown keys or bad values raise."""
    found: dict[str, Any] = {}
    for match in DIRECTIVE_PATTERN.finditer(prompt):
        key = match.group(1).lower()
        value = match.group(2)
        if key not in DIRECTIVE_NAMES:
            raise DirectiveError(
                f"unknown emulator directive {key!r}; known: {', '.join(DIRECTIVE_NAMES)}"
            )
        if key in ("queue", "run"):
            found[f"{key}_s"] = _seconds(key, value)
        elif key == "run-spread":
            found["run_spread_s"] = _seconds(key, value)
        elif key in ("poll-500", "poll-429"):
            found[f"poll_{key[-3:]}_count"] = _count(key, value)
        elif key in ("queued-word", "running-word"):
            found[key.replace("-", "_")] = status_word(key, value)
        elif key == "output-host":
            if value is None or not OUTPUT_HOST_PATTERN.fullmatch(value):
                raise DirectiveError("output-host= needs a host, and optionally :port")
            found["output_host"] = value
        elif key == "error":
            if value not in ERROR_SHAPE_VALUES:
                raise DirectiveError(f"error= must be one of {', '.join(ERROR_SHAPE_VALUES)}")
            found["error_shape"] = value
        else:
            if value is not None:
                raise DirectiveError(f"emulator directive {key!r} takes no value")
            if key in ("image", "images"):
                found["output_style"] = key
            elif key == "submit-500":
                found["submit_status"] = 500
            elif key == "submit-429":
                found["submit_status"] = 429
            elif key == "submit-503":
                found["submit_status"] = 503
            elif key == "submit-504":  # accepted, then the gateway in front gives up waiting
                found["submit_status"] = 504
            elif key == "cancel-503":
                found["cancel_unavailable"] = True
            else:
                found[key.replace("-", "_")] = True
    return Directives(**found)


def _seconds(key: str, value: str | None) -> float:
    try:
        seconds = float(value or "")
    except ValueError:
        raise DirectiveError(f"{key}= needs a number of seconds") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise DirectiveError(f"{key}= needs a number of seconds >= 0")
    return seconds


def _count(key: str, value: str | None) -> int:
    if value is None or not value.isdigit():
        raise DirectiveError(f"{key}= needs a whole number >= 0")
    return int(value)


def status_word(name: str, value: object) -> str:
    """`value` checked as a status word to answer (lower case, [a-z0-9_], at most 40 long)."""
    if not isinstance(value, str) or not STATUS_WORD_PATTERN.fullmatch(value):
        raise DirectiveError(f"{name}= needs a status word: {STATUS_WORD_PATTERN.pattern}")
    return value
