"""Uploads (PRODUCT §10): a client's images, checked by decoding them, content-addressed per
client; metadata in Redis (with a TTL), bytes in the media store.

Each stored copy has a media key of its own (`uploads/<client>/<id>/<nonce>`): an upload that
expired and comes again is a new copy, so the cleanup of the old one can never remove the new.
Every copy is listed in one sorted set by when it expires; `remove_expired_uploads` removes the
bytes whose record is gone.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import secrets
import warnings
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from PIL import Image, UnidentifiedImageError

from core.keys import PREFIX
from core.media import MediaStore

MAX_UPLOAD_BYTES = 6 * 1024 * 1024
MAX_UPLOAD_PIXELS = 32_000_000
UPLOAD_ID_PATTERN = re.compile(r"upl_[0-9a-f]{32}")
UPLOAD_REF_PREFIX = "upload:"
UPLOAD_EXPIRY_KEY = PREFIX + "uploads:expiry"
CONTENT_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
CLEANUP_BATCH = 500


class ImageRefused(ValueError):
    """The bytes are not an image the gateway takes; `status`: 413, 415 or 422."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ImageFacts:
    """What decoding an image found."""

    content_type: str
    width: int
    height: int
    brightest: int | None = None  # its brightest pixel in grey, 0-255 (None: not looked at)


def _brightest_grey(image: Image.Image) -> int:
    """The brightest pixel of `image` (loaded) seen in grey, 0-255."""
    _, high = image.convert("L").getextrema()  # one band: two numbers
    return int(high)  # type: ignore[arg-type]  # Pillow types every mode's answer at once


def inspect_image(
    data: bytes,
    declared: str | None = None,
    *,
    max_bytes: int = MAX_UPLOAD_BYTES,
    whole: bool = True,
    brightest: bool = False,
) -> ImageFacts:
    """Decode `data` fully; its facts, or ImageRefused. `declared`: the type the caller named
    (None: none named) — it must be the type the bytes are. `max_bytes`: the size cap (a
    model's output may be larger than what a client may upload). `whole=False` reads the
    header only (format, size, frames) and decodes no pixel: for bytes kept and served as they
    came from a source the gateway trusts (RunComfy's outputs), where a full decode, most of
    the worker's CPU for a job, would protect nobody. `brightest=True` also finds the
    brightest pixel from the same decode (a mask's preflight)."""
    if not data:
        raise ImageRefused(422, "The body is empty; send the image's bytes.")
    if len(data) > max_bytes:
        raise ImageRefused(413, f"The image is over {max_bytes // (1024 * 1024)} MiB.")
    try:
        # Pillow's bomb warning as an error: an image past its limit must never be decoded.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=list(CONTENT_TYPES)) as image:
                content_type = CONTENT_TYPES[str(image.format)]
                width, height = image.size  # from the header, before any pixel is decoded
                if width * height > MAX_UPLOAD_PIXELS:
                    raise ImageRefused(
                        422,
                        f"The image is {width}x{height}, over {MAX_UPLOAD_PIXELS:,} pixels.",
                    )
                if getattr(image, "n_frames", 1) > 1:
                    raise ImageRefused(422, "The image is animated; send a single frame.")
                if whole or brightest:
                    image.load()  # every pixel: a truncated or corrupt image fails here
                grey_max = _brightest_grey(image) if brightest else None
    except ImageRefused:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRefused(422, "The image declares too many pixels to decode.") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageRefused(
            422, "The bytes are not a whole PNG, JPEG or WebP image (unreadable or cut short)."
        ) from exc
    if declared is not None and declared != content_type:
        raise ImageRefused(
            422, f"The bytes are {content_type}, but the request declared {declared}."
        )
    return ImageFacts(content_type, width, height, grey_max)


@dataclass(frozen=True)
class Upload:
    """An upload's record, as GET /v1/uploads/{id} answers it (but for `media_key`)."""

    id: str
    client_id: str
    sha256: str
    content_type: str
    width: int
    height: int
    bytes: int
    created_at: str
    expires_at: str
    media_key: str

    @property
    def ref(self) -> str:
        return UPLOAD_REF_PREFIX + self.id

    def to_resource(self) -> dict[str, Any]:
        """The public resource: no client id, no media key."""
        return {
            "id": self.id,
            "ref": self.ref,
            "sha256": self.sha256,
            "content_type": self.content_type,
            "width": self.width,
            "height": self.height,
            "bytes": self.bytes,
            "expires_at": self.expires_at,
        }


