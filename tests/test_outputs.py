"""Outputs kept in our media store and served by signed URL (PRODUCT §10): the signing and the
host rule as plain functions; then a private stack (its own API under gunicorn, so that
PUBLIC_BASE_URL is real, and a short OUTPUT_COPY_DEADLINE_S) with the emulator over HTTP."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from cli.listener import WebhookReceiver
from cli.stack import Stack, wait_until
from core.clients import ClientStore, NewClientCredentials
from core.jobs import Job, Status, StoredImage, Upstream
from core.media_urls import (
    OWNER_KEY_PREFIX,
    MediaLinks,
    media_links,
    owner_of,
    record_owner,
    signature,
    signature_holds,
    signing_key,
)
from core.store import JobStore
from service import create_app
from tests.support.stack import served_stack
from workers import decisions
from workers.outputs import output_url_allowed
from workers.runcomfy import RequestState

KEY = bytes(range(32))
MEDIA_ID = "upl_" + "ab" * 16
COPY_DEADLINE_S = 3.0

# --- signing, as plain functions -------------------------------------------------------------


def test_a_signed_url_holds_for_its_id_until_it_expires() -> None:
    links = media_links(KEY, "https://gw.example/", now=1_000.4, ttl_s=60)
    url = links.url(MEDIA_ID)
    parts = urlsplit(url)
    assert (
        f"{parts.scheme}://{parts.netloc}{parts.path}" == f"https://gw.example/v1/media/{MEDIA_ID}"
    )
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert query["exp"] == "1060" and "=" not in query["sig"]  # base64url, unpadded
    assert signature_holds(KEY, MEDIA_ID, query["exp"], query["sig"], now=1_060)
    assert not signature_holds(KEY, MEDIA_ID, query["exp"], query["sig"], now=1_060.5)


@pytest.mark.parametrize(
    "media_id, exp, sig",
    [
        ("upl_" + "cd" * 16, "1060", None),  # another id
        (MEDIA_ID, "1061", None),  # a later expiry than signed
        (MEDIA_ID, "1060", "A" * 43),  # a made-up signature
        (MEDIA_ID, "1060", ""),
        (MEDIA_ID, "-1", None),
        (MEDIA_ID, "1e9", None),
        (MEDIA_ID, "", None),
    ],
)
def test_a_signature_does_not_hold_for_anything_else(
    media_id: str, exp: str, sig: str | None
) -> None:
    good = signature(KEY, MEDIA_ID, 1060)
    assert not signature_holds(KEY, media_id, exp, good if sig is None else sig, now=1_000)


def test_another_key_signs_otherwise_and_the_path_alone_is_a_base() -> None:
    assert signature(KEY, MEDIA_ID, 1060) != signature(bytes(32), MEDIA_ID, 1060)
    path_only = MediaLinks(key=KEY, base="", expires_at=1060).url(MEDIA_ID)
    assert path_only.startswith(f"/v1/media/{MEDIA_ID}?exp=1060&sig=")


# --- which output URLs a worker may fetch ------------------------------------------------------

EMULATOR = "http://127.0.0.1:8199"


@pytest.mark.parametrize(
    "url",
    [
        "https://model-api.runcomfy.net/outputs/x.png",
        "https://files.runcomfy.net:443/a/b.webp",
        "HTTPS://CDN.RUNCOMFY.NET/x.png",
        "http://127.0.0.1:8199/outputs/x.png",
    ],
)
def test_runcomfys_hosts_and_the_configured_base_are_fetched(url: str) -> None:
    assert output_url_allowed(url, EMULATOR)


@pytest.mark.parametrize(
    "url",
    [
        "http://files.runcomfy.net/x.png",  # not https
        "https://files.runcomfy.net:8443/x.png",  # another port
        "https://runcomfy.net.evil.example/x.png",
        "https://evilruncomfy.net/x.png",
        "https://user:pw@files.runcomfy.net/x.png",  # credentials in the URL
        "http://127.0.0.1:8200/outputs/x.png",  # the base's host, another port
        "https://127.0.0.1:8199/outputs/x.png",  # the base's host and port, another scheme
        "http://169.254.169.254/latest/meta-data",
        "http://localhost:8199/outputs/x.png",  # the same machine, not the same host name
        "file:///etc/passwd",
        "http://127.0.0.1:99999/x.png",
    ],
)
def test_every_other_output_url_is_refused(url: str) -> None:
    assert not output_url_allowed(url, EMULATOR)


# --- what a failed copy decides ------------------------------------------------------------------


def _running_job(now: float, **changes: Any) -> Job:
    fields: dict[str, Any] = {
        "id": "job_" + "0" * 24,
        "client_id": "cli_x",
        "input": {},
        "created_at": now - 10,
        "updated_at": now - 1,
        "deadline_at": now + 600,
        "status": Status.RUNNING,
        "upstream": Upstream("req-1", "in_progress"),
        "running_since": now - 5,
    }
    return Job(**(fields | changes))


SUCCEEDED = RequestState("req-1", "succeeded", images=("https://x.runcomfy.net/o.png",))


def _settle(job: Job, now: float, *, will_not_improve: bool = False) -> Job:
    step = decisions.settle_output_copy_failure(
        job,
        request_id="req-1",
        state=SUCCEEDED,
        now=now,
        reason="HTTP 404",
        will_not_improve=will_not_improve,
        copy_deadline_s=COPY_DEADLINE_S,
        expected_run=None,
        list_price_usd=0.01,
    )
    assert step is not None
    if not step.job.status.is_final:
        assert step.next_step_at is not None
        assert step.next_step_at - now == decisions.output_copy_retry_in_s(
            step.job.output_copy_failures
        )
    return step.job


def test_a_failed_copy_holds_the_job_running_backing_off_until_the_copy_deadline() -> None:
    now = 1_000_000.0
    held = _settle(_running_job(now), now)
    assert held.status is Status.RUNNING and held.output_images is None
    assert held.output_copy_failing_since == now and len(held.notes) == 1
    assert [decisions.output_copy_retry_in_s(n) for n in (1, 2, 3, 6, 7, 20)] == [
        1,
        2,
        4,
        30,
        30,
        30,
    ]
    again = _settle(held, now + COPY_DEADLINE_S - 0.1)
    assert again.status is Status.RUNNING and len(again.notes) == 1  # one note for the run
    ended = _settle(again, now + COPY_DEADLINE_S)
    assert ended.status is Status.SUCCEEDED and ended.output_media is None
    assert ended.output_images == SUCCEEDED.images and "not stored" in ended.notes[-1]
    assert ended.cost_usd == 0.01  # a success costs what a success costs, stored or not


def test_a_refused_host_or_a_near_deadline_gives_up_at_once() -> None:
    now = 1_000_000.0
    refused = _settle(_running_job(now), now, will_not_improve=True)
    assert refused.status is Status.SUCCEEDED and refused.output_media is None
    near = _settle(_running_job(now, deadline_at=now + 0.5), now)
    assert near.status is Status.SUCCEEDED and near.output_media is None


def test_a_record_of_the_previous_release_shows_runcomfys_urls_not_stored() -> None:
    now = 1_000_000.0
    ended = _running_job(now).moved_to(Status.SUCCEEDED, now, output_images=("https://a/b.png",))
    old = json.loads(ended.to_json())
    assert "output_media" not in old and "output_copy_failures" not in old  # left out: unset
    read = Job.from_json(json.dumps(old))
    links = MediaLinks(key=KEY, base="", expires_at=2_000_000)
    assert read.to_resource(links)["output"] == {
        "images": ["https://a/b.png"],
        "upstream_images": ["https://a/b.png"],
        "stored": False,
        "media": [],
    }
    stored = (StoredImage(MEDIA_ID, "0" * 64, "image/png", 10),)
    kept = Job.from_json(ended.changed(now, output_media=stored).to_json())
    output = kept.to_resource(links)["output"]
    assert output["stored"] is True and output["images"] == [links.url(MEDIA_ID)]
    assert output["media"] == [
        {"id": MEDIA_ID, "sha256": "0" * 64, "content_type": "image/png", "bytes": 10}
    ]


# --- on a real stack -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Redis, emulator, gunicorn API, then worker and beat (which get the API's URL as their
    PUBLIC_BASE_URL: cli/stack.py), with a short OUTPUT_COPY_DEADLINE_S."""
    deadline = {"OUTPUT_COPY_DEADLINE_S": str(COPY_DEADLINE_S)}
    with served_stack(tmp_path_factory.mktemp("outputs"), "outputs", deadline) as stack:
        yield stack


