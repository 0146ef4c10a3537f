"""Copies of a finished run's output images into the media store (PRODUCT §10).

RunComfy deletes outputs after about 7 days; a job lives JOB_RETENTION_S. Before a job ends
succeeded, each image its answer names is downloaded and kept as an upload of the job's client
(content-addressed; the beat's cleanup removes it once expired), kept as long as the job.

An answer names URLs, and a URL in an answer is not trusted: only RunComfy's own hosts (https,
`*.runcomfy.net`) or the configured RUNCOMFY_BASE_URL's scheme, host and port are fetched — as
RunComfy's own client does — so a tampered or mistaken answer cannot make a worker call into
the internal network. No auth header, no redirects, no proxy from the environment, a timeout,
and a byte cap enforced while reading.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import SplitResult, urlsplit

import requests
import requests.adapters

from core.jobs import StoredImage
from core.media import MediaStoreError
from core.media_urls import record_owner
from core.uploads import ImageRefused, UploadStore, inspect_image

MAX_OUTPUT_BYTES = 32 * 1024 * 1024
RUNCOMFY_HOST_SUFFIX = ".runcomfy.net"
OUTPUT_FETCH_TIMEOUT_S = 30.0  # per read of the body, and to connect
CHUNK_BYTES = 64 * 1024
DEFAULT_PORTS = {"http": 80, "https": 443}


class OutputCopyFailed(Exception):
    """An output could not be copied; `will_not_improve`: trying again cannot help."""

    def __init__(self, message: str, *, will_not_improve: bool = False) -> None:
        super().__init__(message)
        self.will_not_improve = will_not_improve


def _origin(parts: SplitResult) -> tuple[str, str, int] | None:
    """(scheme, host, port) of a URL, the port filled in from the scheme; None if unusable."""
    try:
        port = parts.port or DEFAULT_PORTS.get(parts.scheme)
    except ValueError:  # a port out of range or not a number
        return None
    host = (parts.hostname or "").lower()
    if not host or port is None:
        return None
    return parts.scheme, host, port


def output_url_allowed(url: str, runcomfy_base_url: str) -> bool:
    """An output URL a worker may fetch: https on a `*.runcomfy.net` host (port 443), or the
    scheme, host and port of RUNCOMFY_BASE_URL; never one with credentials in it."""
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        return False
    origin = _origin(parts)
    if origin is None:
        return False
    scheme, host, port = origin
    if scheme == "https" and port == 443 and host.endswith(RUNCOMFY_HOST_SUFFIX):
        return True
    return origin == _origin(urlsplit(runcomfy_base_url))


def _new_session(connections: int) -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # no proxy, .netrc or CA bundle from the environment
    # As many kept connections as threads copying at once: a pool with no room for one
    # closes it, and the next copy pays a new connect.
    adapter = requests.adapters.HTTPAdapter(pool_maxsize=connections, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


@dataclass
class OutputCopier:
    """Downloads output images from RunComfy and keeps them as the job client's uploads."""

    uploads: UploadStore
    runcomfy_base_url: str
    keep_s: int  # as long as the job is kept (JOB_RETENTION_S)
    timeout_s: float = OUTPUT_FETCH_TIMEOUT_S
    connections: int = 10  # kept per host: as many as the threads that copy at once
    session: requests.Session = field(init=False)

    def __post_init__(self) -> None:
        self.session = _new_session(self.connections)

    def copy_all(self, client_id: str, urls: Sequence[str], now: float) -> tuple[StoredImage, ...]:
        """Each of `urls` kept for `client_id`, in order; OutputCopyFailed at the first that
        cannot be (a host refused is checked for every URL first: no fetch at all then)."""
        for url in urls:
            if not output_url_allowed(url, self.runcomfy_base_url):
                host = urlsplit(url).hostname or "?"
                raise OutputCopyFailed(
                    f"an output URL names {host!r}, not RunComfy's host: never fetched",
                    will_not_improve=True,
                )
        return tuple(self._copy(client_id, url, now) for url in urls)

    def _copy(self, client_id: str, url: str, now: float) -> StoredImage:
        data = self._download(url)
        try:
            facts = inspect_image(data, max_bytes=MAX_OUTPUT_BYTES, whole=False)
        except ImageRefused as exc:
            raise OutputCopyFailed(f"an output is not an image to keep: {exc}") from exc
        try:
            upload, _ = self.uploads.save(client_id, data, facts, now, keep_s=self.keep_s)
        except (MediaStoreError, OSError) as exc:
            raise OutputCopyFailed(f"the media store failed: {type(exc).__name__}") from exc
        record_owner(self.uploads.redis, upload.id, client_id, self.keep_s)
        return StoredImage(
            id=upload.id, sha256=upload.sha256, content_type=upload.content_type, bytes=upload.bytes
        )

    def _download(self, url: str) -> bytes:
        """The body at `url`, at most MAX_OUTPUT_BYTES, read as it streams in."""
        host = urlsplit(url).hostname
        try:
            with self.session.get(
                url,
                timeout=self.timeout_s,
                allow_redirects=False,
                stream=True,
                headers={"Accept": "image/*"},
            ) as response:
                if response.status_code != 200:
                    raise OutputCopyFailed(
                        f"{host} answered HTTP {response.status_code} for an output"
                    )
                declared = response.headers.get("Content-Length", "")
                if declared.isdigit() and int(declared) > MAX_OUTPUT_BYTES:
                    raise OutputCopyFailed(f"an output is over {MAX_OUTPUT_BYTES} bytes")
                body = bytearray()
                for chunk in response.iter_content(CHUNK_BYTES):
                    body += chunk
                    if len(body) > MAX_OUTPUT_BYTES:
                        raise OutputCopyFailed(f"an output is over {MAX_OUTPUT_BYTES} bytes")
                return bytes(body)
        except requests.RequestException as exc:
            raise OutputCopyFailed(
                f"fetching an output from {host} failed: {type(exc).__name__}"
            ) from exc

    def close(self) -> None:
        """Close the HTTP session."""
        self.session.close()
