"""What goes upstream for a job's two pictures (PRODUCT §10): the submit's payload, built before
any paid submit.

The job's `input` names each picture by an http(s) URL or an `upload:upl_…` reference; RunComfy
gets the bytes as a data URI, so internal and pre-signed URLs work and RunComfy fetches nothing
of ours. An upload's bytes come from the upload store; a URL's are fetched here under the egress
rules (the addresses INPUT_ALLOWED_NETWORKS allows, or public ones; the checked address pinned; no
redirect followed), at most MAX_FETCH_BYTES, within INPUT_FETCH_TIMEOUT_S, then decoded and
preflighted. A picture that cannot go upstream raises PictureRefused, and the job fails without
ever reaching RunComfy. The job's `input` itself is never changed: its record carries no base64.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Literal

import requests
import urllib3

from core.http.deadlines import DEADLINES
from core.http.egress import (
    DEFAULT_PORTS,
    EgressPolicy,
    RefusedDestination,
    egress_session,
    split_http_url,
)
from core.jobs import Job
from core.preflight import (
    IMAGE_FIELD,
    INPUT_INVALID,
    INPUT_UNREACHABLE,
    MASK_FIELD,
    HeldImage,
    preflight_problems,
)
from core.uploads import (
    MAX_UPLOAD_BYTES,
    UPLOAD_REF_PREFIX,
    ImageFacts,
    ImageRefused,
    UploadStore,
    inspect_image,
)

IMAGE_FIELDS = (IMAGE_FIELD, MASK_FIELD)
# The data-URI limit RunComfy's own nodes keep to, and the gateway's for uploads.
MAX_FETCH_BYTES = MAX_UPLOAD_BYTES
READ_CHUNK_BYTES = 64 * 1024
CONNECT_TIMEOUT_S = 5.0
FETCH_HEADERS = {
    "Accept": "image/png, image/jpeg, image/webp",
    # The bytes are counted as they arrive: a compressed answer could expand past the cap.
    "Accept-Encoding": "identity",
    "User-Agent": "inpaint-gateway (input image fetch)",
}
ALLOWED_NETWORKS_SETTING = "INPUT_ALLOWED_NETWORKS"


class PictureRefused(Exception):
    """A picture the job cannot go upstream with: the job fails with `code` and `message`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class FetchFailed(Exception):
    """A fetch got no image: `reason` says why; `worth_retrying` for a connection error or a
    5xx, which may be gone a moment later."""

    def __init__(self, reason: str, *, worth_retrying: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.worth_retrying = worth_retrying


@dataclass(frozen=True)
class Fetched:
    """A fetch's whole body, at most MAX_FETCH_BYTES."""

    data: bytes


@dataclass(frozen=True)
class TooBig:
    """A fetch's body was over MAX_FETCH_BYTES; `public`: its host is outside the allowed
    networks, so RunComfy can fetch the URL itself."""

    public: bool


@dataclass(frozen=True)
class UpstreamPayload:
    """The submit's body, and notes to record on the job (what was not preflighted, and why)."""

    body: dict[str, Any]
    notes: tuple[str, ...] = ()


# --- plain decisions ----------------------------------------------------------------------------


def data_uri(content_type: str, data: bytes) -> str:
    """`data` as a `data:<type>;base64,…` URI."""
    return f"data:{content_type};base64,{base64.b64encode(data).decode('ascii')}"


def where_from(url: str) -> str:
    """The host (and port, if not the scheme's default) a URL names: what a message may say of
    it — never its path's query or its user name or password."""
    parts = split_http_url(url, "URL")
    assert parts.hostname is not None  # split_http_url refused a URL without one
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    port = parts.port
    if port is None or port == DEFAULT_PORTS[parts.scheme.lower()]:
        return host
    return f"{host}:{port}"


def answer_failure(status_code: int) -> FetchFailed | None:
    """What an HTTP status says of a fetch: None for a 2xx (the body is the image)."""
    if 200 <= status_code < 300:
        return None
    if 300 <= status_code < 400:
        return FetchFailed(f"it answered with a redirect (HTTP {status_code}), not followed")
    return FetchFailed(f"it answered HTTP {status_code}", worth_retrying=status_code >= 500)


def exchange_failure(exc: Exception, *, cut_off: bool, timeout_s: float) -> FetchFailed:
    """What a failed exchange (requests' error, or urllib3's or the socket's while the body is
    read) comes to; `cut_off`: the fetch's total time ran out."""
    if cut_off:
        return FetchFailed(f"no whole answer within INPUT_FETCH_TIMEOUT_S ({timeout_s:g} s)")
    if isinstance(exc, RefusedDestination):  # its message names the host, never the address
        return FetchFailed(str(exc))
    if isinstance(exc, requests.ConnectTimeout):
        return FetchFailed("the connection was not taken in time", worth_retrying=True)
    if isinstance(exc, requests.Timeout | urllib3.exceptions.TimeoutError | TimeoutError):
        return FetchFailed(f"no answer within {timeout_s:g} s")
    if isinstance(exc, requests.ConnectionError):
        return FetchFailed("the connection failed", worth_retrying=True)
    if isinstance(exc, requests.RequestException):  # an OSError too: judged before that
        return FetchFailed("the answer could not be read")
    return FetchFailed("the answer was cut short", worth_retrying=True)


def refusal(field: str, code: str, why: str) -> PictureRefused:
    """The refusal of one picture, named by its field."""
    return PictureRefused(code, f"{field}: {why}")


def first_preflight_refusal(problems: dict[str, str]) -> PictureRefused | None:
    """The refusal preflight_problems' findings come to, or None if there are none."""
    for field in (*IMAGE_FIELDS, *problems):
        if field in problems:
            return refusal(field, INPUT_INVALID, problems[field])
    return None


# --- fetching -----------------------------------------------------------------------------------


class ImageFetcher:
    """Fetches input pictures under the egress rules, within a total time each."""

    def __init__(
        self,
        *,
        allowed_networks: tuple[str, ...],
        timeout_s: float,
        connections_per_host: int = 10,
    ) -> None:
        self.policy = EgressPolicy.from_cidrs(
            allowed_networks,
            what="image",
            setting=ALLOWED_NETWORKS_SETTING,
            plain_http_to_public=True,
        )
        self.timeout_s = timeout_s
        # One session for every fetch of the process: a job's two pictures, and the next job's,
        # mostly come from the same few hosts, and a connection kept saves each fetch a connect.
        # Every request is still checked and pinned to its address, and the session keeps no
        # cookies (egress_session). A pool as large as the threads fetching at once
        # (`connections_per_host`): a smaller one drops each connection it has no room for.
        self.session = egress_session(self.policy, connections_per_host=connections_per_host)

    def close(self) -> None:
        """Close the kept connections."""
        self.session.close()

    def __enter__(self) -> ImageFetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fetch(self, url: str) -> Fetched | TooBig:
        """The picture at `url`, tried again at once after a connection error or a 5xx; both
        tries within `timeout_s` in all. FetchFailed when no image came."""
        session = self.session
        with DEADLINES.within(self.timeout_s) as exchange:
            for attempt in (1, 2):
                try:
                    return self._fetch_once(session, url)
                except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
                    failure = exchange_failure(
                        exc, cut_off=exchange.cut_off, timeout_s=self.timeout_s
                    )
                except FetchFailed as exc:
                    failure = exc
                left_s = DEADLINES.left_s()
                if attempt == 2 or not failure.worth_retrying or (left_s or 0) <= 0:
                    raise failure
        raise AssertionError("the second try returns or raises")

    def _fetch_once(self, session: requests.Session, url: str) -> Fetched | TooBig:
        read_timeout_s = self.timeout_s
        with session.get(
            url,
            headers=FETCH_HEADERS,
            timeout=(min(CONNECT_TIMEOUT_S, read_timeout_s), read_timeout_s),
            allow_redirects=False,
            stream=True,
        ) as response:
            failure = answer_failure(response.status_code)
            if failure is not None:
                raise failure
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > MAX_FETCH_BYTES:
                return TooBig(public=self._is_public(url))
            body = bytearray()
            # Never more than one byte past the cap: enough to know it is over.
            while len(body) <= MAX_FETCH_BYTES:
                chunk = response.raw.read(
                    min(READ_CHUNK_BYTES, MAX_FETCH_BYTES + 1 - len(body)), decode_content=False
                )
                if not chunk:
                    return Fetched(bytes(body))
                body += chunk
            return TooBig(public=self._is_public(url))

    def _is_public(self, url: str) -> bool:
        """Whether every address the URL's host resolves to is outside the allowed networks
        (RunComfy, on the internet, can reach it; an allowed private network it cannot)."""
        parts = split_http_url(url, "URL")
        assert parts.hostname is not None
        scheme = parts.scheme.lower()
        addresses = self.policy.checked_addresses(
            parts.hostname, parts.port or DEFAULT_PORTS[scheme], scheme=scheme
        )
        return not any(self.policy.in_allowed_networks(address) for address in addresses)


# --- the payload --------------------------------------------------------------------------------


class UpstreamInputs:
    """Builds a job's submit payload: its pictures fetched or loaded, preflighted, as data URIs."""

    def __init__(
        self, *, uploads: UploadStore, fetcher: ImageFetcher, forward: Literal["data", "url"]
    ) -> None:
        self.uploads = uploads
        self.fetcher = fetcher
        self.forward = forward

    def payload_for(self, job: Job) -> UpstreamPayload:
        """The body to submit for `job`; PictureRefused if a picture cannot go upstream."""
        body = dict(job.input)
        held: dict[str, HeldImage] = {}
        notes: list[str] = []
        for field in IMAGE_FIELDS:
            value = job.input.get(field)
            if not isinstance(value, str) or value[:5].lower() == "data:":
                continue  # a data URI the API checked goes as it is
            if value.startswith(UPLOAD_REF_PREFIX):
                held[field] = self._load_upload(job.client_id, field, value)
            elif self.forward == "url":
                continue  # passed through; RunComfy fetches it
            else:
                fetched = self._fetch(field, value)
                if fetched is None:
                    notes.append(
                        f"{field} is over {MAX_FETCH_BYTES // (1024 * 1024)} MiB: passed to "
                        "RunComfy as its URL, not preflighted"
                    )
                    continue
                held[field] = fetched
            body[field] = data_uri(held[field].facts.content_type, held[field].data)
        refused = first_preflight_refusal(
            preflight_problems(held.get(IMAGE_FIELD), held.get(MASK_FIELD))
        )
        if refused is not None:
            raise refused
        return UpstreamPayload(body, tuple(notes))

    def _load_upload(self, client_id: str, field: str, ref: str) -> HeldImage:
        loaded = self.uploads.load_ref(client_id, ref)
        if loaded is None:
            raise refusal(
                field, INPUT_INVALID, f"upload {ref} is gone (expired or removed); upload it again"
            )
        upload, data = loaded
        return HeldImage(data, ImageFacts(upload.content_type, upload.width, upload.height))

    def _fetch(self, field: str, url: str) -> HeldImage | None:
        """The picture at `url`, checked; None if it is over the cap on a public host."""
        try:
            source = where_from(url)
        except ValueError as exc:
            raise refusal(field, INPUT_INVALID, f"not a URL the gateway fetches ({exc})") from None
        try:
            fetched = self.fetcher.fetch(url)
        except FetchFailed as exc:
            raise refusal(
                field, INPUT_UNREACHABLE, f"could not be fetched from {source}: {exc.reason}"
            ) from None
        if isinstance(fetched, TooBig):
            if fetched.public:
                return None
            raise refusal(
                field,
                INPUT_INVALID,
                f"the picture at {source} is over {MAX_FETCH_BYTES // (1024 * 1024)} MiB, and "
                f"its host is on a network RunComfy cannot reach ({ALLOWED_NETWORKS_SETTING})",
            )
        try:
            # The mask's brightest pixel from the same decode: preflight needs no other.
            facts = inspect_image(fetched.data, brightest=field == MASK_FIELD)
        except ImageRefused as exc:
            raise refusal(field, INPUT_INVALID, f"the answer from {source}: {exc}") from None
        return HeldImage(fetched.data, facts)
