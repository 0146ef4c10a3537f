"""The media store: image bytes (uploads, later job outputs) kept outside Redis.

`MEDIA_STORE_URL` picks the backend: `file:///path` (a directory; one file per key, written
atomically) or `s3://bucket/prefix` (boto3; `MEDIA_S3_ENDPOINT_URL` for MinIO, Ceph and other
S3-compatible stores; credentials from boto3's usual environment). Blobs never go into Redis.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

# Segments of letters, digits, '.', '_', '-', each starting with a letter or digit: no '..', no
# absolute path, no backslash, nothing a filesystem or S3 would read as more than a name.
MEDIA_KEY_PATTERN = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}(/[A-Za-z0-9][A-Za-z0-9._-]{0,127}){0,7}"
)
S3_TIMEOUT_S = 10.0


class MediaStoreError(Exception):
    """The media store could not be reached or refused an operation."""


def check_media_key(key: str) -> str:
    """`key` if it is a valid media key; else ValueError (a key never escapes the store)."""
    if not isinstance(key, str) or not MEDIA_KEY_PATTERN.fullmatch(key):
        raise ValueError(f"not a media key: {key!r}")
    return key


class MediaStore(Protocol):
    """Bytes by key: put, get, delete, exists."""

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store `data` under `key`, replacing what was there, all or nothing."""

    def get(self, key: str) -> bytes | None:
        """The bytes under `key`, or None."""

    def delete(self, key: str) -> None:
        """Remove `key`; no error if it is not there."""

    def exists(self, key: str) -> bool:
        """True if `key` holds bytes."""


class FileMediaStore:
    """A directory: one file per key, written to a temporary file and renamed into place."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    def _path(self, key: str) -> Path:
        path = (self.root / check_media_key(key)).resolve()
        if not path.is_relative_to(self.root):  # the pattern already forbids it; a second lock
            raise ValueError(f"not a media key: {key!r}")
        return path

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store `data`; a reader sees the old file or the whole new one, never a part."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def get(self, key: str) -> bytes | None:
        """The file's bytes, or None."""
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        """Remove the file, if there."""
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def exists(self, key: str) -> bool:
        """True if the file is there."""
        return self._path(key).is_file()


# The codes S3 (and S3-compatible stores) answer for an object that is not there.
S3_NOT_FOUND = frozenset({"NoSuchKey", "404", "NotFound"})


class S3MediaStore:
    """A bucket (and a prefix in it), through boto3."""

    def __init__(self, client: Any, bucket: str, prefix: str = "") -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""

    def _key(self, key: str) -> str:
        return self.prefix + check_media_key(key)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """PutObject: S3 makes an object visible whole or not at all."""
        object_key = self._key(key)
        self._call(
            "put",
            lambda: self.client.put_object(
                Bucket=self.bucket, Key=object_key, Body=data, ContentType=content_type
            ),
        )

    def get(self, key: str) -> bytes | None:
        """GetObject's body, or None if there is no such object."""
        object_key = self._key(key)
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=object_key)
            body: bytes = answer["Body"].read()
            return body
        except self._client_error() as exc:
            if _s3_code(exc) in S3_NOT_FOUND:
                return None
            raise MediaStoreError(f"media store get failed: {_s3_code(exc)}") from exc
        except self._boto_error() as exc:
            raise MediaStoreError(f"media store get failed: {type(exc).__name__}") from exc

    def delete(self, key: str) -> None:
        """DeleteObject (S3 answers the same whether or not it was there)."""
        object_key = self._key(key)
        self._call("delete", lambda: self.client.delete_object(Bucket=self.bucket, Key=object_key))

    def exists(self, key: str) -> bool:
        """HeadObject."""
        object_key = self._key(key)
        try:
            self.client.head_object(Bucket=self.bucket, Key=object_key)
            return True
        except self._client_error() as exc:
            if _s3_code(exc) in S3_NOT_FOUND:
                return False
            raise MediaStoreError(f"media store exists failed: {_s3_code(exc)}") from exc
        except self._boto_error() as exc:
            raise MediaStoreError(f"media store exists failed: {type(exc).__name__}") from exc

    def _call(self, what: str, call: Any) -> None:
        try:
            call()
        except self._client_error() as exc:
            raise MediaStoreError(f"media store {what} failed: {_s3_code(exc)}") from exc
        except self._boto_error() as exc:
            raise MediaStoreError(f"media store {what} failed: {type(exc).__name__}") from exc

    @staticmethod
    def _client_error() -> type[Exception]:
        from botocore.exceptions import ClientError

        return ClientError

    @staticmethod
    def _boto_error() -> type[Exception]:
        from botocore.exceptions import BotoCoreError

        return BotoCoreError


def _s3_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", "unknown"))


def check_media_store_url(url: str) -> str:
    """`url` if it names a store: file:///absolute/path or s3://bucket[/prefix]; else ValueError."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not unquote(parts.path).startswith("/"):
            raise ValueError("a file: media store URL must be file:///absolute/path")
        return url
    if parts.scheme == "s3":
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", parts.netloc):
            raise ValueError("an s3: media store URL must be s3://bucket[/prefix]")
        if parts.query or parts.fragment:
            raise ValueError("an s3: media store URL takes no query or fragment")
        return url
    raise ValueError("must be file:///path or s3://bucket[/prefix]")


def media_store_from_url(url: str, *, s3_endpoint_url: str | None = None) -> MediaStore:
    """The store `url` names (see check_media_store_url)."""
    parts = urlsplit(check_media_store_url(url))
    if parts.scheme == "file":
        return FileMediaStore(unquote(parts.path))
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint_url or None,
        config=Config(
            connect_timeout=S3_TIMEOUT_S,
            read_timeout=S3_TIMEOUT_S,
            retries={"max_attempts": 3, "mode": "standard"},
        ),
    )
    return S3MediaStore(client, parts.netloc, unquote(parts.path))
