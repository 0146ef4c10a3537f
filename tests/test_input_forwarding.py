"""A job's pictures on their way upstream (PRODUCT §10): fetched or loaded by the worker,
preflighted, and sent to RunComfy as data URIs — or the job fails before any submit."""

from __future__ import annotations

import base64
import hashlib
import io
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
from PIL import Image

from cli.stack import Stack, wait_until
from core.jobs import JobError, Status, new_job
from core.preflight import IMAGE_FIELD, INPUT_INVALID, INPUT_UNREACHABLE, MASK_FIELD
from core.uploads import MAX_UPLOAD_BYTES, inspect_image
from tests.support.api import ApiClient
from tests.support.stack import admit
from tests.test_end_to_end import job_body, submits_for, unique
from workers import decisions
from workers.pipeline import JobPipeline
from workers.upstream_inputs import (
    Fetched,
    FetchFailed,
    ImageFetcher,
    TooBig,
    UpstreamInputs,
    answer_failure,
    data_uri,
    exchange_failure,
    first_preflight_refusal,
    where_from,
)

LOOPBACK = ("127.0.0.0/8",)


def png(
    size: tuple[int, int],
    *,
    mode: str = "RGB",
    background: Any = (200, 40, 40),
    square: bool = True,
) -> bytes:
    """A PNG of one color, with (`square`) a white square in it: a mask that paints something."""
    picture = Image.new(mode, size, background)
    if square:
        width, height = size
        white = 255 if mode == "L" else (255, 255, 255)
        picture.paste(white, (width // 4, height // 4, width // 2, height // 2))
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue()


IMAGE = png((64, 48))
MASK = png((64, 48), mode="L", background=16)
BLACK_MASK = png((64, 48), mode="L", background=0, square=False)
SMALL_MASK = png((32, 32), mode="L", background=16)


@dataclass
class Answer:
    """What PictureServer answers a path with."""

    status: int = 200
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    length: bool = True  # send Content-Length (else the body ends when the connection closes)
    dribble_s: float = 0.0  # wait this long between bytes


class PictureServer:
    """A small HTTP server on 127.0.0.1 answering chosen paths; counts requests per path."""

    def __init__(self) -> None:
        self.answers: dict[str, list[Answer]] = {}
        self.requests: dict[str, int] = {}
        self.headers_seen: dict[str, dict[str, str]] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_GET(self) -> None:
                server.requests[self.path] = server.requests.get(self.path, 0) + 1
                server.headers_seen[self.path] = dict(self.headers.items())
                queued = server.answers.get(self.path) or [Answer(404, b"not here")]
                answer = queued.pop(0) if len(queued) > 1 else queued[0]
                self.send_response(answer.status)
                for name, value in answer.headers:
                    self.send_header(name, value)
                if answer.length:
                    self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                try:
                    if answer.dribble_s:
                        for byte in answer.body:
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                            time.sleep(answer.dribble_s)
                    else:
                        self.wfile.write(answer.body)
                except OSError:
                    pass  # the fetcher stopped reading: what a cap or a deadline does

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def serve(self, path: str, *answers: Answer) -> str:
        self.answers[path] = list(answers)
        return self.url(path)


@pytest.fixture
def pictures() -> Iterator[PictureServer]:
    server = PictureServer()
    server.thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def received_inputs(stack: Stack, request_id: str) -> dict[str, dict[str, Any]]:
    answer = stack.emulator(f"/_emulator/requests/{request_id}")
    assert answer.status_code == 200, answer.text
    inputs: dict[str, dict[str, Any]] = answer.json()["inputs"]
    return inputs


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- plain functions ----------------------------------------------------------------------------


def test_a_data_uri_carries_the_bytes_and_their_type() -> None:
    uri = data_uri("image/png", IMAGE)
    head, _, encoded = uri.partition(",")
    assert head == "data:image/png;base64"
    assert base64.b64decode(encoded) == IMAGE


def test_where_from_names_host_and_port_but_never_the_query() -> None:
    assert where_from("https://images.example.com/a.png?X-Amz-Signature=secret") == (
        "images.example.com"
    )
    assert where_from("http://images.example.com:8080/a.png?sig=s") == "images.example.com:8080"
    assert where_from("http://[::1]:80/a.png") == "[::1]"
    with pytest.raises(ValueError, match="user name or password"):
        where_from("https://user:hunter2@images.example.com/a.png")


@pytest.mark.parametrize(
    ("status", "reason", "retry"),
    [
        (200, None, False),
        (204, None, False),
        (301, "redirect (HTTP 301), not followed", False),
        (302, "redirect (HTTP 302), not followed", False),
        (403, "it answered HTTP 403", False),
        (404, "it answered HTTP 404", False),
        (500, "it answered HTTP 500", True),
        (503, "it answered HTTP 503", True),
    ],
)
def test_what_an_answers_status_says_of_a_fetch(
    status: int, reason: str | None, retry: bool
) -> None:
    failure = answer_failure(status)
    if reason is None:
        assert failure is None
    else:
        assert failure is not None and reason in failure.reason
        assert failure.worth_retrying is retry


@pytest.mark.parametrize(
    ("exc", "reason", "retry"),
    [
        (requests.ConnectTimeout("x"), "not taken in time", True),
        (requests.ReadTimeout("x"), "no answer within 3 s", False),
        (requests.ConnectionError("x"), "the connection failed", True),
        (requests.exceptions.ContentDecodingError("x"), "could not be read", False),
        (ConnectionResetError("x"), "cut short", True),
    ],
)
def test_what_a_failed_exchange_comes_to(exc: Exception, reason: str, retry: bool) -> None:
    failure = exchange_failure(exc, cut_off=False, timeout_s=3)
    assert reason in failure.reason and failure.worth_retrying is retry


def test_an_exchange_cut_off_by_the_total_time_is_not_tried_again() -> None:
    failure = exchange_failure(requests.ConnectionError("x"), cut_off=True, timeout_s=2)
    assert failure.reason == "no whole answer within INPUT_FETCH_TIMEOUT_S (2 s)"
    assert not failure.worth_retrying


def test_the_first_preflight_problem_names_its_field_and_is_input_invalid() -> None:
    assert first_preflight_refusal({}) is None
    refused = first_preflight_refusal({MASK_FIELD: "The mask is all black."})
    assert refused is not None
    assert (refused.code, refused.message) == (
        INPUT_INVALID,
        "mask_image_url: The mask is all black.",
    )


def a_queued_job(**changes: Any) -> Any:
    job = new_job(
        client_id="cli_1",
        input={"prompt": "p"},
        webhook_url=None,
        webhook_events=(),
        metadata=None,
        deadline_s=900,
        now=1000.0,
    )
    return replace(job, **changes)


def test_refused_inputs_fail_a_queued_job_at_no_cost() -> None:
    error = JobError(INPUT_UNREACHABLE, "image_url: could not be fetched")
    step = decisions.refuse_inputs(a_queued_job(), error=error, now=1001.0)
    assert step is not None and step.next_step_at is None
    assert step.job.status is Status.FAILED and step.job.error == error
    assert (step.job.cost_usd, step.job.cost_source) == (0.0, "list_price")


def test_refused_inputs_leave_a_job_whose_submit_is_out_or_cancel_asked_alone() -> None:
    error = JobError(INPUT_INVALID, "x")
    assert (
        decisions.refuse_inputs(a_queued_job(submit_started_at=1000.5), error=error, now=1001.0)
        is None
    )
    assert (
        decisions.refuse_inputs(a_queued_job(cancel_requested=True), error=error, now=1001.0)
        is None
    )


def test_refused_inputs_on_a_resubmit_charge_the_run_the_unknown_submit_may_have_made() -> None:
    error = JobError(INPUT_UNREACHABLE, "x")
    job = a_queued_job(submit_unknown_outcomes=1)
    step = decisions.refuse_inputs(job, error=error, now=1001.0, list_price_usd=0.03)
    assert step is not None and step.job.cost_usd == 0.03


def test_a_payload_note_is_recorded_once_over_resubmits() -> None:
    note = "mask_image_url is over 6 MiB: passed to RunComfy as its URL, not preflighted"
    first = decisions.mark_submitting(a_queued_job(), 1001.0, lease_s=30, notes=(note,))
    assert first is not None
    again = replace(first.job, submit_started_at=None)
    second = decisions.mark_submitting(again, 1002.0, lease_s=30, notes=(note,))
    assert second is not None
    assert [kept for kept in second.job.notes if kept.endswith(note)] == [first.job.notes[-1]]


class PublicOverCapFetcher(ImageFetcher):
    """A fetcher whose every picture is over the cap on a public host (none reachable here)."""

    def fetch(self, url: str) -> Fetched | TooBig:
        return TooBig(public=True)


def test_a_picture_over_the_cap_on_a_public_host_goes_as_its_url_with_a_note(
    pipeline: JobPipeline,
) -> None:
    inputs = UpstreamInputs(
        uploads=pipeline.uploads,
        fetcher=PublicOverCapFetcher(allowed_networks=(), timeout_s=1),
        forward="data",
    )
    url = "https://images.example.com/huge.png?sig=abc"
    job = a_queued_job(input={"prompt": "p", IMAGE_FIELD: url, MASK_FIELD: url})
    payload = inputs.payload_for(job)
    assert payload.body == job.input
    assert len(payload.notes) == 2 and "image_url is over 6 MiB" in payload.notes[0]


# --- fetching, against a real HTTP server ---------------------------------------------------


def test_a_fetch_is_tried_again_once_after_a_5xx(pictures: PictureServer) -> None:
    url = pictures.serve("/flaky.png", Answer(503, b"busy"), Answer(200, IMAGE))
    with ImageFetcher(allowed_networks=LOOPBACK, timeout_s=5) as fetcher:
        fetched = fetcher.fetch(url)
    assert fetched == Fetched(IMAGE)
    assert pictures.requests["/flaky.png"] == 2
    sent = {name.lower(): value for name, value in pictures.headers_seen["/flaky.png"].items()}
    assert "authorization" not in sent and "cookie" not in sent
    assert sent["accept-encoding"] == "identity"


def test_a_fetch_is_not_tried_again_after_a_404(pictures: PictureServer) -> None:
    url = pictures.serve("/gone.png", Answer(404, b"no"))
    with (
        ImageFetcher(allowed_networks=LOOPBACK, timeout_s=5) as fetcher,
        pytest.raises(FetchFailed, match="HTTP 404"),
    ):
        fetcher.fetch(url)
    assert pictures.requests["/gone.png"] == 1


def test_a_fetch_ends_at_its_total_time_however_the_bytes_trickle(pictures: PictureServer) -> None:
    url = pictures.serve("/slow.png", Answer(200, IMAGE, dribble_s=0.2))
    started = time.monotonic()
    with (
        ImageFetcher(allowed_networks=LOOPBACK, timeout_s=1) as fetcher,
        pytest.raises(FetchFailed, match=r"no whole answer within INPUT_FETCH_TIMEOUT_S \(1 s\)"),
    ):
        fetcher.fetch(url)
    assert time.monotonic() - started < 3


def test_a_body_past_the_cap_is_read_no_further(pictures: PictureServer) -> None:
    """Without a Content-Length: the read stops one byte past the cap."""
    url = pictures.serve("/endless.png", Answer(200, b"\0" * (MAX_UPLOAD_BYTES * 2), length=False))
    with ImageFetcher(allowed_networks=LOOPBACK, timeout_s=5) as fetcher:
        fetched = fetcher.fetch(url)
    assert fetched == TooBig(public=False)


# --- jobs through the real worker -------------------------------------------------------------


def test_a_job_on_urls_reaches_runcomfy_as_data_uris_of_the_fetched_bytes(
    stack: Stack, api_client: ApiClient
) -> None:
    body = job_body(stack, unique("forwarded as data"))
    job = api_client.post("/v1/jobs", json=body).get_json()
    final = api_client.wait_final(job["id"])
    assert final["status"] == "succeeded", final
    assert final["input"][IMAGE_FIELD] == body[IMAGE_FIELD]  # the record keeps the URL
    received = received_inputs(stack, final["upstream"]["request_id"])
    for field in (IMAGE_FIELD, MASK_FIELD):
        served = requests.get(body[field], timeout=10).content
        assert received[field]["kind"] == "data_uri"
        assert received[field]["sha256"] == sha256(served)
        assert received[field]["content_type"] == "image/png"


def test_a_job_on_upload_refs_reaches_runcomfy_as_the_uploads_bytes(
    stack: Stack, api_client: ApiClient, pipeline: JobPipeline
) -> None:
    client_id = api_client.creds.client_id
    now = time.time()
    image, _ = pipeline.uploads.save(client_id, IMAGE, inspect_image(IMAGE), now)
    mask, _ = pipeline.uploads.save(client_id, MASK, inspect_image(MASK), now)
    job = new_job(
        client_id=client_id,
        input={"prompt": unique("from uploads"), IMAGE_FIELD: image.ref, MASK_FIELD: mask.ref},
        webhook_url=None,
        webhook_events=(),
        metadata=None,
        deadline_s=pipeline.settings.job_deadline_s,
    )
    pipeline.store.create(job)
    final = api_client.wait_final(job.id)
    assert final["status"] == "succeeded", final
    assert final["input"][IMAGE_FIELD] == image.ref
    received = received_inputs(stack, final["upstream"]["request_id"])
    assert received[IMAGE_FIELD]["kind"] == received[MASK_FIELD]["kind"] == "data_uri"
    assert received[IMAGE_FIELD]["sha256"] == image.sha256 == sha256(IMAGE)
    assert received[MASK_FIELD]["sha256"] == mask.sha256 == sha256(MASK)


def test_with_input_forward_url_runcomfy_gets_the_urls_and_nothing_is_fetched(
    stack: Stack, api_client: ApiClient, pipeline: JobPipeline, pictures: PictureServer
) -> None:
    by_url = replace(
        pipeline, settings=replace(pipeline.settings, input_forward="url"), inputs=None
    )
    image_url = pictures.serve("/image.png?sig=1", Answer(200, IMAGE))
    mask_url = pictures.serve("/mask.png", Answer(200, MASK))
    body = {"prompt": unique("forwarded as urls"), IMAGE_FIELD: image_url, MASK_FIELD: mask_url}
    stack.worker.signal(signal.SIGSTOP)
    try:
        job_id = api_client.post("/v1/jobs", json=body).get_json()["id"]
        admit(by_url)
        by_url.advance(job_id)
        submitted = api_client.get(f"/v1/jobs/{job_id}").get_json()
    finally:
        stack.worker.signal(signal.SIGCONT)
    assert submitted["status"] == "submitted", submitted
    received = received_inputs(stack, submitted["upstream"]["request_id"])
    assert received[IMAGE_FIELD]["kind"] == "url" and received[IMAGE_FIELD]["url"] == image_url
    assert received[MASK_FIELD]["url"] == mask_url
    assert api_client.wait_final(job_id)["status"] == "succeeded"


def test_a_refused_job_fails_with_a_webhook_its_slot_freed_and_nothing_submitted(
    stack: Stack,
    api_client: ApiClient,
    receiver: Any,
    pictures: PictureServer,
    pipeline: JobPipeline,
) -> None:
    prompt = unique("black mask")
    body = {
        "prompt": prompt,
        IMAGE_FIELD: pictures.serve("/image.png", Answer(200, IMAGE)),
        MASK_FIELD: pictures.serve("/black.png", Answer(200, BLACK_MASK)),
        "webhook_url": receiver.url,
    }
    job_id = api_client.post("/v1/jobs", json=body).get_json()["id"]
    final = api_client.wait_final(job_id)
    assert final["status"] == "failed", final
    assert final["error"]["code"] == INPUT_INVALID
    assert final["error"]["message"].startswith("mask_image_url: The mask is all black")
    assert final["cost"]["usd"] == 0 and final["upstream"] is None
    events = wait_until(receiver.received, what="webhook")
    assert [event.payload["type"] for event in events] == ["job.failed"]
    assert not pipeline.store.admission.holds_slot(job_id)
    assert submits_for(stack, prompt) == 0


REFUSALS = {
    "sizes differ": (MASK_FIELD, INPUT_INVALID, "they must be the same size"),
    "not an image": (IMAGE_FIELD, INPUT_INVALID, "not a whole PNG, JPEG or WebP image"),
    "404": (IMAGE_FIELD, INPUT_UNREACHABLE, "it answered HTTP 404"),
    "private address": (IMAGE_FIELD, INPUT_UNREACHABLE, "is a private address"),
    "metadata address": (MASK_FIELD, INPUT_UNREACHABLE, "is a cloud metadata address"),
    "redirect": (MASK_FIELD, INPUT_UNREACHABLE, "redirect (HTTP 302), not followed"),
    "over 6 MiB on loopback": (IMAGE_FIELD, INPUT_INVALID, "is over 6 MiB"),
    "no such host": (IMAGE_FIELD, INPUT_UNREACHABLE, "host pictures.invalid does not resolve"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_pictures_the_worker_refuses_fail_the_job_before_any_submit(
    stack: Stack, api_client: ApiClient, pictures: PictureServer, case: str
) -> None:
    field, code, why = REFUSALS[case]
    image = pictures.serve("/image.png", Answer(200, IMAGE))
    mask = pictures.serve("/mask.png", Answer(200, MASK))
    wrong = {
        "sizes differ": pictures.serve("/small.png", Answer(200, SMALL_MASK)),
        "not an image": pictures.serve("/page.png", Answer(200, b"<html>hello</html>")),
        "404": pictures.serve("/missing.png", Answer(404, b"no")),
        "private address": "http://10.255.255.1/in.png?token=secret-query",
        "metadata address": "http://169.254.169.254/latest/meta-data/",
        "redirect": pictures.serve("/moved.png", Answer(302, b"", (("Location", mask),))),
        "over 6 MiB on loopback": pictures.serve(
            "/huge.png", Answer(200, b"\x89PNG" + b"\0" * MAX_UPLOAD_BYTES)
        ),
        "no such host": "https://pictures.invalid/in.png",
    }[case]
    prompt = unique(f"refused: {case}")
    body = {"prompt": prompt, IMAGE_FIELD: image, MASK_FIELD: mask, field: wrong}
    started = time.monotonic()
    job_id = api_client.post("/v1/jobs", json=body).get_json()["id"]
    final = api_client.wait_final(job_id, timeout_s=15)
    assert final["status"] == "failed", final
    assert final["error"]["code"] == code
    message = final["error"]["message"]
    assert message.startswith(f"{field}: ") and why in message, message
    assert "secret-query" not in message
    assert final["cost"]["usd"] == 0
    assert submits_for(stack, prompt) == 0
    assert time.monotonic() - started < 10  # refused addresses fail at once, never hang


def test_an_upload_gone_before_the_submit_fails_the_job_input_invalid(
    stack: Stack, api_client: ApiClient, pipeline: JobPipeline
) -> None:
    client_id = api_client.creds.client_id
    image, _ = pipeline.uploads.save(client_id, IMAGE, inspect_image(IMAGE), time.time())
    mask, _ = pipeline.uploads.save(client_id, MASK, inspect_image(MASK), time.time())
    pipeline.uploads.redis.delete(pipeline.uploads._record_key(client_id, mask.id))
    prompt = unique("upload gone")
    job = new_job(
        client_id=client_id,
        input={"prompt": prompt, IMAGE_FIELD: image.ref, MASK_FIELD: mask.ref},
        webhook_url=None,
        webhook_events=(),
        metadata=None,
        deadline_s=pipeline.settings.job_deadline_s,
    )
    pipeline.store.create(job)
    final = api_client.wait_final(job.id)
    assert final["status"] == "failed", final
    assert final["error"]["code"] == INPUT_INVALID
    assert final["error"]["message"] == (
        f"mask_image_url: upload {mask.ref} is gone (expired or removed); upload it again"
    )
    assert submits_for(stack, prompt) == 0


def test_a_resubmit_builds_the_payload_again_and_may_then_refuse_it(
    stack: Stack, api_client: ApiClient, pipeline: JobPipeline, pictures: PictureServer
) -> None:
    """The first submit is answered with a 5xx (its outcome unknown: sent again); by the
    resubmit the mask has changed to all black. The pictures are fetched again, the job fails
    input_invalid, charged the one run the first submit may have made."""
    pipeline.settings = replace(pipeline.settings, submit_unknown="resubmit")  # type: ignore[assignment]
    body = {
        "prompt": unique("changed under a resubmit [emulator:submit-500]"),
        IMAGE_FIELD: pictures.serve("/image.png", Answer(200, IMAGE)),
        MASK_FIELD: pictures.serve("/mask.png", Answer(200, MASK), Answer(200, BLACK_MASK)),
    }
    stack.worker.signal(signal.SIGSTOP)
    try:
        job_id = api_client.post("/v1/jobs", json=body).get_json()["id"]
        admit(pipeline)
        pipeline.advance(job_id)
        resubmitting = pipeline.store.get(job_id)
        assert resubmitting is not None and resubmitting.status is Status.QUEUED
        assert resubmitting.submit_unknown_outcomes == 1
        pipeline.advance(job_id)
    finally:
        stack.worker.signal(signal.SIGCONT)
    job = pipeline.store.get(job_id)
    assert job is not None and job.status is Status.FAILED
    assert job.error is not None and job.error.code == INPUT_INVALID
    assert pictures.requests == {"/image.png": 2, "/mask.png": 2}
    price = pipeline.list_price.usd_per_image()  # type: ignore[union-attr]
    assert price and job.cost_usd == price
