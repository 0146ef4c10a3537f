"""Secrets every replica shares with nothing to configure: random bytes kept in Redis (as hex),
set once by whichever process needs one first (SET NX), then cached by each process."""

from __future__ import annotations

import secrets
import threading

import redis

DEFAULT_SECRET_BYTES = 32

_cached: dict[tuple[object, ...], bytes] = {}
_cached_lock = threading.Lock()


def shared_secret(
    client: redis.Redis, redis_key: str, n_bytes: int = DEFAULT_SECRET_BYTES
) -> bytes:
    """The secret under `redis_key`: created in Redis by the first to ask, then cached."""
    kwargs = client.connection_pool.connection_kwargs
    where = (
        kwargs.get("host"),
        kwargs.get("port"),
        kwargs.get("path"),
        kwargs.get("db"),
        redis_key,
    )
    with _cached_lock:
        cached = _cached.get(where)
    if cached is not None:
        return cached
    # Hex: the gateway's Redis clients answer text, and random bytes are seldom valid UTF-8.
    client.set(redis_key, secrets.token_hex(n_bytes), nx=True)
    stored = client.get(redis_key)
    assert stored is not None, "the secret was set just above"
    secret = bytes.fromhex(stored.decode() if isinstance(stored, bytes) else str(stored))
    with _cached_lock:
        _cached[where] = secret
    return secret
