"""A typed client for RunComfy's Model API (async queue endpoints).

Every documented answer shape maps to a small dataclass or to one of two errors: transient
(try again later) or permanent (the job cannot succeed). See RUNCOMFY.md.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import requests
from urllib3.exceptions import NewConnectionError

from core.account import OUT_OF_BALANCE, TOKEN_REFUSED
from core.http.deadlines import DEADLINES, DeadlineAdapter, connect_failure
from core.retry_after import parse_retry_after_s

# RunComfy's answers are a few hundred bytes of JSON: one far longer is read no further.
MAX_ANSWER_BYTES = 1024 * 1024

# Statuses RunComfy (or its own clients) have been seen to report, by meaning. RunComfy's own
# nodes treat pending, waiting, starting and processing as still going: the first two are taken
# for a place in the queue, the last two for a run under way. Any other word is returned as is:
# a status not known is followed on (workers/decisions.py), not a failure.
QUEUED_STATUSES = frozenset({"in_queue", "queued", "pending", "waiting"})
RUNNING_STATUSES = frozenset({"in_progress", "running", "starting", "processing"})
SUCCEEDED_STATUSES = frozenset({"succeeded", "completed"})
FAILED_STATUSES = frozenset({"failed", "error"})
CANCELLED_STATUSES = frozenset({"cancelled", "canceled"})
FINISHED_STATUSES = SUCCEEDED_STATUSES | FAILED_STATUSES | CANCELLED_STATUSES
KNOWN_STATUSES = QUEUED_STATUSES | RUNNING_STATUSES | FINISHED_STATUSES
UNKNOWN_REQUEST_CODE = "404001"  # request id unknown or expired (RUNCOMFY.md)
OUT_OF_BALANCE_CODES = frozenset({"400002"})
TOKEN_REFUSED_CODES = frozenset({"400004", "401001"})
OTHER_ACCOUNTS_REQUEST_CODE = "403001"  # the request belongs to another account: not ours to wait
# What `price_unit` may say for a price per output image (RunComfy's nodes: `output`).
PER_IMAGE_PRICE_UNITS = frozenset({"output", "outputs", "image", "images", "per_output"})
MAX_ERROR_TEXT = 500
MAX_SNIPPET_TEXT = 200
MAX_STATUS_WORD = 40  # a status word not known is kept (on the job, in a log) this long at most
CUT_MARK = "…"
MAX_ERROR_DEPTH = 4  # lists within lists RunComfy's error is read into; deeper is shown as is
# Any answer value as a short line, however deep or long (a plain str() of a value nested 600
# deep raised RecursionError: the step crashed on every try until the job's deadline).
_SNIPPETS = reprlib.Repr()
_PARTIAL_LAST_WORD = re.compile(r"(?<=\s)\S+\Z")
_TRAILING_SEPARATORS = re.compile(r"[\s,;:]+\Z")
_SNIPPETS.maxlevel, _SNIPPETS.maxstring, _SNIPPETS.maxother = 3, MAX_SNIPPET_TEXT, MAX_SNIPPET_TEXT


class UpstreamError(Exception):
    """RunComfy did not give a usable answer."""

    def __init__(self, message: str, *, http_status: int | None = None, code: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.http_status = http_status
        self.code = code


# RunComfy's "retry later; honour Retry-After if present" (RUNCOMFY.md): not acted on, either.
RETRY_LATER_STATUSES = (408, 429)
# A proxy in front of RunComfy gave up waiting for it (Cloudflare's 524 too): no answer came from
# RunComfy itself, which may well be running the call — as when our own timeout cuts it off.
GATEWAY_TIMEOUT_STATUSES = (504, 524)


class TransientUpstreamError(UpstreamError):
    """Try again later: timeouts, network errors, 408/429, 5xx."""

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        code: Any = None,
        retry_after_s: float | None = None,
        maybe_processed: bool = True,
    ) -> None:
        super().__init__(message, http_status=http_status, code=code)
        self.retry_after_s = retry_after_s
        # False only when RunComfy certainly did not act on the call (no connection, 408/429).
        self.maybe_processed = maybe_processed

    @property
    def went_unanswered(self) -> bool:
        """No answer came from RunComfy: none at all, or a gateway's timeout in its place."""
        return self.http_status is None or self.http_status in GATEWAY_TIMEOUT_STATUSES

    @property
    def asks_to_retry_later(self) -> bool:
        """A 408 or 429: RunComfy asks for the call again later, at Retry-After if it says."""
        return self.http_status in RETRY_LATER_STATUSES


