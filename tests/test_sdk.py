"""The Python SDK (clients/python) against a real stack over HTTP: its own gunicorn API, Redis,
emulator, worker and beat; every exception raised from a real answer."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from inpaint_gateway_client import (
    AuthError,
    BudgetExceeded,
    ChecksumMismatch,
    Client,
    Conflict,
    Event,
    GatewayUnavailable,
    InvalidWebhook,
    Job,
    NotFound,
    RateLimited,
    ServerError,
    TooManyJobs,
    ValidationError,
    WaitTimeout,
    verify_webhook,
)

from cli.stack import Stack, free_port, wait_until
from core.clients import ClientStore, NewClientCredentials
from core.limits import ClientLimits
from tests.support.stack import served_stack

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LONG_RUN = "[emulator:queue=30]"  # cancellable all along: RunComfy cancels queued requests


@pytest.fixture(scope="module")
def sdk_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Redis, emulator, gunicorn API, then worker and beat (whose PUBLIC_BASE_URL is the API's,
    so outputs are whole signed URLs)."""
    with served_stack(tmp_path_factory.mktemp("sdk"), "sdk") as stack:
        yield stack


def new_credentials(stack: Stack, limits: ClientLimits | None = None) -> NewClientCredentials:
    """A fresh client of the stack (its own jobs only), with `limits` set if given."""
    with stack.redis() as redis_client:
        store = ClientStore(redis_client)
        creds = store.create("sdk-test")
        if limits is not None:
            store.set_limits(creds.client_id, limits)
    return creds


@pytest.fixture
def creds(sdk_stack: Stack) -> NewClientCredentials:
    return new_credentials(sdk_stack)


@pytest.fixture
def gateway(sdk_stack: Stack, creds: NewClientCredentials) -> Iterator[Client]:
    with Client(sdk_stack.api_url, creds.api_key, timeout=10) as client:
        yield client


@pytest.fixture
def samples(sdk_stack: Stack, tmp_path: Path) -> tuple[Path, Path]:
    """The emulator's sample picture and mask, saved as local files."""
    paths = []
    for name in ("image", "mask"):
        answer = requests.get(f"{sdk_stack.emulator_url}/samples/{name}.png", timeout=10)
        answer.raise_for_status()
        path = tmp_path / f"{name}.png"
        path.write_bytes(answer.content)
        paths.append(path)
    return paths[0], paths[1]


def sample_urls(stack: Stack) -> dict[str, str]:
    return {
        "image": f"{stack.emulator_url}/samples/image.png",
        "mask": f"{stack.emulator_url}/samples/mask.png",
    }


# --- jobs end to end ---------------------------------------------------------------------------


def test_run_from_local_files_uploads_them_and_download_keeps_the_output(
    gateway: Client, samples: tuple[Path, Path], tmp_path: Path
) -> None:
    image, mask = samples
    seen: list[str] = []
    job = gateway.run(
        prompt="a red sky",
        image=str(image),
        mask=mask,
        timeout=60,
        on_progress=lambda j: seen.append(j.status),
        seed=7,
    )
    assert job.status == "succeeded", job
    assert job.input["image_url"].startswith("upload:upl_")
    assert job.input["mask_image_url"].startswith("upload:upl_")
    assert job.input["seed"] == 7
    assert seen[0] == "queued" and seen[-1] == "succeeded"
    [media] = job.media
    [saved] = gateway.download(job, tmp_path / "out")
    assert saved == tmp_path / "out" / f"{media.id}.png"
    content = saved.read_bytes()
    assert content.startswith(PNG_SIGNATURE)
    assert hashlib.sha256(content).hexdigest() == media.sha256
    assert not list((tmp_path / "out").glob("*.part"))


