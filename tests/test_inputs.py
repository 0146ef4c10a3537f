"""A job's pictures at accept (PRODUCT §10): URLs, data URIs and upload refs; data URIs kept as
uploads of the client and named by their refs, so no job record, resource or webhook carries
base64; every picture the API holds checked alone and as a pair, a bad one a 4xx naming its
field that stores nothing; a body over 64 KiB only with a data URI in it."""

from __future__ import annotations

import base64
import io
import os
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from PIL import Image

from cli.stack import Stack
from core.clients import ClientStore, NewClientCredentials
from core.inputs import NO_SUCH_UPLOAD
from core.store import PREFIX, connect_redis
from core.uploads import UploadStore
from tests.support.api import ApiClient

pytestmark = pytest.mark.integration

INPUTS_DB = 11  # a database of the stack's redis-server that no worker reads: jobs stay queued
UPLOAD_RETENTION_S = 60  # short: a job's use of an upload must visibly lengthen it
PROBLEM_JSON = "application/problem+json"
SIZE = (64, 48)


def png(size: tuple[int, int] = SIZE, color: str = "white") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def jpeg(size: tuple[int, int] = SIZE) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, "red").save(out, format="JPEG")
    return out.getvalue()


def noise_png(size: tuple[int, int]) -> bytes:
    """Random pixels: a PNG about as large as its raw pixels (3 bytes each)."""
    out = io.BytesIO()
    Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)).save(out, format="PNG")
    return out.getvalue()


def data_uri(data: bytes, content_type: str = "image/png") -> str:
    return f"data:{content_type};base64,{base64.b64encode(data).decode()}"


def job_body(image: str, mask: str, **more: Any) -> dict[str, Any]:
    return {"prompt": "a red sky", "image_url": image, "mask_image_url": mask, **more}


