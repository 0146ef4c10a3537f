"""Deliver one webhook attempt: sign, send to a checked address, record, schedule the next."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import requests

from core.clients import ClientStore
from core.http.deadlines import DEADLINES
from core.http.egress import (
    EgressPolicy,
    RefusedDestination,
    egress_session,
    keep_connection_after_answer,
)
from core.metrics import Counters
from core.retry_after import parse_retry_after_s
from core.settings import MAX_WEBHOOK_RETRY_AFTER_S, Settings
from core.store import JobStore
from core.webhooks import (
    DELIVERED,
    EXHAUSTED,
    GONE,
    PENDING,
    WebhookEvent,
    delivery_record,
    signature_headers,
)
from workers.receiver_lines import ReceiverLines, receiver_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttemptResult:
    """What one POST to the receiver came to."""

    status_code: int | None
    error: str | None
    retry_after_s: float | None = None

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def next_state(
    event: WebhookEvent, result: AttemptResult, schedule_s: tuple[float, ...], now: float
) -> tuple[str, float | None]:
    """The event's state after this attempt, and when to try again (None: no more tries).

    schedule_s[i] is the wait before attempt i (attempt 0 is the first); Retry-After on
    429/503 is honoured when it asks for a longer wait.
    """
    if result.delivered:
        return DELIVERED, None
    if result.status_code == 410:
        return GONE, None
    following = event.attempts + 1
    if following >= len(schedule_s):
        return EXHAUSTED, None
    wait = schedule_s[following]
    if result.status_code in (429, 503) and result.retry_after_s is not None:
        wait = max(wait, min(result.retry_after_s, MAX_WEBHOOK_RETRY_AFTER_S))
    return PENDING, now + wait


# Asked when an attempt ends: should its thread take the next attempt in its receiver's line?
TakeNext = Callable[[], bool] | None


@dataclass(frozen=True)
class HeldPlace:
    """An attempt its receiver's place was handed to: claimed for the caller to make."""

    receiver: str
    webhook_id: str