def test_run_from_a_url_and_bytes_sends_the_url_as_it_is(
    sdk_stack: Stack, gateway: Client, samples: tuple[Path, Path]
) -> None:
    urls = sample_urls(sdk_stack)
    job = gateway.run(
        prompt="a blue sky", image=urls["image"], mask=samples[1].read_bytes(), timeout=60
    )
    assert job.status == "succeeded", job
    assert job.input["image_url"] == urls["image"]
    assert job.input["mask_image_url"].startswith("upload:upl_")
    assert gateway.get(job.id) == job


def test_upload_answers_the_same_ref_for_the_same_bytes(
    gateway: Client, samples: tuple[Path, Path]
) -> None:
    from_path = gateway.upload(samples[0])
    from_bytes = gateway.upload(samples[0].read_bytes())
    assert from_path.ref == from_bytes.ref == f"upload:{from_path.id}"
    assert from_path.sha256 == hashlib.sha256(samples[0].read_bytes()).hexdigest()
    assert from_path.content_type == "image/png" and from_path.width > 0


def test_jobs_iterates_over_every_page(sdk_stack: Stack, gateway: Client) -> None:
    urls = sample_urls(sdk_stack)
    submitted = [
        gateway.submit(prompt=f"page {n}", image=urls["image"], mask=urls["mask"]).id
        for n in range(5)
    ]
    listed = [job.id for job in gateway.jobs(page_size=2)]
    assert listed == list(reversed(submitted))  # newest first, each once, over three pages
    for job_id in submitted:
        gateway.wait(job_id)  # no timeout: as long as it takes
    assert [j.id for j in gateway.jobs(status="succeeded", page_size=2)] == listed
    assert list(gateway.jobs(status="failed")) == []


def test_wait_gives_up_after_its_timeout_and_the_job_goes_on(
    sdk_stack: Stack, gateway: Client
) -> None:
    urls = sample_urls(sdk_stack)
    job = gateway.submit(prompt=f"slow {LONG_RUN}", image=urls["image"], mask=urls["mask"])
    started = time.monotonic()
    with pytest.raises(WaitTimeout) as timed_out:
        gateway.wait(job.id, timeout=2)
    assert 1.5 <= time.monotonic() - started < 6
    assert timed_out.value.job.id == job.id and not timed_out.value.job.is_final
    assert not gateway.get(job.id).is_final
    assert gateway.cancel(job.id).id == job.id
    assert gateway.wait(job.id, timeout=30).status == "cancelled"


def test_usage_counts_the_clients_jobs(sdk_stack: Stack, gateway: Client) -> None:
    urls = sample_urls(sdk_stack)
    job = gateway.run(prompt="count me", image=urls["image"], mask=urls["mask"], timeout=60)
    usage = gateway.usage()
    assert usage.total["jobs"]["succeeded"] == 1
    assert usage.cost_usd == pytest.approx(job.cost["usd"] if job.cost else 0)
    today = job.finished_at[:10] if job.finished_at else ""
    assert [d["date"] for d in gateway.usage(from_=today, to=today).days] == [today]


# --- errors, each from a real answer -----------------------------------------------------------


def test_a_wrong_key_is_an_auth_error_that_never_shows_the_key(sdk_stack: Stack) -> None:
    key = "igw_not-a-real-key-0123456789"
    client = Client(sdk_stack.api_url, key)
    with client, pytest.raises(AuthError) as refused:
        client.get("job_nope")
    assert refused.value.status == 401
    assert key not in str(refused.value) and key not in repr(refused.value)
    assert key not in repr(client)


def test_an_unknown_job_is_not_found(gateway: Client) -> None:
    with pytest.raises(NotFound) as missing:
        gateway.get("job_0123456789abcdef")
    assert missing.value.status == 404 and missing.value.type.endswith("/not-found")


def test_bad_fields_are_a_validation_error_naming_each(sdk_stack: Stack, gateway: Client) -> None:
    urls = sample_urls(sdk_stack)
    with pytest.raises(ValidationError) as invalid:
        gateway.submit(
            prompt="x", image=urls["image"], mask=urls["mask"], strength=5, image_size="huge"
        )
    assert invalid.value.status == 422
    assert {"strength", "image_size"} <= set(invalid.value.errors)
    assert "strength" in str(invalid.value)
    with pytest.raises(TypeError):  # refused before any request: it would override image=
        gateway.submit(prompt="x", image=urls["image"], mask=urls["mask"], image_url=urls["mask"])


