"""Signed media URLs (PRODUCT §10): `/v1/media/{id}?exp=<epoch s>&sig=<HMAC-SHA256, base64url>`.

A signed URL opens one stored output without a key (a browser, another service) until `exp`.
The HMAC key is 32 random bytes shared by every replica through Redis (core/shared_secrets.py),
so every replica signs and checks alike with nothing to configure. The signing and checking themselves are plain functions.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass

import redis

from core.keys import PREFIX
from core.shared_secrets import shared_secret

MEDIA_PATH_PREFIX = "/v1/media/"
SIGNING_KEY = PREFIX + "media:signing-key"
SIGNING_KEY_BYTES = 32
# Which client owns a media id: a signed URL names the id alone, and records are per client.
OWNER_KEY_PREFIX = PREFIX + "media:owner:"


def signature(key: bytes, media_id: str, expires_at: int) -> str:
    """The `sig` of a URL for `media_id` valid until `expires_at` (epoch s)."""
    message = f"{media_id}\n{expires_at}".encode()
    digest = hmac.new(key, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def signature_holds(key: bytes, media_id: str, exp: str, sig: str, now: float) -> bool:
    """`exp` and `sig` as a request gave them are ours for `media_id` and not past `now`."""
    if not exp.isdigit() or len(exp) > 12:
        return False
    expected = signature(key, media_id, int(exp))
    # Constant time: how much of a guessed signature matches must not show in the answer's time.
    matches = hmac.compare_digest(expected.encode(), sig.encode("utf-8", "replace"))
    return matches and now <= int(exp)


@dataclass(frozen=True)
class MediaLinks:
    """How media ids become URLs at one moment: the key, the base (scheme://host[:port] and
    any root path, or "" for the path alone) and when the URLs expire."""

    key: bytes
    base: str
    expires_at: int

    def url(self, media_id: str) -> str:
        """The signed URL of `media_id`."""
        sig = signature(self.key, media_id, self.expires_at)
        return f"{self.base}{MEDIA_PATH_PREFIX}{media_id}?exp={self.expires_at}&sig={sig}"


def media_links(key: bytes, base: str, now: float, ttl_s: int) -> MediaLinks:
    """Links signed at `now`, valid `ttl_s`."""
    return MediaLinks(key=key, base=base.rstrip("/"), expires_at=int(now) + ttl_s)


def signing_key(client: redis.Redis) -> bytes:
    """The HMAC key every replica shares (core/shared_secrets.py)."""
    return shared_secret(client, SIGNING_KEY, SIGNING_KEY_BYTES)


def record_owner(client: redis.Redis, media_id: str, client_id: str, ttl_s: int) -> None:
    """Remember that `media_id` is `client_id`'s for `ttl_s` (never shortened by a later call)."""
    key = OWNER_KEY_PREFIX + media_id
    pipe = client.pipeline()
    pipe.set(key, client_id, keepttl=True)
    pipe.expire(key, ttl_s, gt=True)  # a key without a TTL counts as endless here: NX sets it
    pipe.expire(key, ttl_s, nx=True)
    pipe.execute()


def owner_of(client: redis.Redis, media_id: str) -> str | None:
    """The client a media id belongs to, or None."""
    found = client.get(OWNER_KEY_PREFIX + media_id)
    if found is None:
        return None
    return found.decode() if isinstance(found, bytes) else str(found)