class PermanentUpstreamError(UpstreamError):
    """The call cannot succeed as made: rejected input, auth, balance, bad payload."""


class AccountRefusedError(UpstreamError):
    """RunComfy refused the call for the account, not for the job: out of balance (402,
    `400002`) or the token refused (401/403, `400004`). Nothing was queued or paid; the same
    call succeeds once the account is put right, so the job waits — never fails — for it.

    Not a PermanentUpstreamError on purpose: code that does not know this error must not take
    it for the job's own failure."""

    def __init__(self, message: str, *, kind: str, http_status: int | None, code: Any) -> None:
        super().__init__(message, http_status=http_status, code=code)
        self.kind = kind  # OUT_OF_BALANCE or TOKEN_REFUSED


class UnusableAnswerError(PermanentUpstreamError):
    """A 2xx answer without an error that cannot be used (not a JSON object, too long, a submit
    answer without a request id): RunComfy most likely did what was asked."""


class UnknownRequestError(PermanentUpstreamError):
    """RunComfy does not know the request id (never existed, or expired)."""


@dataclass(frozen=True)
class SubmittedRequest:
    """RunComfy accepted a submit."""

    request_id: str


@dataclass(frozen=True)
class RequestState:
    """One look at a request: its status and, once finished, its output or error."""

    request_id: str
    status: str
    queue_position: int | None = None
    images: tuple[str, ...] | None = None
    error: str | None = None
    created_at: float | None = None  # RunComfy's clock, when it says (on /result)
    finished_at: float | None = None
    cost_usd: float | None = None  # what RunComfy billed for the run, when it says

    @property
    def is_queued(self) -> bool:
        return self.status in QUEUED_STATUSES

    @property
    def is_running(self) -> bool:
        return self.status in RUNNING_STATUSES

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED_STATUSES

    @property
    def is_known(self) -> bool:
        """The status word is one RunComfy (or its own clients) is known to use."""
        return self.status in KNOWN_STATUSES


@dataclass(frozen=True)
class CancelOutcome:
    """What a cancel achieved: `cancelled` or `not_cancellable`."""

    request_id: str
    cancelled: bool
    outcome: str