def test_cancelling_a_final_job_is_a_conflict(sdk_stack: Stack, gateway: Client) -> None:
    urls = sample_urls(sdk_stack)
    job = gateway.run(prompt="done", image=urls["image"], mask=urls["mask"], timeout=60)
    with pytest.raises(Conflict) as conflict:
        gateway.cancel(job.id)
    assert conflict.value.status == 409


def test_max_queued_is_too_many_jobs_with_retry_after(sdk_stack: Stack) -> None:
    creds = new_credentials(sdk_stack, ClientLimits(max_queued=1))
    urls = sample_urls(sdk_stack)
    with Client(sdk_stack.api_url, creds.api_key) as client:
        first = client.submit(prompt=f"hold {LONG_RUN}", image=urls["image"], mask=urls["mask"])
        with pytest.raises(TooManyJobs) as refused:
            client.submit(prompt="second", image=urls["image"], mask=urls["mask"])
        client.cancel(first.id)
    assert refused.value.status == 429
    assert refused.value.retry_after is not None and refused.value.retry_after >= 0


def test_rate_per_min_is_rate_limited_with_retry_after(sdk_stack: Stack) -> None:
    creds = new_credentials(sdk_stack, ClientLimits(rate_per_min=1))
    urls = sample_urls(sdk_stack)
    with Client(sdk_stack.api_url, creds.api_key) as client:
        client.submit(prompt="one", image=urls["image"], mask=urls["mask"])
        with pytest.raises(RateLimited) as refused:
            client.submit(prompt="two", image=urls["image"], mask=urls["mask"])
    assert refused.value.status == 429
    assert refused.value.retry_after is not None and refused.value.retry_after > 0


def test_a_spent_budget_is_budget_exceeded_with_the_budget(sdk_stack: Stack) -> None:
    creds = new_credentials(sdk_stack, ClientLimits(budget_usd=0, budget_period="day"))
    urls = sample_urls(sdk_stack)
    with Client(sdk_stack.api_url, creds.api_key) as client:
        # The list price is learnt from the upstream's model page; until then: 503, retry.
        refused = wait_until(
            lambda: _budget_refusal(client, urls), timeout_s=20, what="a budget refusal"
        )
    assert refused.status == 402
    assert refused.budget["limit_usd"] == 0 and refused.budget["period"] == "day"


def _budget_refusal(client: Client, urls: dict[str, str]) -> BudgetExceeded | None:
    try:
        client.submit(prompt="too dear", image=urls["image"], mask=urls["mask"])
    except BudgetExceeded as refused:
        return refused
    except ServerError as unavailable:
        if unavailable.status != 503:
            raise
        return None
    raise AssertionError("a job was accepted past a budget of 0")


def test_an_unreachable_gateway_is_gateway_unavailable_from_its_cause() -> None:
    key = "igw_secret-key-never-shown"
    client = Client(f"http://127.0.0.1:{free_port()}", key, timeout=2)
    with client, pytest.raises(GatewayUnavailable) as down:
        client.get("job_x")
    assert isinstance(down.value.__cause__, requests.ConnectionError)
    assert "cannot connect" in str(down.value) and key not in str(down.value)


# --- the protocol's corners, against a scripted gateway -----------------------------------------


class ScriptedGateway:
    """An HTTP server answering each GET with the next of `answers` (status, headers, body),
    keeping each request's path, arrival time and Authorization: for what the real stack
    rarely does."""

    def __init__(self, answers: list[tuple[int, dict[str, str], bytes]]) -> None:
        self.requests: list[tuple[str, float, str | None]] = []
        requests_seen, pending = self.requests, list(answers)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                requests_seen.append((self.path, time.monotonic(), self.headers["Authorization"]))
                status, headers, body = pending.pop(0)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def job_body(status: str, **extra: Any) -> dict[str, Any]:
    return {"id": "job_1", "status": status, "created_at": "", "input": {}, **extra}


