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
from typing import Any

import redis

from core.admission import FairAdmission
from core.keys import PREFIX
from core.limits import NO_LIMITS, ClientLimits

API_KEY_PREFIX = "igw_"
SECRET_ROTATION_OVERLAP_S = 24 * 3600
API_KEY_ROTATION_OVERLAP_S = 24 * 3600  # the replaced key keeps working this long by default
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
    # API keys replaced by a rotation and still working until their overlap ends: (hash, until).
    # Their index entries in Redis expire then by themselves; kept here so a revoke finds them.
    retired_api_keys: tuple[tuple[str, float], ...] = ()
    limits: ClientLimits = NO_LIMITS

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
        """The stored JSON; fields still empty are left out (the release before cannot read
        them)."""
        record = asdict(self)
        record["limits"] = self.limits.to_dict()
        for name in ("earlier_webhook_secrets", "retired_api_keys"):
            if not record[name]:
                del record[name]
        if self.limits.is_empty:
            del record["limits"]
        return json.dumps(record)

    @classmethod
    def from_record(cls, raw: str | bytes) -> Client:
        """A client from its stored JSON; fields a later release added are passed over."""
        record = json.loads(raw)
        client = cls(**{name: value for name, value in record.items() if name in _CLIENT_FIELDS})
        return replace(
            client,
            earlier_webhook_secrets=_pairs(client.earlier_webhook_secrets),
            retired_api_keys=_pairs(client.retired_api_keys),
            limits=ClientLimits.from_dict(record.get("limits")),
        )

    def api_key_hashes(self) -> list[str]:
        """Every key hash indexed for this client: the current one and any retired ones."""
        return [self.api_key_hash, *(key_hash for key_hash, _ in self.retired_api_keys)]

    def summary(self) -> dict[str, Any]:
        """What `clients list` shows (no secrets)."""
        return {
            "client_id": self.id,
            "name": self.name,
            "created_at": self.created_at,
            "revoked": self.revoked_at is not None,
            "limits": self.limits.to_dict(),
        }


_CLIENT_FIELDS = frozenset(field.name for field in fields(Client))


def _pairs(stored: Any) -> tuple[tuple[str, float], ...]:
    """(text, until) pairs as JSON gives them back (lists) as tuples."""
    return tuple((str(text), float(until)) for text, until in stored)


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
        return self.authenticate_hash(hash_api_key(api_key))

    def authenticate_hash(self, api_key_hash: str) -> Client | None:
        """The live client whose key hashes so, or None: what holds a key without keeping it
        (a console session) checks it still works (not revoked, not rotated out)."""
        client_id = self.redis.get(self._api_key_index(api_key_hash))
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
        """Stop a client's keys from working (its jobs still finish and call back)."""
        revoked = self._change(
            client_id, lambda c: replace(c, revoked_at=c.revoked_at or time.time())
        )
        return revoked is not None

    def rotate_webhook_secret(self, client_id: str) -> str | None:
        """A new webhook secret; the replaced one keeps signing too for 24 h. Returns the new one."""
        secret = new_webhook_secret()
        rotated = self._change(client_id, lambda c: c.rotated(secret, time.time()))
        return rotated.webhook_secret if rotated is not None else None

    def rotate_api_key(
        self, client_id: str, *, overlap_s: float = API_KEY_ROTATION_OVERLAP_S
    ) -> str | None:
        """A new API key; the replaced one keeps working for `overlap_s` (0: not at all), then
        is refused. Returns the new key, or None (no such client, or revoked)."""
        api_key = new_api_key()
        now = time.time()

        def rotated(c: Client) -> Client | None:
            if c.revoked_at is not None:
                return None
            retired = [(h, until) for h, until in c.retired_api_keys if until > now]
            if overlap_s > 0:
                retired.insert(0, (c.api_key_hash, now + overlap_s))
            return replace(c, api_key_hash=hash_api_key(api_key), retired_api_keys=tuple(retired))

        changed = self._change(client_id, rotated)
        return api_key if changed is not None else None

    def set_limits(self, client_id: str, limits: ClientLimits) -> Client | None:
        """Replace the client's limits (NO_LIMITS clears them); None: no such client."""
        return self._change(client_id, lambda c: replace(c, limits=limits))

    def _change(self, client_id: str, change: Callable[[Client], Client | None]) -> Client | None:
        """Write `change` of the stored client, computed again if the record changed meanwhile
        (a rotation and a revoke at once: neither undoes the other), with the index entries of
        its keys and its admission cap. None: no such client, or `change` declined."""
        key = self._key(client_id)
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        return None
                    before = Client.from_record(raw)
                    changed = change(before)
                    if changed is None:
                        return None
                    pipe.multi()
                    pipe.set(key, changed.to_record())
                    self._write_key_index(pipe, before, changed)
                    FairAdmission.write_cap(pipe, client_id, changed.limits.max_in_flight)
                    pipe.execute()
                    return changed
                except redis.WatchError:
                    continue

    def _write_key_index(self, pipe: redis.client.Pipeline, before: Client, after: Client) -> None:
        """The key index as `after` needs it: nothing for a revoked client; else its key, and
        each retired key until its overlap ends."""
        if after.revoked_at is not None:
            pipe.delete(*(self._api_key_index(h) for h in before.api_key_hashes()))
            return
        if after.api_key_hash == before.api_key_hash:
            return
        pipe.set(self._api_key_index(after.api_key_hash), after.id)
        retired = dict(after.retired_api_keys)
        for key_hash in before.api_key_hashes():
            until = retired.get(key_hash)
            if until is None:
                pipe.delete(self._api_key_index(key_hash))
            else:
                pipe.pexpireat(self._api_key_index(key_hash), round(until * 1000))
