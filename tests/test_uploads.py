"""Uploads (PRODUCT §10): images checked by decoding them, content-addressed per client, the
bytes in the media store and the record in Redis; every bad upload a clear problem that stores
nothing, neither a Redis key nor a blob; expired bytes removed."""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from PIL import Image

from cli.stack import Stack
from core.clients import ClientStore, NewClientCredentials
from core.media import FileMediaStore, media_store_from_url
from core.store import PREFIX, connect_redis
from core.uploads import (
    MAX_UPLOAD_BYTES,
    UPLOAD_EXPIRY_KEY,
    ImageRefused,
    UploadStore,
    inspect_image,
    remove_expired_uploads,
)
from core.wakeups import REMOVE_EXPIRED_UPLOADS_TASK

pytestmark = pytest.mark.integration

UPLOADS_DB = 8
RETENTION_S = 7 * 24 * 3600
PROBLEM_JSON = "application/problem+json"


def image_bytes(fmt: str, size: tuple[int, int] = (64, 48), color: str = "red") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format=fmt)
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares `width` x `height`, with one tiny IDAT: nothing is decoded
    before the header is read, so the declared size alone must be refused."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


BOUNDARY = "test-boundary-7d1f"


def multipart_body(data: bytes) -> bytes:
    """One part named file, encoded here: Werkzeug's test client spools a large multipart body
    to a temporary file it never closes (a ResourceWarning)."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{BOUNDARY}--\r\n".encode()


@dataclass
class Uploading:
    """An API app on a Redis database no worker reads, its media folder, and two clients."""

    redis: redis.Redis
    media_root: Path
    http: Any
    creds: NewClientCredentials
    other: NewClientCredentials

    def headers(self, creds: NewClientCredentials | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {(creds or self.creds).api_key}"}

    def raw(self, data: bytes, content_type: str, **kwargs: Any) -> Any:
        headers = self.headers(kwargs.pop("creds", None)) | {"Content-Type": content_type}
        return self.http.post("/v1/uploads", data=data, headers=headers | kwargs.pop("headers", {}))

    def multipart(self, fields: dict[str, Any], creds: NewClientCredentials | None = None) -> Any:
        return self.http.post(
            "/v1/uploads",
            data=fields,
            headers=self.headers(creds),
            content_type="multipart/form-data",
        )

    def get(self, path: str, creds: NewClientCredentials | None = None) -> Any:
        return self.http.get(path, headers=self.headers(creds))

    def blobs(self) -> list[str]:
        """Every file in the media folder, temporaries too."""
        if not self.media_root.exists():
            return []
        return sorted(str(p.relative_to(self.media_root)) for p in self.media_root.rglob("*"))

    def upload_keys(self) -> dict[str, Any]:
        """Every Redis key but counters and clients, with its value."""
        seen: dict[str, Any] = {}
        for key in sorted(self.redis.scan_iter()):
            if key == PREFIX + "counters" or key.startswith(PREFIX + "client"):
                continue
            kind = self.redis.type(key)
            seen[key] = (
                self.redis.zrange(key, 0, -1, withscores=True)
                if kind == "zset"
                else self.redis.get(key)
                if kind == "string"
                else kind
            )
        return seen


@pytest.fixture
def uploading(stack: Stack, make_app: Callable[..., Any], tmp_path: Path) -> Iterator[Uploading]:
    url = stack.redis_server.url.rsplit("/", 1)[0] + f"/{UPLOADS_DB}"
    client = connect_redis(url)
    client.flushdb()
    media_root = tmp_path / "media"
    app = make_app(REDIS_URL=url, CELERY_BROKER_URL=url, MEDIA_STORE_URL=media_root.as_uri())
    clients = ClientStore(client)
    yield Uploading(
        client, media_root, app.test_client(), clients.create("uploader"), clients.create("other")
    )
    client.flushdb()
    client.close()


def test_a_raw_png_is_stored_and_read_back(uploading: Uploading) -> None:
    data = image_bytes("PNG")
    resp = uploading.raw(data, "image/png")
    assert resp.status_code == 201, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["id"].startswith("upl_") and body["ref"] == "upload:" + body["id"]
    assert (body["content_type"], body["width"], body["height"]) == ("image/png", 64, 48)
    assert body["bytes"] == len(data) and len(body["sha256"]) == 64
    assert set(body) == {
        "id", "ref", "sha256", "content_type", "width", "height", "bytes", "expires_at"
    }  # fmt: skip
    assert resp.headers["Location"] == f"/v1/uploads/{body['id']}"
    assert uploading.get(f"/v1/uploads/{body['id']}").get_json() == body
    content = uploading.get(f"/v1/uploads/{body['id']}/content")
    assert content.status_code == 200 and content.mimetype == "image/png"
    assert content.data == data
    # The bytes in the media store, not in Redis; the record lives UPLOAD_RETENTION_S.
    assert any(p.endswith(body["id"]) for p in uploading.blobs())
    (record_key,) = [k for k in uploading.upload_keys() if k.startswith(PREFIX + "upload:")]
    assert RETENTION_S - 5 <= uploading.redis.ttl(record_key) <= RETENTION_S
    assert all(data not in str(v).encode() for v in uploading.upload_keys().values())


@pytest.mark.parametrize(("fmt", "content_type"), [("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_jpeg_and_webp_are_taken_raw_and_as_multipart(
    uploading: Uploading, fmt: str, content_type: str
) -> None:
    raw = uploading.raw(image_bytes(fmt, color="blue"), content_type)
    assert raw.status_code == 201 and raw.get_json()["content_type"] == content_type
    other = image_bytes(fmt, color="green")
    resp = uploading.multipart({"file": (io.BytesIO(other), "x.img", content_type)})
    assert resp.status_code == 201, resp.get_data(as_text=True)
    assert resp.get_json()["content_type"] == content_type


def test_the_same_bytes_are_the_same_upload_and_another_clients_are_not(
    uploading: Uploading,
) -> None:
    data = image_bytes("PNG", color="yellow")
    first = uploading.raw(data, "image/png")
    assert first.status_code == 201
    again = uploading.multipart({"file": (io.BytesIO(data), "a.png", "application/octet-stream")})
    assert again.status_code == 200, again.get_data(as_text=True)
    assert again.get_json()["id"] == first.get_json()["id"]
    assert len([b for b in uploading.blobs() if b.count("/") == 3]) == 1  # one copy kept
    theirs = uploading.raw(data, "image/png", creds=uploading.other)
    assert theirs.status_code == 201 and theirs.get_json()["id"] != first.get_json()["id"]
    upload_id = first.get_json()["id"]
    for path in (f"/v1/uploads/{upload_id}", f"/v1/uploads/{upload_id}/content"):
        resp = uploading.get(path, creds=uploading.other)
        assert resp.status_code == 404 and resp.mimetype == PROBLEM_JSON


def test_an_unknown_or_malformed_id_is_a_404(uploading: Uploading) -> None:
    for upload_id in ("upl_" + "0" * 32, "upl_x", "job_123", "..%2F..%2Fetc"):
        assert uploading.get(f"/v1/uploads/{upload_id}").status_code == 404


def test_a_key_is_needed(uploading: Uploading) -> None:
    resp = uploading.http.post(
        "/v1/uploads", data=image_bytes("PNG"), headers={"Content-Type": "image/png"}
    )
    assert resp.status_code == 401 and not uploading.blobs()


GIF = image_bytes("GIF")
PNG = image_bytes("PNG", color="white")
JPEG = image_bytes("JPEG", color="white")
BAD_UPLOADS: list[tuple[str, Callable[[Uploading], Any], int, str]] = [
    ("not an image", lambda u: u.raw(b"hello, not an image", "image/png"), 422, "not a whole"),
    ("jpeg declared png", lambda u: u.raw(JPEG, "image/png"), 422, "declared image/png"),
    ("gif declared png", lambda u: u.raw(GIF, "image/png"), 422, "not a whole"),
    ("gif declared gif", lambda u: u.raw(GIF, "image/gif"), 415, "raw bytes"),
    ("text/plain", lambda u: u.raw(PNG, "text/plain"), 415, "raw bytes"),
    ("json", lambda u: u.raw(b"{}", "application/json"), 415, "raw bytes"),
    ("empty body", lambda u: u.raw(b"", "image/png"), 422, "empty"),
    ("truncated", lambda u: u.raw(PNG[: len(PNG) // 2], "image/png"), 422, "cut short"),
    (
        "too big",
        lambda u: u.raw(PNG + b"\0" * (MAX_UPLOAD_BYTES + 1 - len(PNG)), "image/png"),
        413,
        "6 MiB",
    ),
    (
        "too big as multipart",
        lambda u: u.raw(
            multipart_body(b"\0" * (MAX_UPLOAD_BYTES + 1)),
            f"multipart/form-data; boundary={BOUNDARY}",
        ),
        413,
        "6 MiB",
    ),
    (
        "too many pixels",
        lambda u: u.raw(png_header_only(8000, 4001), "image/png"),
        422,
        "8000x4001",
    ),
    # Past Pillow's warning (89 Mpx), made an error; past twice that, Pillow's own error.
    (
        "bomb warning",
        lambda u: u.raw(png_header_only(10000, 10000), "image/png"),
        422,
        "too many pixels",
    ),
    ("bomb", lambda u: u.raw(png_header_only(60000, 60000), "image/png"), 422, "too many pixels"),
    (
        "compressed",
        lambda u: u.raw(PNG, "image/png", headers={"Content-Encoding": "gzip"}),
        415,
        "uncompressed",
    ),
    (
        "multipart without file",
        lambda u: u.multipart({"image": (io.BytesIO(PNG), "a.png")}),
        422,
        "one part named file",
    ),
    (
        "multipart with a text field",
        lambda u: u.multipart({"file": "not a file"}),
        422,
        "one part named file",
    ),
    (
        "two files",
        lambda u: u.multipart({"file": [(io.BytesIO(PNG), "a.png"), (io.BytesIO(JPEG), "b.jpg")]}),
        422,
        "not 2",
    ),
    (
        "file and another part",
        lambda u: u.multipart({"file": (io.BytesIO(PNG), "a.png"), "note": "hi"}),
        422,
        "nothing else",
    ),
    (
        "part declared text",
        lambda u: u.multipart({"file": (io.BytesIO(PNG), "a.txt", "text/plain")}),
        415,
        "text/plain",
    ),
    (
        "part declared jpeg, png bytes",
        lambda u: u.multipart({"file": (io.BytesIO(PNG), "a.jpg", "image/jpeg")}),
        422,
        "declared image/jpeg",
    ),
]


@pytest.mark.parametrize(
    ("send", "status", "says"), [c[1:] for c in BAD_UPLOADS], ids=[c[0] for c in BAD_UPLOADS]
)
def test_a_bad_upload_is_a_clear_problem_that_stores_nothing(
    uploading: Uploading, send: Callable[[Uploading], Any], status: int, says: str
) -> None:
    uploading.raw(image_bytes("PNG", color="black"), "image/png")  # something there already
    keys, blobs = uploading.upload_keys(), uploading.blobs()
    resp = send(uploading)
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.mimetype == PROBLEM_JSON
    problem = resp.get_json()
    assert problem["status"] == status
    assert says in problem["detail"] + " ".join(problem.get("errors", {}).get("file", []))
    assert uploading.upload_keys() == keys
    assert uploading.blobs() == blobs


def test_other_routes_keep_their_64_kib_limit(uploading: Uploading) -> None:
    resp = uploading.http.post(
        "/v1/jobs",
        data=b"{" + b" " * (65 * 1024) + b"}",
        headers=uploading.headers() | {"Content-Type": "application/json"},
    )
    assert resp.status_code == 413 and "64 KiB" in resp.get_json()["detail"]
    too_big = uploading.raw(b"\0" * (MAX_UPLOAD_BYTES + 1), "image/png")
    assert too_big.status_code == 413
    assert too_big.get_json()["type"] == resp.get_json()["type"]  # one problem type per status


def test_a_picture_of_exactly_the_limit_is_taken() -> None:
    facts = inspect_image(image_bytes("PNG", (8000, 4000), "black"))  # 32,000,000 pixels
    assert (facts.width, facts.height) == (8000, 4000)


def test_a_header_only_look_refuses_what_is_no_image_and_decodes_no_pixel() -> None:
    """How output copies are checked (workers/outputs.py): what the bytes say they are."""
    facts = inspect_image(PNG, whole=False)
    assert facts == inspect_image(PNG)
    cut_short = PNG[: len(PNG) // 2]
    assert inspect_image(cut_short, whole=False) == facts  # no pixel read: not noticed
    with pytest.raises(ImageRefused, match="cut short"):
        inspect_image(cut_short)
    for not_taken, says in [
        (b"<html>an error page</html>", "not a whole"),
        (GIF, "not a whole"),
        (png_header_only(8000, 4001), "8000x4001"),
        (png_header_only(60000, 60000), "too many pixels"),
    ]:
        with pytest.raises(ImageRefused, match=says):
            inspect_image(not_taken, whole=False)


def test_expired_uploads_lose_their_bytes_and_live_ones_keep_them(
    scratch: redis.Redis, tmp_path: Path
) -> None:
    media = FileMediaStore(tmp_path)
    store = UploadStore(scratch, media, retention_s=3600)
    old_data, live_data = image_bytes("PNG", color="red"), image_bytes("PNG", color="blue")
    old, _ = store.save("cli_a", old_data, inspect_image(old_data), now=1000.0)
    live, _ = store.save("cli_a", live_data, inspect_image(live_data), now=1000.0)
    assert store.load_ref("cli_a", old.ref) == (old, old_data)
    assert store.load_ref("cli_b", old.ref) is None  # another client's ref is nothing
    scratch.delete(f"{PREFIX}upload:cli_a:{old.id}")  # as Redis does when its TTL runs out

    assert remove_expired_uploads(store, now=1000.0) == 0  # nothing due yet
    assert remove_expired_uploads(store, now=1000.0 + 3601) == 1
    assert not media.exists(old.media_key) and media.exists(live.media_key)
    assert store.get("cli_a", live.id) == live
    # The live one's index entry now follows its record's TTL, not the time first written.
    (score,) = [s for _, s in scratch.zrange(UPLOAD_EXPIRY_KEY, 0, -1, withscores=True)]
    assert score > 1000.0 + 3601

    again, created = store.save("cli_a", old_data, inspect_image(old_data), now=5000.0)
    assert created and again.id == old.id and again.media_key != old.media_key
    assert store.load_ref("cli_a", again.ref) == (again, old_data)


def test_saving_the_same_bytes_again_never_shortens_how_long_they_are_kept(
    scratch: redis.Redis, tmp_path: Path
) -> None:
    """An output copy is kept as long as its job; the same picture uploaded later (kept the
    shorter upload retention) must not cut that short."""
    store = UploadStore(scratch, FileMediaStore(tmp_path), retention_s=3600)
    data = image_bytes("PNG", color="green")
    now = time.time()
    kept, _ = store.save("cli_a", data, inspect_image(data), now, keep_s=86400)
    record_key = f"{PREFIX}upload:cli_a:{kept.id}"
    assert 86000 < scratch.ttl(record_key) <= 86400
    again, created = store.save("cli_a", data, inspect_image(data), now + 60)
    assert not created and again == kept  # expires_at too: not rewritten
    assert scratch.ttl(record_key) > 86000
    longer, _ = store.save("cli_a", data, inspect_image(data), now + 60, keep_s=200000)
    assert scratch.ttl(record_key) > 199000 and longer.expires_at > kept.expires_at


def test_beat_sends_the_cleanup_and_a_real_worker_removes_expired_bytes(
    stack: Stack, redis_client: redis.Redis, app: Any
) -> None:
    settings = stack.settings()
    schedule = app.extensions["celery"].conf.beat_schedule
    assert schedule["remove-expired-uploads"]["task"] == REMOVE_EXPIRED_UPLOADS_TASK
    # On the worker's own Redis and media folder: an upload whose record has expired.
    media = media_store_from_url(settings.media_store_url)
    store = UploadStore(redis_client, media, retention_s=settings.upload_retention_s)
    data = image_bytes("PNG", color="purple")
    client_id = ClientStore(redis_client).create("cleanup").client_id
    old, _ = store.save(client_id, data, inspect_image(data), now=time.time() - 10 * 86400)
    redis_client.delete(f"{PREFIX}upload:{client_id}:{old.id}")
    assert media.exists(old.media_key)

    app.extensions["celery"].send_task(REMOVE_EXPIRED_UPLOADS_TASK)
    deadline = time.monotonic() + 30
    while media.exists(old.media_key) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not media.exists(old.media_key)


def test_concurrent_uploads_of_the_same_bytes_keep_one_copy(uploading: Uploading) -> None:
    data = image_bytes("PNG", color="orange")
    barrier = threading.Barrier(8)
    answers: list[Any] = []

    def send() -> None:
        barrier.wait()
        answers.append(uploading.raw(data, "image/png"))

    threads = [threading.Thread(target=send) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(a.status_code for a in answers).count(201) >= 1
    assert all(a.status_code in (200, 201) for a in answers)
    assert len({a.get_json()["id"] for a in answers}) == 1
    copies = [b for b in uploading.blobs() if b.count("/") == 3]
    assert len(copies) == 1 and not [b for b in uploading.blobs() if ".tmp-" in b]
    content = uploading.get(f"/v1/uploads/{answers[0].get_json()['id']}/content")
    assert content.data == data


def test_a_media_store_that_fails_is_a_503_storing_nothing(
    stack: Stack, make_app: Callable[..., Any], tmp_path: Path
) -> None:
    url = stack.redis_server.url.rsplit("/", 1)[0] + f"/{UPLOADS_DB}"
    client = connect_redis(url)
    client.flushdb()
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the media folder should be")
    app = make_app(
        REDIS_URL=url, CELERY_BROKER_URL=url, MEDIA_STORE_URL=(blocker / "media").as_uri()
    )
    creds = ClientStore(client).create("unlucky")
    before = sorted(client.scan_iter())
    resp = app.test_client().post(
        "/v1/uploads",
        data=image_bytes("PNG"),
        headers={"Authorization": f"Bearer {creds.api_key}", "Content-Type": "image/png"},
    )
    assert resp.status_code == 503 and resp.mimetype == PROBLEM_JSON
    assert resp.headers["Retry-After"] == "5"
    assert "not-a-folder" not in resp.get_data(as_text=True)  # no path or error text leaks
    assert sorted(k for k in client.scan_iter() if k != PREFIX + "counters") == [
        k for k in before if k != PREFIX + "counters"
    ]
    client.flushdb()
    client.close()