def job_answer(status: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    headers = {"Content-Type": "application/json", **headers}
    return 200, headers, json.dumps(job_body(status)).encode()


def test_wait_pauses_as_retry_after_asks_when_no_wait_slot_was_free() -> None:
    gateway = ScriptedGateway(
        [job_answer("queued", **{"Retry-After": "1"}), job_answer("succeeded")]
    )
    try:
        with Client(gateway.url, "igw_k") as client:
            assert client.wait("job_1", timeout=90).status == "succeeded"
    finally:
        gateway.stop()
    (first, at_first, key), (second, at_second, _) = gateway.requests
    assert first == second == "/v1/jobs/job_1?wait=60"  # at most 60 s a request
    assert key == "Bearer igw_k"
    assert at_second - at_first >= 0.9


def test_wait_rides_out_a_gateway_briefly_unavailable() -> None:
    unavailable = (503, {"Retry-After": "0.5", "Content-Type": "application/problem+json"}, b"{}")
    gateway = ScriptedGateway([unavailable, unavailable, job_answer("succeeded")])
    try:
        with Client(gateway.url, "igw_k") as client:
            assert client.wait("job_1", timeout=30).status == "succeeded"
    finally:
        gateway.stop()
    assert len(gateway.requests) == 3


def test_download_refuses_bytes_whose_sha256_differs_and_keeps_nothing(tmp_path: Path) -> None:
    gateway = ScriptedGateway([(200, {"Content-Type": "image/png"}, PNG_SIGNATURE + b"tampered")])
    media = {"id": "upl_1", "sha256": "0" * 64, "content_type": "image/png", "bytes": 16}
    output = {"images": [f"{gateway.url}/v1/media/upl_1"], "media": [media]}
    job = Job.from_json(job_body("succeeded", output=output))
    try:
        with Client(gateway.url, "igw_k") as client, pytest.raises(ChecksumMismatch):
            client.download(job, tmp_path)
    finally:
        gateway.stop()
    assert list(tmp_path.iterdir()) == []
    [(_, _, key)] = gateway.requests
    assert key is None  # an output URL needs no key, and may be on another host


# --- webhooks -----------------------------------------------------------------------------------


class RawReceiver:
    """An HTTP server keeping each POST's exact bytes and headers, verifying nothing itself."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[bytes, dict[str, str]]] = []
        received = self.deliveries

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append((body, dict(self.headers.items())))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def raw_receiver() -> Iterator[RawReceiver]:
    receiver = RawReceiver()
    yield receiver
    receiver.stop()


def test_verify_webhook_accepts_a_real_delivery_and_refuses_a_tampered_one(
    sdk_stack: Stack,
    gateway: Client,
    creds: NewClientCredentials,
    raw_receiver: RawReceiver,
) -> None:
    urls = sample_urls(sdk_stack)
    job = gateway.submit(
        prompt="tell me", image=urls["image"], mask=urls["mask"], webhook_url=raw_receiver.url
    )
    wait_until(lambda: raw_receiver.deliveries, timeout_s=60, what="a webhook delivery")
    body, headers = raw_receiver.deliveries[0]
    event = verify_webhook(body, headers, creds.webhook_secret)
    assert isinstance(event, Event) and isinstance(event.job, Job)
    assert event.type == "job.succeeded" and event.job.id == job.id
    assert (
        event.webhook_id == {k.lower(): v for k, v in headers.items()}["webhook-id"]
        and event.timestamp
    )

    tampered = json.loads(body)
    tampered["data"]["status"] = "failed"
    with pytest.raises(InvalidWebhook):
        verify_webhook(json.dumps(tampered).encode(), headers, creds.webhook_secret)
    other_secret = new_credentials(sdk_stack).webhook_secret
    with pytest.raises(InvalidWebhook):
        verify_webhook(body, headers, other_secret)