class RunComfyClient:
    """RunComfy Model API over one kept-alive `requests.Session`."""

    def __init__(
        self,
        *,
        base_url: str,
        token: str,
        model_id: str,
        timeout_s: float,
        connect_timeout_s: float = 5.0,
        pool_size: int = 64,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model_id = model_id
        self._timeout_s = timeout_s
        self._timeout = (min(connect_timeout_s, timeout_s), timeout_s)
        self._session = requests.Session()
        self._session.trust_env = False
        adapter = DeadlineAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._session.headers.update(
            {"Authorization": f"Bearer {token}", "User-Agent": "inpaint-gateway/1"}
        )

    def close(self) -> None:
        """Close pooled connections."""
        self._session.close()

    # --- calls ------------------------------------------------------------------------------

    def submit(self, inputs: dict[str, Any]) -> SubmittedRequest:
        """POST the model's input; RunComfy answers with a request id. Not idempotent."""
        body = self._call("POST", f"/v1/models/{quote(self.model_id, safe='/')}", json=inputs)
        request_id = body.get("request_id")
        if not isinstance(request_id, str) or not request_id:
            raise UnusableAnswerError(f"submit answer has no request_id: {_snippet(body)}")
        return SubmittedRequest(request_id)

    def status(self, request_id: str) -> RequestState:
        """GET /status: queued (with position), running, or finished (then read the result)."""
        body = self._call("GET", f"/v1/requests/{quote(request_id, safe='')}/status")
        status = _status_of(body)
        position = body.get("queue_position")
        return RequestState(
            request_id=request_id,
            status=status,
            queue_position=position if isinstance(position, int) else None,
        )

    def result(self, request_id: str) -> RequestState:
        """GET /result: the status, and the output images or error and the cost once finished."""
        path = f"/v1/requests/{quote(request_id, safe='')}/result?include_cost=true"
        body = self._call("GET", path)
        status = _status_of(body)
        if status == "completed":  # a /status word; /result should say succeeded or failed
            status = "failed" if body.get("error") and not body.get("output") else "succeeded"
        images: tuple[str, ...] | None = None
        error: str | None = None
        if status in SUCCEEDED_STATUSES:
            images = _images_of(body)
        elif status in FAILED_STATUSES:
            error = _readable_error(body.get("error")) or "RunComfy reported the run failed"
        return RequestState(
            request_id=request_id,
            status=status,
            images=images,
            error=error,
            created_at=_timestamp(body.get("created_at")),
            finished_at=_timestamp(body.get("finished_at")),
            cost_usd=_cost(body.get("cost")),
        )

    def cancel(self, request_id: str) -> CancelOutcome:
        """Ask RunComfy to cancel; only a queued request can be (branch on outcome)."""
        body = self._call("POST", f"/v1/requests/{quote(request_id, safe='')}/cancel")
        outcome = body.get("outcome") if isinstance(body.get("outcome"), str) else ""
        if outcome not in {"cancelled", "canceled", "not_cancellable"}:
            raise PermanentUpstreamError(f"cancel answer has no known outcome: {_snippet(body)}")
        return CancelOutcome(request_id, outcome in {"cancelled", "canceled"}, outcome)

    def list_price_usd(self) -> float:
        """GET /v1/models/{model_id}: the model's list price per output image, in USD."""
        body = self._call("GET", f"/v1/models/{quote(self.model_id, safe='/')}")
        price = _cost(body.get("base_price_usd"))
        if price is None:
            raise UnusableAnswerError(
                f"model answer has no usable base_price_usd: {_snippet(body)}"
            )
        unit = body.get("price_unit")
        if unit is not None and str(unit).strip().lower() not in PER_IMAGE_PRICE_UNITS:
            # A price per second or per run is not a price per image: guessing would misbill.
            raise UnusableAnswerError(f"model price is not per output image: {_snippet(unit)}")
        return price

    # --- one HTTP exchange -----------------------------------------------------------------

    def _call(self, method: str, path: str, json: Any = None) -> dict[str, Any]:
        url = self.base_url + path
        # timeout_s for the whole call, not only each wait for bytes: an answer that trickles
        # in must not hold a step past its lease (STEP_LEASE_S > 2 x RUNCOMFY_TIMEOUT_S), when
        # it would be taken again — for a submit, a second paid generation.
        with DEADLINES.within(self._timeout_s) as exchange:
            try:
                with self._session.request(
                    method,
                    url,
                    json=json,
                    timeout=self._timeout,
                    allow_redirects=False,
                    stream=True,  # read here, up to MAX_ANSWER_BYTES
                ) as response:
                    status, headers = response.status_code, response.headers
                    raw = _read_answer(response)
            except requests.RequestException as exc:
                failure = _transient(method, path, exc)
                # Cut off: the error is the deadline's, unless no connection was ever made.
                if exchange.cut_off and failure.maybe_processed:
                    raise self._cut_off(method, path) from exc
                raise failure from exc
        # Cut off, an answer may still come back whole-looking: http.client takes the end of the
        # connection for the end of the headers, or of a body read to its close.
        if exchange.cut_off:
            raise self._cut_off(method, path)
        return _interpret(method, path, status, headers, raw)

    def _cut_off(self, method: str, path: str) -> TransientUpstreamError:
        return TransientUpstreamError(
            f"{method} {path}: timed out waiting for RunComfy ({self._timeout_s:g} s in all)"
        )


def _transient(method: str, path: str, exc: requests.RequestException) -> TransientUpstreamError:
    """What a call that failed in transit comes to (to be raised from exc)."""
    where = f"{method} {path}"
    if isinstance(exc, requests.ConnectTimeout):
        return TransientUpstreamError(f"{where}: connect timeout", maybe_processed=False)
    if isinstance(exc, requests.Timeout):
        return TransientUpstreamError(f"{where}: timed out waiting for RunComfy")
    if isinstance(exc, requests.ConnectionError):
        not_made = _connection_not_made(exc)
        if not_made is None:
            return TransientUpstreamError(f"{where}: connection error")
        return TransientUpstreamError(f"{where}: {not_made}", maybe_processed=False)
    return TransientUpstreamError(f"{where}: {type(exc).__name__}")


def _read_answer(response: requests.Response) -> bytes | None:
    """The answer's body, or None if it is longer than MAX_ANSWER_BYTES (not read further)."""
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_content(chunk_size=64 * 1024):
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _interpret(
    method: str, path: str, status: int, headers: Mapping[str, str], raw: bytes | None
) -> dict[str, Any]:
    """The answer's JSON object, or the error it is (raw None: longer than MAX_ANSWER_BYTES)."""
    where = f"{method} {path}"
    try:
        body = json.loads(raw) if raw is not None else None
    except (ValueError, RecursionError):  # RecursionError: nested deeper than json can go
        body = None
    if status in RETRY_LATER_STATUSES or status >= 500:
        code, message = _error_fields(body)
        raise TransientUpstreamError(
            f"{where}: HTTP {status}{': ' + message if message else ''}",
            http_status=status,
            code=code,
            retry_after_s=parse_retry_after_s(headers.get("Retry-After")),
            maybe_processed=status not in RETRY_LATER_STATUSES,
        )
    account_kind = _account_refusal(status, _code_of(body))
    if account_kind is not None:  # (as HTTP 200 with the code too)
        code, message = _error_fields(body)
        raise AccountRefusedError(
            f"{where}: HTTP {status}{': ' + message if message else ''}"
            + (f" (error_code {code})" if code is not None else ""),
            kind=account_kind,
            http_status=status,
            code=code,
        )
    if status == 404 or _code_of(body) == UNKNOWN_REQUEST_CODE:  # (as HTTP 200 too)
        code, message = _error_fields(body)
        raise UnknownRequestError(
            f"{where}: HTTP {status}{': ' + message if message else ''}",
            http_status=status,
            code=code,
        )
    if not 200 <= status < 300:
        code, message = _error_fields(body)
        raise PermanentUpstreamError(
            f"{where}: HTTP {status}{': ' + message if message else ''}"
            + (f" (error_code {code})" if code is not None else ""),
            http_status=status,
            code=code,
        )
    if not isinstance(body, dict):
        what = f"longer than {MAX_ANSWER_BYTES} bytes" if raw is None else "not a JSON object"
        raise UnusableAnswerError(f"{where}: answer is {what}", http_status=status)
    if _code_of(body) is not None:
        code, message = _error_fields(body)
        error = PermanentUpstreamError if not _is_retryable_code(code) else TransientUpstreamError
        raise error(
            f"{where}: RunComfy error {code}{': ' + message if message else ''}",
            http_status=status,
            code=code,
        )
    return body


def _account_refusal(status: int, code: str | None) -> str | None:
    """OUT_OF_BALANCE or TOKEN_REFUSED when an answer refuses the account, else None."""
    if code in OUT_OF_BALANCE_CODES or status == 402:
        return OUT_OF_BALANCE
    if code in TOKEN_REFUSED_CODES or status == 401:
        return TOKEN_REFUSED
    if status == 403 and code != OTHER_ACCOUNTS_REQUEST_CODE:  # no access to the model
        return TOKEN_REFUSED
    return None


def _cost(value: Any) -> float | None:
    """A USD amount RunComfy gave: a finite number >= 0, else None (ignored, not an error)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        amount = float(value)
    except OverflowError:  # an integer of hundreds of digits
        return None
    return amount if math.isfinite(amount) and amount >= 0 else None


def _timestamp(value: Any) -> float | None:
    """An ISO-8601 time (or epoch seconds) as epoch seconds; None if absent or unreadable."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:  # an integer of hundreds of digits
            return None
        return seconds if math.isfinite(seconds) else None
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def _code_of(body: Any) -> str | None:
    """The answer's `error_code` as text ("404001"), or None."""
    code = body.get("error_code") if isinstance(body, dict) else None
    return None if code in (None, 0, "0") else str(code)


def _is_retryable_code(code: Any) -> bool:
    return str(code).startswith("5")


def _status_of(body: dict[str, Any]) -> str:
    """The answer's status word, lower case (one not known too: the caller decides)."""
    status = body.get("status")
    if not isinstance(status, str) or not status:
        raise PermanentUpstreamError(f"answer has no status: {_snippet(body)}")
    return shortened(status.strip().lower(), MAX_STATUS_WORD)


def _images_of(body: dict[str, Any]) -> tuple[str, ...]:
    output = body.get("output")
    if not isinstance(output, dict):
        raise PermanentUpstreamError(f"finished result has no output: {_snippet(body)}")
    found: list[str] = []
    for key in ("images", "image"):
        value = output.get(key)
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, list):
            found.extend(v for v in value if isinstance(v, str))
    if not found:
        raise PermanentUpstreamError(f"finished result has no image URLs: {_snippet(output)}")
    bad = [u for u in found if not u.startswith(("https://", "http://"))]
    if bad:
        raise PermanentUpstreamError(
            f"finished result has a non-URL image: {shortened(bad[0], 100)!r}"
        )
    return tuple(found)


