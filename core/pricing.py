"""The list price per output image, shared by every worker and API replica through Redis.

RunComfy's `GET /v1/models/{model_id}` answers `base_price_usd` per output image. It is the cost
of a job RunComfy gave no cost for (PRODUCT §9), and the estimate a budget reserves at accept.
The price is kept in Redis, fetched again once it is older than FRESH_S — one fetch for the
whole deployment, not one per process: the fetch runs under a lock (SET NX) that only one
caller gets, so a cold cache under load makes one call. The last known price is kept for ever
(no TTL): when a refresh fails, callers go on with it, and the next try waits RETRY_AFTER_FAILURE_S.

The fetch itself is passed in (`fetch`): the workers and the API both pass
`RunComfyClient.list_price_usd` (workers/runcomfy.py — importing it loads no Celery), so that
RunComfy's answers are read, and their errors mapped, in one place.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from core.keys import PREFIX

log = logging.getLogger(__name__)

PRICE_KEY = PREFIX + "list_price"  # hash: usd, fetched_at (epoch s)
LOCK_KEY = PREFIX + "list_price:lock"  # "fetching" while one caller fetches; "failed" after
FRESH_S = 600.0  # PRODUCT §9: the list price is cached at most 10 min
# Longer than any fetch takes (RUNCOMFY_TIMEOUT_S is 20 s by default): a fetcher that died
# holding the lock frees it by then.
FETCH_LOCK_S = 30.0
RETRY_AFTER_FAILURE_S = 30.0  # while the price route fails, one try per this for everyone
WAIT_POLL_S = 0.05


@dataclass(frozen=True)
class KnownPrice:
    """The list price per output image, and when it was fetched."""

    usd: float
    fetched_at: float


class ListPrice:
    """The list price per output image: cached in Redis, fetched by one caller at a time."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        fetch: Callable[[], float],
        fresh_s: float = FRESH_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = client
        self._fetch = fetch
        self.fresh_s = fresh_s
        self._clock = clock

    def usd_per_image(self, *, wait_s: float = 0.0) -> float | None:
        """The price to use now: the cached one, refreshed first if it is older than FRESH_S
        and no one else is fetching it; the last known one when a refresh fails; None when no
        price was ever known. With no price known and another caller fetching it, waits up to
        `wait_s` for that caller's answer."""
        known = self.known()
        if known is not None and self._clock() - known.fetched_at < self.fresh_s:
            return known.usd
        if self.redis.set(LOCK_KEY, "fetching", nx=True, px=int(FETCH_LOCK_S * 1000)):
            fetched = self._refresh()
            if fetched is not None:
                return fetched
        elif known is None and wait_s > 0:
            return self._wait_for_fetcher(wait_s)
        return known.usd if known is not None else None

    def known(self) -> KnownPrice | None:
        """The last price fetched, however old, or None."""
        raw: dict[str, str] = self.redis.hgetall(PRICE_KEY)  # type: ignore[assignment]
        try:
            return KnownPrice(float(raw["usd"]), float(raw["fetched_at"]))
        except (KeyError, ValueError):
            return None

    def _refresh(self) -> float | None:
        """Fetch the price (this caller holds the lock) and store it; None if the fetch failed."""
        try:
            usd = float(self._fetch())
            if not math.isfinite(usd) or usd < 0:
                raise ValueError(f"not a price: {usd!r}")
        except Exception as exc:  # whatever the fetch raises, a job or a POST goes on without it
            log.warning(
                "list price refresh failed; keeping the last known", extra={"error": str(exc)}
            )
            self.redis.set(LOCK_KEY, "failed", px=int(RETRY_AFTER_FAILURE_S * 1000))
            return None
        with self.redis.pipeline() as pipe:
            pipe.hset(PRICE_KEY, mapping={"usd": repr(usd), "fetched_at": repr(self._clock())})
            pipe.delete(LOCK_KEY)
            pipe.execute()
        return usd

    def _wait_for_fetcher(self, wait_s: float) -> float | None:
        """Another caller is fetching the first price: wait for it (up to `wait_s`)."""
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            known = self.known()
            if known is not None:
                return known.usd
            if self.redis.get(LOCK_KEY) != "fetching":  # done (read it) or failed: stop waiting
                known = self.known()
                return known.usd if known is not None else None
            time.sleep(WAIT_POLL_S)
        return None