@dataclass
class Inputs:
    """An API app on a Redis database no worker reads, its media folder, and two clients."""

    redis: redis.Redis
    media_root: Path
    http: Any
    creds: NewClientCredentials
    other: NewClientCredentials

    def headers(self, creds: NewClientCredentials | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {(creds or self.creds).api_key}"}

    def post_job(self, body: dict[str, Any], **headers: str) -> Any:
        return self.http.post("/v1/jobs", json=body, headers=self.headers() | headers)

    def upload(self, data: bytes, creds: NewClientCredentials | None = None) -> str:
        resp = self.http.post(
            "/v1/uploads",
            data=data,
            headers=self.headers(creds) | {"Content-Type": "image/png"},
        )
        assert resp.status_code in (200, 201), resp.get_data(as_text=True)
        ref: str = resp.get_json()["ref"]
        return ref

    def get(self, path: str) -> Any:
        return self.http.get(path, headers=self.headers())

    def stored(self) -> tuple[dict[str, Any], list[str]]:
        """Every Redis key (but counters and clients) with its value, and every media file."""
        keys: dict[str, Any] = {}
        for key in sorted(self.redis.scan_iter()):
            if key == PREFIX + "counters" or key.startswith(
                (PREFIX + "client", PREFIX + "wakeup:")
            ):
                continue
            kind = self.redis.type(key)
            keys[key] = (
                self.redis.get(key)
                if kind == "string"
                else self.redis.zrange(key, 0, -1, withscores=True)
                if kind == "zset"
                else kind
            )
        files = (
            sorted(str(p.relative_to(self.media_root)) for p in self.media_root.rglob("*"))
            if self.media_root.exists()
            else []
        )
        return keys, files

    def every_redis_value(self, match: str = "*") -> str:
        """The database's keys matching `match` as text: each key's value of every kind."""
        dumped = []
        for key in self.redis.scan_iter(match=match):
            kind = self.redis.type(key)
            value: Any = {
                "string": self.redis.get,
                "hash": self.redis.hgetall,
                "list": lambda k: self.redis.lrange(k, 0, -1),
                "set": self.redis.smembers,
                "zset": lambda k: self.redis.zrange(k, 0, -1),
                "stream": lambda k: self.redis.xrange(k),
            }[kind](key)
            dumped.append(f"{key}={value}")
        return "\n".join(dumped)


@pytest.fixture
def inputs(stack: Stack, make_app: Callable[..., Any], tmp_path: Path) -> Iterator[Inputs]:
    url = stack.redis_server.url.rsplit("/", 1)[0] + f"/{INPUTS_DB}"
    client = connect_redis(url)
    client.flushdb()
    media_root = tmp_path / "media"
    app = make_app(
        REDIS_URL=url,
        CELERY_BROKER_URL=url,
        MEDIA_STORE_URL=media_root.as_uri(),
        UPLOAD_RETENTION_S=str(UPLOAD_RETENTION_S),
    )
    clients = ClientStore(client)
    yield Inputs(
        client, media_root, app.test_client(), clients.create("painter"), clients.create("other")
    )
    client.flushdb()
    client.close()


def test_a_job_from_two_upload_refs_is_accepted_with_the_refs_in_its_input(
    inputs: Inputs,
) -> None:
    image, mask = inputs.upload(png(color="red")), inputs.upload(png(color="white"))
    resp = inputs.post_job(job_body(image, mask))
    assert resp.status_code == 202, resp.get_data(as_text=True)
    job = resp.get_json()
    assert (job["input"]["image_url"], job["input"]["mask_image_url"]) == (image, mask)
    assert inputs.get(f"/v1/jobs/{job['id']}").get_json()["input"]["image_url"] == image


def test_a_job_from_two_data_uris_names_them_as_uploads_and_nothing_carries_base64(
    inputs: Inputs,
) -> None:
    image, mask = png(color="red"), png(color="white")
    resp = inputs.post_job(
        job_body(data_uri(image), data_uri(mask), webhook_url="http://127.0.0.1:9/hook")
    )
    assert resp.status_code == 202, resp.get_data(as_text=True)
    job = resp.get_json()
    for name, data in (("image_url", image), ("mask_image_url", mask)):
        ref = job["input"][name]
        assert ref.startswith("upload:upl_"), ref
        upload_id = ref.removeprefix("upload:")
        upload = inputs.get(f"/v1/uploads/{upload_id}")
        assert upload.status_code == 200 and upload.get_json()["ref"] == ref
        assert inputs.get(f"/v1/uploads/{upload_id}/content").data == data
    # Cancelled while queued: its job.cancelled webhook (the job as `data`) waits in the outbox.
    cancelled = inputs.http.post(f"/v1/jobs/{job['id']}/cancel", headers=inputs.headers())
    assert cancelled.get_json()["status"] == "cancelled"
    shown = inputs.get(f"/v1/jobs/{job['id']}").get_data(as_text=True)
    listed = inputs.get("/v1/jobs").get_data(as_text=True)
    ours = inputs.every_redis_value(PREFIX + "*")  # the broker's own messages say "base64"
    assert "job.cancelled" in ours and "upload:upl_" in ours  # the job, its webhook, its refs
    everything = inputs.every_redis_value()
    for text in (resp.get_data(as_text=True), shown, listed, ours, everything):
        assert base64.b64encode(image).decode()[:40] not in text
        assert base64.b64encode(mask).decode()[:40] not in text
    for text in (resp.get_data(as_text=True), shown, listed, ours):
        assert "base64" not in text


def test_a_url_and_a_data_uri_make_a_job_and_only_the_held_one_is_checked(inputs: Inputs) -> None:
    resp = inputs.post_job(job_body("https://images.example.com/in.png", data_uri(png())))
    assert resp.status_code == 202, resp.get_data(as_text=True)
    job = resp.get_json()
    assert job["input"]["image_url"] == "https://images.example.com/in.png"
    assert job["input"]["mask_image_url"].startswith("upload:upl_")


def test_the_same_data_uri_body_with_an_idempotency_key_is_the_same_job(inputs: Inputs) -> None:
    body = job_body(data_uri(png(color="red")), data_uri(png(color="white")))
    first = inputs.post_job(body, **{"Idempotency-Key": "paint-1"})
    again = inputs.post_job(body, **{"Idempotency-Key": "paint-1"})
    assert (first.status_code, again.status_code) == (202, 200), again.get_data(as_text=True)
    assert again.get_json()["id"] == first.get_json()["id"]
    assert again.get_json()["input"] == first.get_json()["input"]


def _expired_ref(inputs: Inputs) -> str:
    ref = inputs.upload(png(color="white"))
    assert inputs.redis.delete(record_key(inputs, ref))  # as its TTL would
    return ref


UNUSABLE_REFS: list[tuple[str, Callable[[Inputs], str]]] = [
    ("another client's", lambda i: i.upload(png(color="white"), creds=i.other)),
    ("unknown", lambda i: "upload:upl_" + "0" * 32),
    ("expired", _expired_ref),
]


@pytest.mark.parametrize(
    "make_ref", [c[1] for c in UNUSABLE_REFS], ids=[c[0] for c in UNUSABLE_REFS]
)
def test_an_upload_ref_not_of_this_client_now_is_one_422(
    inputs: Inputs, make_ref: Callable[[Inputs], str]
) -> None:
    image = inputs.upload(png(color="red"))
    ref = make_ref(inputs)
    stored = inputs.stored()
    resp = inputs.post_job(job_body(image, ref))
    assert resp.status_code == 422 and resp.mimetype == PROBLEM_JSON
    assert resp.get_json()["errors"] == {"mask_image_url": [NO_SUCH_UPLOAD]}
    assert inputs.stored() == stored


def _jpeg_declared_png(_: Inputs) -> str:
    return data_uri(jpeg(), "image/png")


BAD_DATA_URIS: list[tuple[str, Callable[[Inputs], str], int, str]] = [
    ("not an image", lambda _: data_uri(b"GIF89a not really"), 422, "not a whole PNG"),
    ("declared png, bytes jpeg", _jpeg_declared_png, 422, "declared image/png"),
    ("bad base64", lambda _: "data:image/png;base64,iVBOR!w0KGgo=", 422, "not strict"),
    ("cut base64", lambda _: "data:image/png;base64,iVBORw0KGgo", 422, "not strict"),
    ("a type not taken", lambda _: data_uri(png(), "image/gif"), 422, "does not start"),
    ("not base64", lambda _: "data:image/png," + "x" * 16, 422, "does not start"),
    ("over 6 MiB", lambda _: data_uri(noise_png((1500, 1500))), 422, "over 8388631"),
]


@pytest.mark.parametrize(
    ("make_uri", "status", "says"),
    [c[1:] for c in BAD_DATA_URIS],
    ids=[c[0] for c in BAD_DATA_URIS],
)
def test_a_bad_data_uri_is_a_problem_naming_its_field_that_stores_nothing(
    inputs: Inputs, make_uri: Callable[[Inputs], str], status: int, says: str
) -> None:
    inputs.upload(png(color="black"))  # something there already
    uri = make_uri(inputs)
    stored = inputs.stored()
    resp = inputs.post_job(job_body(data_uri(png(color="red")), uri))
    assert resp.status_code == status, resp.get_data(as_text=True)[:2000]
    assert resp.mimetype == PROBLEM_JSON
    errors = resp.get_json()["errors"]
    assert list(errors) == ["mask_image_url"]
    assert says in errors["mask_image_url"][0]
    assert uri[22:80] not in resp.get_data(as_text=True)  # the value is never echoed
    assert inputs.stored() == stored


def test_an_all_black_mask_is_a_422_that_keeps_neither_picture(inputs: Inputs) -> None:
    stored = inputs.stored()
    resp = inputs.post_job(job_body(data_uri(png(color="red")), data_uri(png(color="black"))))
    assert resp.status_code == 422, resp.get_data(as_text=True)
    assert "all black" in resp.get_json()["errors"]["mask_image_url"][0]
    assert inputs.stored() == stored


def test_a_mask_of_another_size_is_a_422_at_accept(inputs: Inputs) -> None:
    image = inputs.upload(png((64, 48), "red"))
    stored = inputs.stored()
    resp = inputs.post_job(job_body(image, data_uri(png((48, 64)))))
    assert resp.status_code == 422, resp.get_data(as_text=True)
    assert "same size" in resp.get_json()["errors"]["mask_image_url"][0]
    assert inputs.stored() == stored


def test_a_body_over_64_kib_without_a_data_uri_is_a_413(inputs: Inputs) -> None:
    body = job_body(
        "https://images.example.com/in.png",
        "https://images.example.com/mask.png",
        metadata={"pad": "x" * (70 * 1024)},
    )
    stored = inputs.stored()
    resp = inputs.post_job(body)
    assert resp.status_code == 413 and resp.mimetype == PROBLEM_JSON
    assert "64 KiB" in resp.get_json()["detail"]
    too_big_upload = inputs.http.post(
        "/v1/uploads",
        data=b"\0" * (7 * 1024 * 1024),
        headers=inputs.headers() | {"Content-Type": "image/png"},
    )
    assert resp.get_json()["type"] == too_big_upload.get_json()["type"]  # one type per status
    assert inputs.stored() == stored


def test_a_body_over_16_mib_is_a_413_even_with_data_uris(inputs: Inputs) -> None:
    uri = data_uri(png())
    resp = inputs.post_job(job_body(uri, uri, metadata={"pad": " " * (16 * 1024 * 1024)}))
    assert resp.status_code == 413 and "16384 KiB" in resp.get_json()["detail"]


def test_a_12_mib_body_with_two_data_uris_is_accepted(inputs: Inputs) -> None:
    image, mask = noise_png((1200, 1200)), noise_png((1200, 1200))
    body = job_body(data_uri(image), data_uri(mask))
    assert len(str(body)) > 11 * 1024 * 1024
    resp = inputs.post_job(body)
    assert resp.status_code == 202, resp.get_data(as_text=True)[:2000]
    upload_id = resp.get_json()["input"]["image_url"].removeprefix("upload:")
    assert inputs.get(f"/v1/uploads/{upload_id}").get_json()["bytes"] == len(image)


def test_an_upload_a_job_uses_is_kept_as_long_as_the_job_lives(inputs: Inputs) -> None:
    ref = inputs.upload(png(color="white"))
    assert inputs.redis.ttl(record_key(inputs, ref)) <= UPLOAD_RETENTION_S
    resp = inputs.post_job(job_body(data_uri(png(color="red")), ref))
    assert resp.status_code == 202, resp.get_data(as_text=True)
    settings = inputs.http.application.extensions["inpaint_gateway"].settings
    must_live_s = settings.job_deadline_s + settings.job_retention_s - 5
    for name in ("image_url", "mask_image_url"):
        kept = resp.get_json()["input"][name]
        assert inputs.redis.ttl(record_key(inputs, kept)) >= must_live_s, name
        shown = inputs.get(f"/v1/uploads/{kept.removeprefix('upload:')}").get_json()
        expires_at = datetime.fromisoformat(shown["expires_at"]).timestamp()
        assert expires_at - time.time() >= must_live_s, name


def record_key(inputs: Inputs, ref: str) -> str:
    return f"{UploadStore.RECORD_PREFIX}{inputs.creds.client_id}:{ref.removeprefix('upload:')}"


def test_a_media_store_that_fails_is_a_503_and_no_job(
    stack: Stack, make_app: Callable[..., Any], tmp_path: Path
) -> None:
    url = stack.redis_server.url.rsplit("/", 1)[0] + f"/{INPUTS_DB}"
    client = connect_redis(url)
    client.flushdb()
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the media folder should be")
    app = make_app(
        REDIS_URL=url, CELERY_BROKER_URL=url, MEDIA_STORE_URL=(blocker / "media").as_uri()
    )
    creds = ClientStore(client).create("unlucky")
    before = sorted(k for k in client.scan_iter() if k != PREFIX + "counters")
    resp = app.test_client().post(
        "/v1/jobs",
        json=job_body(data_uri(png(color="red")), data_uri(png())),
        headers={"Authorization": f"Bearer {creds.api_key}"},
    )
    assert resp.status_code == 503 and resp.mimetype == PROBLEM_JSON
    assert resp.headers["Retry-After"] == "5"
    assert "not-a-folder" not in resp.get_data(as_text=True)
    assert sorted(k for k in client.scan_iter() if k != PREFIX + "counters") == before
    client.flushdb()
    client.close()


def test_the_emulator_sample_pictures_are_a_pair_the_gateway_takes(
    stack: Stack, api_client: ApiClient
) -> None:
    pictures = []
    for name in ("image", "mask"):
        with urllib.request.urlopen(f"{stack.emulator_url}/samples/{name}.png", timeout=10) as got:
            pictures.append(data_uri(got.read(), got.headers.get_content_type()))
    resp = api_client.post("/v1/jobs", json=job_body(*pictures))
    assert resp.status_code == 202, resp.get_data(as_text=True)
    assert resp.get_json()["input"]["mask_image_url"].startswith("upload:upl_")