def _readable_error(error: Any, depth: int = 0) -> str | None:
    """RunComfy's failure detail (a string, an object, or a list) as one readable line."""
    if error is None or error == "":
        return None
    if isinstance(error, str):
        text = error
    elif depth >= MAX_ERROR_DEPTH:
        text = _snippet(error)
    elif isinstance(error, dict):
        where = error.get("loc")  # a validation error's field path: ["body", "seed"]
        parts = [".".join(map(str, where))] if isinstance(where, list) and where else []
        parts += [
            _snippet(error[k]) for k in ("type", "code", "message", "msg", "detail") if error.get(k)
        ]
        text = ": ".join(parts) if parts else _snippet(error)
    elif isinstance(error, list):
        text = "; ".join(filter(None, (_readable_error(e, depth + 1) for e in error)))
    else:
        text = _snippet(error)
    return shortened(text, MAX_ERROR_TEXT)


def _error_fields(body: Any) -> tuple[Any, str]:
    if not isinstance(body, dict):
        return None, ""
    code = body.get("error_code")
    for key in ("error_message", "message", "error"):
        text = _readable_error(body.get(key))
        if text:
            break
    else:
        text = ""
    detail = _readable_error(body.get("detail"))  # what a 422's "invalid input" is about
    if detail and detail != text:
        text = f"{text}: {detail}" if text else detail
    return code, shortened(text, MAX_ERROR_TEXT)