@dataclass
class WebhookDelivery:
    """Sends webhook attempts and records each one."""

    store: JobStore
    clients: ClientStore
    settings: Settings
    counters: Counters
    on_place_freed: Callable[[], None]  # an attempt in a receiver's line became due: dispatch
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        self.policy = EgressPolicy.from_cidrs(list(self.settings.webhook_allowed_networks))
        # A dispatch makes up to a batch of attempts at once, often to one receiver.
        self.session = egress_session(
            self.policy, connections_per_host=self.settings.dispatch_batch_size
        )
        self.lines = ReceiverLines(
            self.store.redis,
            schedule_key=self.store.outbox.schedule.key,
            concurrency=self.settings.webhook_receiver_concurrency,
            lease_s=self.lease_s,
        )

    @property
    def lease_s(self) -> float:
        """How long one attempt may hold its event (and its receiver place): the connect and
        read timeouts, and a margin; past it, the event is due again."""
        return 2 * self.settings.webhook_timeout_s + 10

    def deliver(self, webhook_id: str, *, take_next: TakeNext = None) -> HeldPlace | None:
        """Make one attempt at a pending event, if it is still pending and its receiver has a
        place free; otherwise it waits in the receiver's line (no attempt made).

        If take_next (asked when the attempt ends) says so, the place then goes to the next
        attempt in that line, if any: it is returned, claimed for the caller, to be made with
        deliver_held.
        """
        return self._deliver(webhook_id, None, take_next)

    def deliver_held(self, place: HeldPlace, *, take_next: TakeNext = None) -> HeldPlace | None:
        """Make the attempt a place was handed to (as deliver, without waiting in line)."""
        return self._deliver(place.webhook_id, place.receiver, take_next)

    def _deliver(
        self, webhook_id: str, held_in: str | None, take_next: TakeNext
    ) -> HeldPlace | None:
        holding = held_in  # the receiver whose place this call holds, if any
        try:
            event = self.store.outbox.get_event(webhook_id)
            if event is None or event.state != PENDING:
                self.store.outbox.unschedule_settled_event(webhook_id)
                receiver = receiver_of(event.client_id, event.url) if event else held_in
                # It may hold a place or stand in its receiver's line: its turn passes on.
                return self._leave(receiver, webhook_id, take_next) if receiver else None
            started = self.clock()
            receiver = receiver_of(event.client_id, event.url)
            if holding is None:
                if self.lines.enter(receiver, webhook_id, started) is not None:
                    self.counters.add("webhook_attempts_waited")
                    return None
                holding = receiver
            client = self.clients.get(event.client_id)
            if client is None:  # the client record is gone: nobody can verify a signature
                result = AttemptResult(None, "client no longer exists; cannot sign")
                redelivery_at = self._record(event, result, started, 0, force_state=EXHAUSTED)
            else:
                headers = signature_headers(event, client.signing_secrets(started), started)
                began = time.monotonic()
                result = self._post(event, headers)
                duration_ms = int((time.monotonic() - began) * 1000)
                redelivery_at = self._record(event, result, started, duration_ms)
        except BaseException:
            if holding is not None:  # the place goes back now (if Redis failed: at lease end)
                with contextlib.suppress(Exception):
                    self._leave(holding, webhook_id, take_next=None)
            raise
        handed = self._leave(receiver, webhook_id, take_next)
        if redelivery_at is not None:  # only now: a dispatch taking it sooner met our place
            self.store.outbox.schedule.postpone(webhook_id, redelivery_at)
        return handed

    def _leave(self, receiver: str, webhook_id: str, take_next: TakeNext) -> HeldPlace | None:
        hand_over = take_next is not None and take_next()
        left = self.lines.leave(receiver, webhook_id, self.clock(), hand_over=hand_over)
        if left.made_due:
            self.on_place_freed()  # attempts in line were made due: dispatch them now
        if left.handed_over is None:
            return None
        self.counters.add("webhook_places_handed_over")
        return HeldPlace(receiver, left.handed_over)

    def _post(self, event: WebhookEvent, headers: dict[str, str]) -> AttemptResult:
        timeout_s = self.settings.webhook_timeout_s
        timed_out = AttemptResult(None, f"timed out after {timeout_s:g} s")
        # The whole attempt, not only each wait for bytes: a receiver sending its answer a byte
        # at a time would otherwise hold this thread (and, past the lease, others) for ever.
        with DEADLINES.within(timeout_s) as exchange:
            try:
                with self.session.post(
                    event.url,
                    data=event.body.encode(),
                    headers=headers,
                    timeout=(min(5.0, timeout_s), timeout_s),
                    allow_redirects=False,
                    # The status is what counts; a short body is read only to keep the connection.
                    stream=True,
                ) as response:
                    if exchange.cut_off:  # its head may be cut short: not an answer
                        return timed_out
                    code = response.status_code
                    retry_after = parse_retry_after_s(response.headers.get("Retry-After"))
                    keep_connection_after_answer(response)
            except RefusedDestination as exc:  # the address for operators, not in the record
                log.warning(
                    "webhook destination refused",
                    extra={"webhook_id": event.webhook_id, "host": exc.host,
                           "address": str(exc.address) if exc.address is not None else None},
                )  # fmt: skip
                return AttemptResult(None, f"refused destination: {exc}")
            except requests.RequestException as exc:
                if exchange.cut_off or isinstance(exc, requests.Timeout):
                    return timed_out
                return AttemptResult(None, f"could not connect: {type(exc).__name__}")
        if 200 <= code < 300:
            return AttemptResult(code, None)
        if 300 <= code < 400:
            return AttemptResult(code, f"HTTP {code}: redirects are not followed")
        return AttemptResult(code, f"HTTP {code}", retry_after)

    def _record(
        self,
        event: WebhookEvent,
        result: AttemptResult,
        at: float,
        duration_ms: int,
        *,
        force_state: str | None = None,
    ) -> float | None:
        """Record the attempt; the event's new state too, unless a redelivery reset it
        meanwhile: then when that is due (for the caller to schedule once it has left its
        receiver's place), else None."""
        state, next_at = next_state(event, result, self.settings.webhook_retry_schedule_s, at)
        if force_state is not None:
            state, next_at = force_state, None
        attempt = delivery_record(
            event,
            at=at,
            status_code=result.status_code,
            error=result.error,
            duration_ms=duration_ms,
            next_attempt_at=next_at,
        )
        kept, stored = self.store.outbox.record_attempt(
            event, event.after_attempt(state=state, next_attempt_at=next_at), attempt
        )
        self.counters.add("webhook_attempts")
        self.counters.add("webhook_delivered" if state == DELIVERED else "webhook_failed_attempts")
        if not kept:  # the attempt is in its deliveries; the event's state is not this attempt's
            log.info(
                "webhook event redelivered during an attempt"
                if stored is not None
                else "webhook event gone during an attempt",
                extra={"job_id": event.job_id, "webhook_id": event.webhook_id},
            )
            return (
                stored.next_attempt_at if stored is not None and stored.state == PENDING else None
            )
        if state == EXHAUSTED:
            self.counters.add("webhook_exhausted")
        log.info(
            "webhook attempt",
            extra={
                "job_id": event.job_id,
                "client_id": event.client_id,
                "webhook_id": event.webhook_id,
                "event_type": event.type,
                "attempt": event.attempts + 1,
                "status_code": result.status_code,
                "error": result.error,
                "state": state,
            },
        )
        return None
