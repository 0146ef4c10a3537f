"""The media store (core/media.py): the same tests against a directory and against S3 over real
HTTP (moto's server mode), keys that could escape the store refused, writes all or nothing."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

from cli.stack import free_port
from core.media import (
    FileMediaStore,
    MediaStore,
    MediaStoreError,
    S3MediaStore,
    check_media_store_url,
    media_store_from_url,
)

BUCKET = "media-test"
PNG_TYPE = "image/png"
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """moto's S3 on a free port, over HTTP, with a bucket; fake credentials in the environment
    (boto3 reads them from there, as it would real ones)."""
    saved = {name: os.environ.get(name) for name in FAKE_CREDENTIALS}
    os.environ.update(FAKE_CREDENTIALS)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=BUCKET)
    client.close()
    try:
        yield endpoint
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(params=["file", "s3"])
def media(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MediaStore]:
    """Each backend, built from its URL as the settings give it."""
    if request.param == "file":
        yield media_store_from_url((tmp_path / "media").as_uri())
        return
    endpoint = request.getfixturevalue("moto_endpoint")
    store = media_store_from_url(f"s3://{BUCKET}/{tmp_path.name}", s3_endpoint_url=endpoint)
    assert isinstance(store, S3MediaStore)
    yield store
    store.client.close()


def test_put_then_get_answers_the_same_bytes(media: MediaStore) -> None:
    data = bytes(range(256)) * 100
    media.put("uploads/cli_1/upl_a", data, PNG_TYPE)
    assert media.get("uploads/cli_1/upl_a") == data
    assert media.exists("uploads/cli_1/upl_a")


def test_a_missing_key_is_none_and_not_there(media: MediaStore) -> None:
    assert media.get("uploads/nobody/upl_none") is None
    assert not media.exists("uploads/nobody/upl_none")


def test_put_replaces_and_delete_removes(media: MediaStore) -> None:
    media.put("k/one", b"first", PNG_TYPE)
    media.put("k/one", b"second", PNG_TYPE)
    assert media.get("k/one") == b"second"
    media.delete("k/one")
    assert media.get("k/one") is None and not media.exists("k/one")
    media.delete("k/one")  # again: no error


def test_keys_are_separate(media: MediaStore) -> None:
    media.put("a/b", b"ab", PNG_TYPE)
    media.put("a/c", b"ac", PNG_TYPE)
    assert (media.get("a/b"), media.get("a/c")) == (b"ab", b"ac")


@pytest.mark.parametrize(
    "key",
    ["../escape", "a/../../etc/passwd", "/abs", "a//b", "", ".hidden", "a/./b", "a\\b", "a/b/"],
)
def test_a_key_that_could_leave_the_store_is_refused(media: MediaStore, key: str) -> None:
    with pytest.raises(ValueError, match="not a media key"):
        media.put(key, b"x", PNG_TYPE)
    with pytest.raises(ValueError, match="not a media key"):
        media.get(key)


def test_s3_objects_carry_their_content_type_and_prefix(moto_endpoint: str) -> None:
    store = media_store_from_url(f"s3://{BUCKET}/pre/fix", s3_endpoint_url=moto_endpoint)
    assert isinstance(store, S3MediaStore)
    store.put("x/y", b"bytes", "image/webp")
    head = store.client.head_object(Bucket=BUCKET, Key="pre/fix/x/y")
    assert head["ContentType"] == "image/webp"
    store.client.close()


def test_s3_unreachable_is_a_media_store_error() -> None:
    store = media_store_from_url(
        f"s3://{BUCKET}", s3_endpoint_url=f"http://127.0.0.1:{free_port()}"
    )
    assert isinstance(store, S3MediaStore)
    store.client.meta.config.retries = {"max_attempts": 1}
    with pytest.raises(MediaStoreError):
        store.put("a", b"x", PNG_TYPE)
    with pytest.raises(MediaStoreError):
        store.get("a")
    store.client.close()


def test_a_failed_file_write_leaves_neither_file_nor_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileMediaStore(tmp_path)
    store.put("a/b", b"old", PNG_TYPE)

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        store.put("a/b", b"new", PNG_TYPE)
    assert store.get("a/b") == b"old"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b"]


@pytest.mark.parametrize(
    "url",
    ["file://relative/path", "http://x/y", "s3://", "s3://UPPER/x", "s3://b/x?y=1", "media"],
)
def test_a_bad_store_url_is_refused(url: str) -> None:
    with pytest.raises(ValueError):
        check_media_store_url(url)


def test_good_store_urls_pass() -> None:
    for url in ("file:///var/media", "s3://my-bucket", "s3://my-bucket/some/prefix"):
        assert check_media_store_url(url) == url