def _connection_not_made(exc: BaseException) -> str | None:
    """Why no connection was made — so the request certainly never reached RunComfy — or None
    if one was (it failed later: RunComfy may have the request)."""
    failure = connect_failure(exc)
    if not isinstance(failure, NewConnectionError):  # (a connect timeout is told apart earlier)
        return None
    # "<connection>: Failed to resolve 'host' (…)", "…: Failed to establish a new connection:
    # [Errno 111] Connection refused": the connection's repr left out.
    return str(failure).partition(": ")[2] or "could not connect"


def _snippet(value: Any) -> str:
    """Any answer value as a short line (reprlib marks its own cuts inside a nested value)."""
    return shortened(value, MAX_SNIPPET_TEXT) if isinstance(value, str) else _SNIPPETS.repr(value)


def shortened(text: str, limit: int) -> str:
    """`text` in at most `limit` characters: cut after the last whole word that fits, the cut
    marked with CUT_MARK. A first word longer than that is cut inside it (marked all the same)."""
    if len(text) <= limit:
        return text
    kept = text[: limit - len(CUT_MARK)]
    if not text[len(kept)].isspace():  # the cut falls inside a word: leave that word out
        partial = _PARTIAL_LAST_WORD.search(kept)
        if partial is not None and kept[: partial.start()].strip():
            kept = kept[: partial.start()]
    return _TRAILING_SEPARATORS.sub("", kept) + CUT_MARK