def upload_id_for(client_id: str, sha256: str) -> str:
    """The same bytes from the same client: the same id; from another client, another id."""
    return "upl_" + hashlib.sha256(f"{client_id}\n{sha256}".encode()).hexdigest()[:32]


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


# Keep an existing upload at least another period (never shorter than it is already kept: a
# job may be holding it), or store this one if none is there.
# KEYS: the upload's record, the expiry index
# ARGV: the new record (JSON), seconds to keep, expires-at (epoch s), new expires_at text, "1"
#       to extend only (a record that has meanwhile expired is not written again: its bytes may
#       be being removed)
# Returns the record kept and 1 if it was created, 0 if it was there already; {} if there was
# nothing to extend.
_SAVE = """
local found = redis.call('GET', KEYS[1])
if not found and ARGV[5] == '1' then return {} end
if found then
  if redis.call('TTL', KEYS[1]) < tonumber(ARGV[2]) then
    local record = cjson.decode(found)
    record['expires_at'] = ARGV[4]
    found = cjson.encode(record)
    redis.call('SET', KEYS[1], found, 'EX', ARGV[2])
    redis.call('ZADD', KEYS[2], ARGV[3], record['media_key'])
  end
  return {found, 0}
end
local record = cjson.decode(ARGV[1])
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], record['media_key'])
return {ARGV[1], 1}
"""

# Claim expired copies whose record is gone or names another copy; re-date the others.
# KEYS: the expiry index; ARGV: now (epoch s), batch size, the record key prefix
# Returns the media keys claimed (removed from the index: the caller deletes their bytes).
_CLAIM_EXPIRED = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
local claimed = {}
for _, media_key in ipairs(due) do
  local client, id = string.match(media_key, '^uploads/([^/]+)/([^/]+)/')
  local record = client and redis.call('GET', ARGV[3] .. client .. ':' .. id)
  local ttl = record and redis.call('TTL', ARGV[3] .. client .. ':' .. id) or -2
  if record and cjson.decode(record)['media_key'] == media_key and ttl > 0 then
    redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + ttl, media_key)
  else
    redis.call('ZREM', KEYS[1], media_key)
    table.insert(claimed, media_key)
  end
end
return claimed
"""

# Keep an upload at least until a time: its record's TTL and expires_at lengthened, never cut.
# KEYS: the upload's record; ARGV: seconds from now, the expires_at text for that time
# Returns the record as it now is, or nil if there is none.
_KEEP_UNTIL = """
local found = redis.call('GET', KEYS[1])
if not found then return nil end
if redis.call('TTL', KEYS[1]) < tonumber(ARGV[1]) then
  local record = cjson.decode(found)
  record['expires_at'] = ARGV[2]
  found = cjson.encode(record)
  redis.call('SET', KEYS[1], found, 'EX', ARGV[1])
