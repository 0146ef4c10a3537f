"""`Client`: inpaint-gateway's HTTP API over one requests.Session."""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit

import requests

from inpaint_gateway_client._errors import (
    ChecksumMismatch,
    GatewayUnavailable,
    ServerError,
    WaitTimeout,
    error_from_response,
)
from inpaint_gateway_client._models import Job, Media, Upload, Usage

DEFAULT_TIMEOUT_S = 30.0
# The gateway holds a `?wait` request at most this long (PRODUCT §11: 1 ≤ wait ≤ 60).
MAX_WAIT_PER_CALL_S = 60
# When a wait answers early with no Retry-After (no wait slot free), ask again after this.
WAIT_RETRY_S = 1.0
# `?wait` answers early only when the job is final; someone watching progress wants to see
# queued → submitted → running (and the queue position) too, so then each call is this short.
PROGRESS_WAIT_PER_CALL_S = 2
# A wait is a GET, safe to repeat: it rides out a gateway restarting or briefly without its
# store (503), this many failures in a row, pausing as asked or a little longer each time.
WAIT_RETRIES = 5
WAIT_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 8.0)
PAGE_SIZE = 100
DOWNLOAD_CHUNK_BYTES = 64 * 1024
# Strings sent as they are; anything else given as a str is a local file's path.
PASS_THROUGH_PREFIXES = ("http://", "https://", "upload:", "data:")
EXTENSIONS = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}

ImageSource = str | os.PathLike[str] | bytes
ProgressCallback = Callable[[Job], None]