class Caller:
    """A registered client calling the stack's API over HTTP."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        with stack.redis() as client:
            self.creds: NewClientCredentials = ClientStore(client).create("outputs-test")

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.creds.api_key}"}
        return requests.get(self.stack.api_url + path, headers=headers, timeout=10, **kwargs)

    def submit(self, prompt: str, **extra: Any) -> str:
        body = {
            "prompt": f"{prompt} {time.time_ns()}",
            "image_url": f"{self.stack.emulator_url}/samples/image.png",
            "mask_image_url": f"{self.stack.emulator_url}/samples/mask.png",
            **extra,
        }
        response = requests.post(
            self.stack.api_url + "/v1/jobs",
            json=body,
            headers={"Authorization": f"Bearer {self.creds.api_key}"},
            timeout=10,
        )
        assert response.status_code == 202, response.text
        job_id: str = response.json()["id"]
        return job_id

    def job(self, job_id: str) -> dict[str, Any]:
        answer: dict[str, Any] = self.get(f"/v1/jobs/{job_id}").json()
        return answer

    def wait_final(self, job_id: str, timeout_s: float = 30) -> dict[str, Any]:
        return wait_until(
            lambda: (j := self.job(job_id))["status"] in {"succeeded", "failed", "expired"} and j,
            timeout_s=timeout_s,
            what=f"job {job_id} final",
        )


@pytest.fixture
def caller(own_stack: Stack) -> Caller:
    return Caller(own_stack)


def _record(stack: Stack, job_id: str) -> Job:
    with stack.redis() as client:
        job = JobStore(client, retention_s=3600).get(job_id)
    assert job is not None
    return job


def test_a_jobs_output_is_served_by_us_after_runcomfy_deleted_it(
    own_stack: Stack, caller: Caller
) -> None:
    final = caller.wait_final(caller.submit("keep it"))
    assert final["status"] == "succeeded", final
    output = final["output"]
    assert output["stored"] is True, final
    [media] = output["media"]
    [upstream_url] = output["upstream_images"]
    [signed_url] = output["images"]
    assert upstream_url.startswith(own_stack.emulator_url + "/outputs/")
    # The API's PUBLIC_BASE_URL (cli/stack.py sets the stack's API URL): a whole URL.
    assert signed_url.startswith(f"{own_stack.api_url}/v1/media/{media['id']}?exp=")

    own_stack.emulator("/_emulator/faults", method="POST", json={"output_ttl_s": 0})
    try:
        assert requests.get(upstream_url, timeout=10).status_code == 404  # gone at RunComfy
        served = requests.get(signed_url, timeout=10)  # no key
    finally:
        own_stack.emulator("/_emulator/reset", method="POST")
    assert served.status_code == 200
    assert hashlib.sha256(served.content).hexdigest() == media["sha256"]
    assert len(served.content) == media["bytes"]
    assert served.headers["Content-Type"] == media["content_type"]
    assert served.headers["X-Content-Type-Options"] == "nosniff"
    assert served.headers["ETag"] == f'"{media["sha256"]}"'
    assert served.headers["Cache-Control"].startswith("private, max-age=")
    assert "Authorization" not in served.request.headers


def test_a_signed_url_is_refused_tampered_or_expired_and_the_bare_path_is_the_owners(
    own_stack: Stack, caller: Caller
) -> None:
    final = caller.wait_final(caller.submit("whose is it"))
    [media] = final["output"]["media"]
    [signed_url] = final["output"]["images"]
    query = {k: v[0] for k, v in parse_qs(urlsplit(signed_url).query).items()}
    path = f"/v1/media/{media['id']}"
    base = own_stack.api_url + path

    def fetch(**params: str) -> requests.Response:
        return requests.get(base, params=params, timeout=10)

    assert fetch(**query).status_code == 200
    flipped = ("B" if query["sig"][0] == "A" else "A") + query["sig"][1:]
    with own_stack.redis() as client:
        key = signing_key(client)
    past = str(int(time.time()) - 1)
    for refused in (
        fetch(exp=query["exp"], sig=flipped),
        fetch(exp=str(int(query["exp"]) + 1), sig=query["sig"]),
        fetch(exp=past, sig=signature(key, media["id"], int(past))),  # ours, but expired
        fetch(exp=query["exp"]),
    ):
        assert refused.status_code == 403, refused.text
        assert refused.headers["Content-Type"] == "application/problem+json"
        assert refused.json()["status"] == 403
        assert query["sig"] not in refused.text  # the right signature is never shown
    assert fetch(**query, other="1").status_code == 422

    assert requests.get(base, timeout=10).status_code == 401  # the bare path needs a key
    owned = caller.get(path)
    assert owned.status_code == 200
    assert hashlib.sha256(owned.content).hexdigest() == media["sha256"]
    other = Caller(own_stack)
    assert other.get(path).status_code == 404
    assert other.get(f"/v1/jobs/{final['id']}").status_code == 404


def test_without_public_base_url_an_answer_names_its_own_root(
    own_stack: Stack, caller: Caller
) -> None:
    final = caller.wait_final(caller.submit("where am I"))
    app = create_app({"TESTING": True, "SETTINGS": own_stack.settings(PUBLIC_BASE_URL="")})
    try:
        answer = app.test_client().get(
            f"/v1/jobs/{final['id']}",
            headers={"Authorization": f"Bearer {caller.creds.api_key}"},
            base_url="http://gw.internal:8080/root",
        )
    finally:
        app.extensions["inpaint_gateway"].redis.close()
    [url] = answer.get_json()["output"]["images"]
    media_id = final["output"]["media"][0]["id"]
    assert url.startswith(f"http://gw.internal:8080/root/v1/media/{media_id}?exp=")


def test_a_copy_that_keeps_failing_ends_succeeded_not_stored_after_the_deadline(
    own_stack: Stack, caller: Caller
) -> None:
    job_id = caller.submit("[emulator:output-gone]")
    held = wait_until(
        lambda: (
            _record(own_stack, job_id).output_copy_failing_since is not None
            and _record(own_stack, job_id)
        ),
        timeout_s=20,
        what="a first failed copy",
    )
    assert held.status is Status.RUNNING
    assert caller.job(job_id)["output"] is None  # the result is held back meanwhile
    final = caller.wait_final(job_id)
    assert final["status"] == "succeeded", final
    output = final["output"]
    assert output["stored"] is False and output["media"] == []
    assert output["images"] == output["upstream_images"]
    assert "/outputs/gone/" in output["images"][0]
    ended = _record(own_stack, job_id)
    assert ended.finished_at is not None and held.output_copy_failing_since is not None
    assert ended.finished_at - held.output_copy_failing_since >= COPY_DEADLINE_S  # not before
    assert ended.output_copy_failures >= 2  # tried again meanwhile
    assert any("not stored" in note for note in ended.notes), ended.notes


class CountingServer:
    """A local HTTP server that counts the requests it gets (an output host never to call)."""

    def __init__(self) -> None:
        self.requests = 0
        counter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                counter.requests += 1
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def address(self) -> str:
        host, port = self.server.server_address[:2]
        return f"{host}:{port}"

    def __enter__(self) -> CountingServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_an_output_on_another_host_is_never_fetched(own_stack: Stack, caller: Caller) -> None:
    with CountingServer() as elsewhere:
        job_id = caller.submit(f"[emulator:output-host={elsewhere.address}]")
        final = caller.wait_final(job_id)
        assert final["status"] == "succeeded", final
        output = final["output"]
        assert output["stored"] is False and output["media"] == []
        assert output["images"] == [
            f"http://{elsewhere.address}/outputs/" + output["images"][0].rsplit("/", 1)[1]
        ]
        ended = _record(own_stack, job_id)
        assert ended.output_copy_failures == 1  # given up at once: a refused host never improves
        assert any("never fetched" in note for note in ended.notes), ended.notes
        assert elsewhere.requests == 0


def test_the_webhook_carries_signed_urls_on_the_public_base_that_work(
    own_stack: Stack, caller: Caller
) -> None:
    receiver = WebhookReceiver(secret=caller.creds.webhook_secret).start()
    try:
        job_id = caller.submit("tell me", webhook_url=receiver.url)
        [event] = wait_until(receiver.received, what="the webhook")
    finally:
        receiver.stop()
    output = event.payload["data"]["output"]
    assert event.payload["type"] == "job.succeeded" and output["stored"] is True
    [media] = output["media"]
    [url] = output["images"]
    # The worker's PUBLIC_BASE_URL (the stack set it to the API's URL): a whole URL.
    assert url.startswith(f"{own_stack.api_url}/v1/media/{media['id']}?exp=")
    served = requests.get(url, timeout=10)
    assert served.status_code == 200
    assert hashlib.sha256(served.content).hexdigest() == media["sha256"]
    with own_stack.redis() as client:
        assert owner_of(client, media["id"]) == _record(own_stack, job_id).client_id


def test_an_owner_record_is_never_shortened(own_stack: Stack) -> None:
    with own_stack.redis() as client:
        media_id = "upl_" + "ef" * 16
        record_owner(client, media_id, "cli_a", 1000)
        record_owner(client, media_id, "cli_a", 10)
        assert client.ttl(OWNER_KEY_PREFIX + media_id) > 900
        client.delete(OWNER_KEY_PREFIX + media_id)
