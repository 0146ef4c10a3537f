"""API clients: who may call the gateway, with which key, and the secret their webhooks are signed with.

Only a SHA-256 of each API key is stored (keys are 256-bit random, so a fast hash is enough);
the key itself is shown once, at creation. Webhook secrets are stored as they must sign.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace

import redis

from core.keys import PREFIX

API_KEY_PREFIX = "igw_"
SECRET_ROTATION_OVERLAP_S = 24 * 3600
# Secrets signing beside the current one at most: rotations within one overlap beyond this
# cut the oldest off early (each one adds a signature to every webhook).
MAX_RETIRED_SECRETS = 4


def new_api_key() -> str:
    """A fresh API key."""
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def new_webhook_secret() -> str:
    """A fresh Standard Webhooks secret (`whsec_` + base64 of 32 random bytes)."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def hash_api_key(api_key: str) -> str:
    """What is stored in place of the key."""
    return hashlib.sha256(api_key.encode()).hexdigest()


@dataclass(frozen=True)
class Client:
    """A calling team."""

    id: str
    name: str
    created_at: float
    api_key_hash: str
    webhook_secret: str
    previous_webhook_secret: str | None = None
    previous_secret_until: float | None = None
    revoked_at: float | None = None
    # Secrets replaced before the previous one and still within their overlap, newest first:
    # (secret, until). Stored only when there are some (the release before cannot read them).
    earlier_webhook_secrets: tuple[tuple[str, float], ...] = ()

    def retired_secrets(self, now: float) -> list[tuple[str, float]]:
        """Replaced secrets still within their overlap, newest first: (secret, until)."""
        previous = (self.previous_webhook_secret, self.previous_secret_until or 0.0)
        replaced = [previous, *self.earlier_webhook_secrets]
        return [(secret, until) for secret, until in replaced if secret and until > now]

    def signing_secrets(self, now: float) -> list[str]:
        """Secrets to sign with: the current one, plus each replaced one for its overlap."""
        return [self.webhook_secret, *(secret for secret, _ in self.retired_secrets(now))]

    def rotated(self, new_secret: str, now: float) -> Client:
        """This client signing with `new_secret`; the replaced one signs too until its overlap
        ends, and so do the ones before it until theirs (a second rotation within the overlap
        does not cut off a team still on the first secret), at most MAX_RETIRED_SECRETS."""
        retired = self.retired_secrets(now)[: MAX_RETIRED_SECRETS - 1]
        return replace(
            self,
            webhook_secret=new_secret,
            previous_webhook_secret=self.webhook_secret,
            previous_secret_until=now + SECRET_ROTATION_OVERLAP_S,
            earlier_webhook_secrets=tuple(retired),
        )

    def to_record(self) -> str:
        """The stored JSON."""
        record = asdict(self)
        if not self.earlier_webhook_secrets:
            del record["earlier_webhook_secrets"]
        return json.dumps(record)

    @classmethod
    def from_record(cls, raw: str | bytes) -> Client:
        """A client from its stored JSON; fields a later release added are passed over."""
        record = json.loads(raw)
        client = cls(**{name: value for name, value in record.items() if name in _CLIENT_FIELDS})
        earlier = tuple((str(s), float(until)) for s, until in client.earlier_webhook_secrets)
        return replace(client, earlier_webhook_secrets=earlier)

    def summary(self) -> dict[str, object]:
        """What `clients list` shows (no secrets)."""
        return {
            "client_id": self.id,
            "name": self.name,
            "created_at": self.created_at,
            "revoked": self.revoked_at is not None,
        }


_CLIENT_FIELDS = frozenset(field.name for field in fields(Client))


@dataclass(frozen=True)
class NewClientCredentials:
    """Shown once: the caller must keep these."""

    client_id: str
    api_key: str
    webhook_secret: str


class ClientStore:
    """Clients in Redis, found by the hash of their API key."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    @staticmethod
    def _key(client_id: str) -> str:
        return f"{PREFIX}apiclient:{client_id}"

    @staticmethod
    def _api_key_index(api_key_hash: str) -> str:
        return f"{PREFIX}apikey:{api_key_hash}"

    _ALL = PREFIX + "apiclients"

    def create(self, name: str) -> NewClientCredentials:
        """Register a client; returns its API key and webhook secret (shown only now)."""
        client_id = "cli_" + secrets.token_hex(8)
        api_key = new_api_key()
        client = Client(
            id=client_id,
            name=name,
            created_at=time.time(),
            api_key_hash=hash_api_key(api_key),
            webhook_secret=new_webhook_secret(),
        )
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self._key(client_id), client.to_record())
            pipe.set(self._api_key_index(client.api_key_hash), client_id)
            pipe.sadd(self._ALL, client_id)
            pipe.execute()
        return NewClientCredentials(client_id, api_key, client.webhook_secret)

    def get(self, client_id: str) -> Client | None:
        """A client by id, revoked or not."""
        raw = self.redis.get(self._key(client_id))
        return Client.from_record(raw) if raw is not None else None

    def authenticate(self, api_key: str) -> Client | None:
        """The live client holding this key, or None."""
        client_id = self.redis.get(self._api_key_index(hash_api_key(api_key)))
        if client_id is None:
            return None
        client = self.get(str(client_id))
        return client if client is not None and client.revoked_at is None else None

    def list(self) -> list[Client]:
        """Every client, oldest first."""
        ids = sorted(str(m) for m in self.redis.smembers(self._ALL))
        clients = [c for c in (self.get(i) for i in ids) if c is not None]
        return sorted(clients, key=lambda c: c.created_at)

    def revoke(self, client_id: str) -> bool:
        """Stop a client's key from working (its jobs still finish and call back)."""
        revoked = self._change(
            client_id, lambda c: replace(c, revoked_at=c.revoked_at or time.time())
        )
        return revoked is not None

    def rotate_webhook_secret(self, client_id: str) -> str | None:
        """A new webhook secret; the replaced one keeps signing too for 24 h. Returns the new one."""
        secret = new_webhook_secret()
        rotated = self._change(client_id, lambda c: c.rotated(secret, time.time()))
        return rotated.webhook_secret if rotated is not None else None

    def _change(self, client_id: str, change: Callable[[Client], Client]) -> Client | None:
        """Write `change` of the stored client, computed again if the record changed meanwhile
        (a rotation and a revoke at once: neither undoes the other). None: no such client."""
        key = self._key(client_id)
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        return None
                    changed = change(Client.from_record(raw))
                    pipe.multi()
                    pipe.set(key, changed.to_record())
                    if changed.revoked_at is not None:
                        pipe.delete(self._api_key_index(changed.api_key_hash))
                    pipe.execute()
                    return changed
                except redis.WatchError:
                    continue