class Client:
    """A team's client of inpaint-gateway: `Client(base_url, api_key, timeout=30)`."""

    def __init__(self, base_url: str, api_key: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        # Sent with the gateway's own routes only: never to an output URL on another host.
        self._auth = {"Authorization": f"Bearer {api_key}"}
        self._session = requests.Session()
        self._session.headers["User-Agent"] = "inpaint-gateway-client/0.1"

    def __repr__(self) -> str:
        return f"Client(base_url={self.base_url!r})"

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the session's connections."""
        self._session.close()

    # --- jobs ----------------------------------------------------------------------------------

    def submit(
        self,
        *,
        prompt: str,
        image: ImageSource,
        mask: ImageSource,
        webhook_url: str | None = None,
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        **inputs: Any,
    ) -> Job:
        """A new job; local files and bytes are uploaded first, URLs and refs sent as they are."""
        if {"image_url", "mask_image_url"} & inputs.keys():
            raise TypeError("give the pictures as image= and mask=")
        body: dict[str, Any] = {
            "prompt": prompt,
            "image_url": self._image_reference(image),
            "mask_image_url": self._image_reference(mask),
            **inputs,
        }
        if webhook_url is not None:
            body["webhook_url"] = webhook_url
        if metadata is not None:
            body["metadata"] = metadata
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return Job.from_json(self._request("POST", "/v1/jobs", json=body, headers=headers).json())

    def get(self, job_id: str) -> Job:
        """The job as it stands."""
        return Job.from_json(self._request("GET", _job_path(job_id)).json())

    def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> Job:
        """The job once final (long-polling `?wait`); WaitTimeout after `timeout` s if given.

        `on_progress` is called with each answer whose status or queue position changed (the
        gateway is then asked every couple of seconds, so that it sees those changes)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen: tuple[str, int | None] | None = None
        longest_s = MAX_WAIT_PER_CALL_S if on_progress is None else PROGRESS_WAIT_PER_CALL_S
        failures = 0
        while True:
            wait_s = longest_s
            if deadline is not None:
                wait_s = max(1, min(wait_s, math.ceil(deadline - time.monotonic())))
            try:
                response = self._request(
                    "GET",
                    _job_path(job_id),
                    params={"wait": wait_s},
                    timeout=self.timeout + wait_s,
                )
            except (GatewayUnavailable, ServerError) as failed:
                pause_s = failed.retry_after or WAIT_BACKOFF_S[min(failures, WAIT_RETRIES - 1)]
                failures += 1
                if failures > WAIT_RETRIES or (
                    deadline is not None and time.monotonic() + pause_s > deadline
                ):
                    raise
                time.sleep(pause_s)
                continue
            failures = 0
            job = Job.from_json(response.json())
            if on_progress is not None and (job.status, job.queue_position) != seen:
                seen = (job.status, job.queue_position)
                on_progress(job)
            if job.is_final:
                return job
            remaining = math.inf if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeout(job, timeout or 0)
            if "Retry-After" in response.headers:
                # No wait slot was free on the gateway: it answered at once, so pause as asked.
                time.sleep(min(_seconds(response.headers["Retry-After"]), remaining))

    def run(
        self,
        *,
        prompt: str,
        image: ImageSource,
        mask: ImageSource,
        timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
        **submit_options: Any,
    ) -> Job:
        """Submit, then wait until the job is final (see `submit` and `wait`)."""
        job = self.submit(prompt=prompt, image=image, mask=mask, **submit_options)
        if on_progress is not None:
            on_progress(job)
        return self.wait(job.id, timeout=timeout, on_progress=on_progress)

    def cancel(self, job_id: str) -> Job:
        """Cancel the job (done or requested); Conflict if it is already final."""
        return Job.from_json(self._request("POST", _job_path(job_id) + "/cancel").json())

    def jobs(self, *, status: str | None = None, page_size: int = PAGE_SIZE) -> Iterator[Job]:
        """Every one of the client's jobs, newest first, fetched a page at a time."""
        params: dict[str, Any] = {"limit": page_size}
        if status is not None:
            params["status"] = status
        while True:
            page = self._request("GET", "/v1/jobs", params=params).json()
            for body in page["jobs"]:
                yield Job.from_json(body)
            if not page.get("next_cursor"):
                return
            params["cursor"] = page["next_cursor"]

    # --- pictures -----------------------------------------------------------------------------

    def upload(self, source: str | os.PathLike[str] | bytes) -> Upload:
        """Upload an image (a local file's path or its bytes); use its `ref` in a job."""
        if isinstance(source, bytes):
            name, content = "image", source
        else:
            path = Path(source)
            name, content = path.name, path.read_bytes()
        # A part typed application/octet-stream is judged by its bytes (PNG, JPEG or WebP).
        files = {"file": (name, content, "application/octet-stream")}
        return Upload.from_json(self._request("POST", "/v1/uploads", files=files).json())

    def download(self, job: Job, directory: str | os.PathLike[str]) -> list[Path]:
        """Save each output image of `job` into `directory`, checking stored images' sha256."""
        target = Path(directory)
        target.mkdir(parents=True, exist_ok=True)
        media = job.media
        saved = []
        for index, url in enumerate(job.images):
            stored = media[index] if index < len(media) else None
            saved.append(self._download_one(url, target, job.id, index, stored))
        return saved

    def _download_one(
        self, url: str, directory: Path, job_id: str, index: int, stored: Media | None
    ) -> Path:
        try:
            # Signed URLs need no key, and an unstored output lives on another host: no auth.
            response = self._session.get(url, stream=True, timeout=self.timeout)
        except requests.RequestException as exc:
            raise GatewayUnavailable(_network_detail(exc, url)) from exc
        with response:
            if response.status_code >= 400:
                raise error_from_response(response)
            content_type = (
                stored.content_type
                if stored
                else response.headers.get("Content-Type", "").split(";")[0].strip()
            )
            stem = stored.id if stored else f"{job_id}-{index}"
            path = directory / (stem + EXTENSIONS.get(content_type, ".bin"))
            partial = path.with_name(path.name + ".part")
            digest = hashlib.sha256()
            try:
                with partial.open("wb") as out:
                    for chunk in response.iter_content(DOWNLOAD_CHUNK_BYTES):
                        digest.update(chunk)
                        out.write(chunk)
            except requests.RequestException as exc:
                partial.unlink(missing_ok=True)
                raise GatewayUnavailable(_network_detail(exc, url)) from exc
        if stored and digest.hexdigest() != stored.sha256:
            partial.unlink(missing_ok=True)
            raise ChecksumMismatch(stored.id, stored.sha256, digest.hexdigest())
        partial.replace(path)
        return path

    def _image_reference(self, source: ImageSource) -> str:
        """What a job's image field carries for `source`: a URL, a data URI or an upload ref."""
        if isinstance(source, str) and source.startswith(PASS_THROUGH_PREFIXES):
            return source
        return self.upload(source).ref

    # --- usage --------------------------------------------------------------------------------

    def usage(self, *, from_: date | str | None = None, to: date | str | None = None) -> Usage:
        """The client's jobs and spend per UTC day (default: this month)."""
        params = {
            name: value.isoformat() if isinstance(value, date) else value
            for name, value in (("from", from_), ("to", to))
            if value is not None
        }
        return Usage.from_json(self._request("GET", "/v1/usage", params=params).json())

    # --- transport ----------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> requests.Response:
        url = self.base_url + path
        try:
            response = self._session.request(
                method,
                url,
                headers=self._auth | (headers or {}),
                timeout=self.timeout if timeout is None else timeout,
                **kwargs,
            )
        except requests.RequestException as exc:
            raise GatewayUnavailable(_network_detail(exc, url)) from exc
        if response.status_code >= 400:
            raise error_from_response(response)
        return response


def _job_path(job_id: str) -> str:
    return "/v1/jobs/" + quote(job_id, safe="")


def _seconds(value: str) -> float:
    try:
        return max(0.0, float(value))
    except ValueError:
        return WAIT_RETRY_S


def _network_detail(exc: requests.RequestException, url: str) -> str:
    """A one-line reason naming the host, never the request's headers (they hold the key)."""
    host = urlsplit(url).netloc
    if isinstance(exc, requests.Timeout):
        return f"{host} did not answer in time"
    if isinstance(exc, requests.ConnectionError):
        return f"cannot connect to {host}"
    return f"request to {host} failed: {type(exc).__name__}"
