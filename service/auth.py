"""Bearer API keys: every /v1 route knows its client, or answers 401."""

from __future__ import annotations

import threading
import time

from flask import g, request
from werkzeug.exceptions import Unauthorized

from core.clients import Client, ClientStore, hash_api_key
from service.context import ctx


class MissingOrBadApiKey(Unauthorized):
    """401 with the Bearer challenge."""

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.data = {"headers": {"WWW-Authenticate": 'Bearer realm="inpaint-gateway"'}}


class RecentKeys:
    """API keys seen in the last moment, so a burst of requests does not read Redis twice each
    for them; a revoked key, or one whose rotation overlap has ended, is refused within CACHE_S
    on every API process (PRODUCT §9: within 1 s). Keyed by the key's hash, never the key."""

    CACHE_S = 0.5
    MAX_ENTRIES = 10_000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[float, Client | None]] = {}

    def authenticate(self, clients: ClientStore, api_key: str) -> Client | None:
        key_hash = hash_api_key(api_key)
        now = time.monotonic()
        with self._lock:
            hit = self._seen.get(key_hash)
        if hit is not None and now - hit[0] < self.CACHE_S:
            return hit[1]
        client = clients.authenticate(api_key)
        with self._lock:
            if len(self._seen) >= self.MAX_ENTRIES:
                self._seen.clear()
            self._seen[key_hash] = (now, client)
        return client


def authenticate() -> None:
    """Find the calling client from `Authorization: Bearer <api_key>`."""
    header = request.headers.get("Authorization", "")
    scheme, _, api_key = header.partition(" ")
    if scheme.lower() != "bearer" or not api_key.strip():
        raise MissingOrBadApiKey("Send your API key as 'Authorization: Bearer <api_key>'.")
    client = ctx().recent_keys.authenticate(ctx().clients, api_key.strip())
    if client is None:
        raise MissingOrBadApiKey("The API key is not valid (unknown or revoked).")
    g.client = client


def current_client() -> Client:
    """The authenticated client of this request."""
    client: Client = g.client
    return client
