"""Request parsing: JSON bodies only (415), strict JSON (no NaN/Infinity, bounded nesting), and
unknown query fields refused.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

import flask
import flask_smorest
from flask_smorest import Blueprint
from webargs import core
from webargs.flaskparser import FlaskParser, abort, is_json_request
from werkzeug.exceptions import RequestEntityTooLarge


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a finite number")
    return value


# A \uD800-\uDFFF escape: JSON lets one stand alone, but it is no character — text holding one
# cannot be written as UTF-8, so metadata holding one could be neither measured nor stored.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


# Python refuses to turn longer digit strings into an int (CVE-2020-10735); its message advises
# the operator (sys.set_int_max_str_digits), not the caller.
_MAX_INT_DIGITS = 4300


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise ValueError(f"a number has more than {_MAX_INT_DIGITS} digits")
    return int(text)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class StrictJsonParser(FlaskParser):
    """webargs' Flask parser, answering 400 for what json.loads would let through or crash on."""

    DEFAULT_UNKNOWN_BY_LOCATION: dict[str, str | None] = dict.fromkeys(
        FlaskParser.DEFAULT_UNKNOWN_BY_LOCATION, None
    )  # None: each schema's own Meta.unknown (ours: RAISE) decides, in every location

    def __init__(
        self,
        large_body_allowed: Callable[[Any], bool] | None = None,
        *,
        large_body_marker: bytes = b"",
        large_body_rule: str = "",
    ) -> None:
        """`large_body_allowed(body)`: whether a body over the app's MAX_CONTENT_LENGTH may be
        taken (up to the larger request.max_content_length its route set); else a 413 saying
        `large_body_rule`. Only the parsed body can tell, so a large one is parsed first,
        unless its bytes lack `large_body_marker`, which every allowed body holds."""
        super().__init__()
        self.large_body_allowed = large_body_allowed
        self.large_body_marker = large_body_marker
        self.large_body_rule = large_body_rule

    def _raw_load_json(self, req: flask.Request) -> Any:
        if not is_json_request(req):
            if req.content_length or "Transfer-Encoding" in req.headers:  # a body: chunked too
                # Here, not in a before_request hook: one hook less on every request (~2% of a POST's instructions).
                flask_smorest.abort(
                    415, message="Send the body as JSON with Content-Type: application/json."
                )
            return core.missing
        encoding = req.headers.get("Content-Encoding")
        if encoding and encoding.lower() != "identity":  # else a gzip body reads as "not UTF-8"
            flask_smorest.abort(415, message="Send the body uncompressed (no Content-Encoding).")
        raw = req.get_data(cache=True)
        if not raw:
            return core.missing
        # Chunked, Werkzeug reads a body up to the limit and stops without a word: a body cut
        # there could still parse (a JSON one padded to the limit) and lose its tail.
        limit = req.max_content_length
        at_limit = req.content_length is None and limit is not None and len(raw) >= limit
        if at_limit and req.environ["wsgi.input"].read(1):  # and more behind it
            raise RequestEntityTooLarge()
        small_limit = flask.current_app.config["MAX_CONTENT_LENGTH"]
        if len(raw) > small_limit and (
            self.large_body_allowed is None or self.large_body_marker not in raw
        ):
            raise RequestEntityTooLarge(self.large_body_rule or None)
        try:
            text = raw.decode("utf-8")
            body = json.loads(
                text,
                parse_float=_finite_float,
                parse_int=_bounded_int,
                parse_constant=_no_constants,
            )
            if _SURROGATE_ESCAPE.search(raw):  # rare: only then the whole check (a dump)
                json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise json.JSONDecodeError("a \\u escape is half a surrogate pair", "?", 0) from None
        except UnicodeDecodeError as exc:
            raise json.JSONDecodeError(f"not UTF-8: {exc.reason}", "?", exc.start) from None
        except RecursionError:
            raise json.JSONDecodeError("nested too deeply", "?", 0) from None
        except json.JSONDecodeError:
            raise
        except ValueError as exc:
            raise json.JSONDecodeError(str(exc), "?", 0) from None
        if len(raw) > small_limit and not (
            self.large_body_allowed is not None and self.large_body_allowed(body)
        ):
            raise RequestEntityTooLarge(self.large_body_rule or None)
        return body

    def _handle_invalid_json_error(
        self, error: Any, req: flask.Request, *args: Any, **kwargs: Any
    ) -> Any:
        reason = getattr(error, "msg", None) or str(error)
        abort(400, exc=error, messages={"json": [f"Invalid JSON body: {reason}."]})


class StrictBlueprint(Blueprint):
    """flask-smorest Blueprint using StrictJsonParser."""

    ARGUMENTS_PARSER = StrictJsonParser()