end
return found
"""


class UploadStore:
    """Uploads of every client: records in Redis, bytes in `media`."""

    RECORD_PREFIX = PREFIX + "upload:"

    def __init__(self, client: redis.Redis, media: MediaStore, *, retention_s: int) -> None:
        self.redis = client
        self.media = media
        self.retention_s = retention_s
        self._save = client.register_script(_SAVE)
        self._claim = client.register_script(_CLAIM_EXPIRED)
        self._keep_until = client.register_script(_KEEP_UNTIL)

    def _record_key(self, client_id: str, upload_id: str) -> str:
        return f"{self.RECORD_PREFIX}{client_id}:{upload_id}"

    def save(
        self,
        client_id: str,
        data: bytes,
        facts: ImageFacts,
        now: float,
        *,
        keep_s: int | None = None,
    ) -> tuple[Upload, bool]:
        """Keep `data` (checked by inspect_image) for `client_id`: the upload and whether it is
        new. The same bytes again: the same upload, kept another retention period. `keep_s`:
        keep it at least this long instead (an output copy lives as long as its job)."""
        digest = hashlib.sha256(data).hexdigest()
        upload_id = upload_id_for(client_id, digest)
        record_key = self._record_key(client_id, upload_id)
        keep_for_s = max(self.retention_s, keep_s or 0)
        expires = now + keep_for_s
        existing = self.get(client_id, upload_id)
        if existing is not None and self.media.exists(existing.media_key):
            extended = self._commit(record_key, existing, keep_for_s, expires, extend_only=True)
            if extended is not None:
                return extended
        upload = Upload(
            id=upload_id,
            client_id=client_id,
            sha256=digest,
            content_type=facts.content_type,
            width=facts.width,
            height=facts.height,
            bytes=len(data),
            created_at=_iso(now),
            expires_at=_iso(expires),
            media_key=f"uploads/{client_id}/{upload_id}/{secrets.token_hex(8)}",
        )
        if existing is not None:  # a record whose bytes are gone: this copy replaces it
            self.redis.delete(record_key)
        self.media.put(upload.media_key, data, upload.content_type)
        try:
            committed = self._commit(record_key, upload, keep_for_s, expires, extend_only=False)
        except BaseException:
            self.media.delete(upload.media_key)  # no record names it: nothing left behind
            raise
        assert committed is not None  # only an extension can find nothing
        kept, created = committed
        if kept.media_key != upload.media_key:  # another request stored the same bytes first
            self.media.delete(upload.media_key)
        return kept, created

    def _commit(
        self, record_key: str, upload: Upload, keep_s: int, expires: float, *, extend_only: bool
    ) -> tuple[Upload, bool] | None:
        answer = self._save(
            keys=[record_key, UPLOAD_EXPIRY_KEY],
            args=[
                json.dumps(asdict(upload)),
                keep_s,
                f"{expires:.3f}",
                _iso(expires),
                "1" if extend_only else "0",
            ],
        )
        if not answer:
            return None
        found, created = answer
        return Upload(**json.loads(found)), bool(created)

    def get(self, client_id: str, upload_id: str) -> Upload | None:
        """The client's upload, or None (another client's is None too)."""
        if not UPLOAD_ID_PATTERN.fullmatch(upload_id):
            return None
        found = self.redis.get(self._record_key(client_id, upload_id))
        return Upload(**json.loads(found)) if found else None

    def content(self, upload: Upload) -> bytes | None:
        """The upload's bytes, or None if the store no longer has them."""
        return self.media.get(upload.media_key)

    def keep_until(self, client_id: str, upload_id: str, until: float, now: float) -> Upload | None:
        """Keep the client's upload at least until `until` (epoch s; never shortened), e.g. as
        long as a job that uses it lives: the upload as it now is, or None if there is none.

        The expiry index needs no change: the cleanup re-dates a copy whose record still lives.
        """
        seconds = max(1, math.ceil(until - now))
        found = self._keep_until(
            keys=[self._record_key(client_id, upload_id)], args=[seconds, _iso(now + seconds)]
        )
        return Upload(**json.loads(found)) if found else None

    def load_ref(self, client_id: str, ref: str) -> tuple[Upload, bytes] | None:
        """An `upload:upl_…` reference of `client_id`'s: its record and bytes, or None."""
        if not ref.startswith(UPLOAD_REF_PREFIX):
            return None
        upload = self.get(client_id, ref[len(UPLOAD_REF_PREFIX) :])
        data = self.content(upload) if upload is not None else None
        return (upload, data) if upload is not None and data is not None else None


def remove_expired_uploads(store: UploadStore, now: float, batch: int = CLEANUP_BATCH) -> int:
    """Delete the bytes of uploads whose record has expired; how many were deleted."""
    removed = 0
    while True:
        claimed = store._claim(
            keys=[UPLOAD_EXPIRY_KEY], args=[f"{now:.3f}", batch, store.RECORD_PREFIX]
        )
        for media_key in claimed:
            store.media.delete(media_key.decode() if isinstance(media_key, bytes) else media_key)
        removed += len(claimed)
        if len(claimed) < batch:
            return removed
