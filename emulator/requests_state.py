"""The in-memory request registry and each request's timeline, computed on every read."""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

ROTATING_ERROR_SHAPES = ("string", "object", "list")
PURGE_INTERVAL_S = 60.0


class Phase(StrEnum):
    """Where a request is on its timeline."""

    IN_QUEUE = "in_queue"
    IN_PROGRESS = "in_progress"
    DONE = "done"
    CANCELLED = "cancelled"


class CancelOutcome(StrEnum):
    """The `outcome` field of a cancel answer."""

    CANCELLED = "cancelled"
    NOT_CANCELLABLE = "not_cancellable"


@dataclass(frozen=True)
class Failure:
    """Why a request failed, and the shape its `error` takes in /result."""

    error_type: str
    message: str
    shape: str

    def as_error_field(self) -> object:
        """Return the `error` value of the result body in this failure's shape."""
        if self.shape == "string":
            return f"generation failed: {self.message}"
        detail = {"type": self.error_type, "message": self.message}
        return [detail] if self.shape == "list" else detail


@dataclass(frozen=True)
class RequestPlan:
    """Everything decided about a request at submit time."""

    model_input: dict[str, Any]
    queue_s: float
    run_s: float
    queue_start_position: int
    output_style: str
    error_shape: str | None = None
    planned_failure: Failure | None = None
    bad_status: bool = False
    no_status: bool = False
    queued_word: str | None = None
    running_word: str | None = None
    no_output: bool = False
    poll_500_count: int = 0
    poll_429_count: int = 0
    cancel_unavailable: bool = False
    output_host: str | None = None  # the output URL names this host:port, not the emulator
    output_gone: bool = False  # the output URL answers 404 (deleted at once)
    price_usd: float = 0.0  # the list price per output image when the request was accepted
    # Per image field, what arrived: the URL, or a data URI's type, size and SHA-256 (no bytes).
    inputs_received: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class EmulatedRequest:
    """One submitted request; mutable fields change only under the registry lock."""

    request_id: str
    plan: RequestPlan
    created_at: datetime
    created_monotonic: float
    cancelled_at: datetime | None = None
    output_name: str | None = None
    failure: Failure | None = None
    settled: bool = False
    polls_500_left: int = 0
    polls_429_left: int = 0
    settle_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def finished_at(self) -> datetime:
        """When the run ends (or ended) by the plan."""
        return self.created_at + timedelta(seconds=self.plan.queue_s + self.plan.run_s)

    def phase(self, now_monotonic: float) -> Phase:
        """Return the phase at `now_monotonic`."""
        if self.cancelled_at is not None:
            return Phase.CANCELLED
        elapsed_s = now_monotonic - self.created_monotonic
        if elapsed_s < self.plan.queue_s:
            return Phase.IN_QUEUE
        if elapsed_s < self.plan.queue_s + self.plan.run_s:
            return Phase.IN_PROGRESS
        return Phase.DONE

    def status_value(self, phase: Phase) -> str:
        """Return the `status` that /status shows in `phase` (failures show as completed)."""
        if self.plan.bad_status and phase in (Phase.IN_PROGRESS, Phase.DONE):
            return "exploded"
        return "completed" if phase is Phase.DONE else self._going_word(phase)

    def result_status(self, phase: Phase) -> str:
        """Return the `status` that /result shows in `phase` (`completed` = not yet settled)."""
        if self.plan.bad_status and phase in (Phase.IN_PROGRESS, Phase.DONE):
            return "exploded"
        if phase is not Phase.DONE:
            return self._going_word(phase)
        if not self.settled:
            return "completed"
        return "failed" if self.failure is not None else "succeeded"

    def cost_usd(self, result_status: str) -> float | None:
        """What the request is billed once over (None before its end): the price of each output
        image of a success; nothing for a failure (no output) or a cancel while queued."""
        if result_status == "succeeded":
            return round(self.plan.price_usd * (1 if self.output_name is not None else 0), 6)
        if result_status in ("failed", "cancelled"):
            return 0.0
        return None

    def _going_word(self, phase: Phase) -> str:
        """The word for a phase before the end: the plan's own word for it, if it has one."""
        if phase is Phase.IN_QUEUE and self.plan.queued_word:
            return self.plan.queued_word
        if phase is Phase.IN_PROGRESS and self.plan.running_word:
            return self.plan.running_word
        return str(phase)

    def queue_position(self, now_monotonic: float) -> int:
        """Return a position that falls from the start position to 1 over the queue time."""
        if self.plan.queue_s <= 0:
            return 1
        remaining_share = 1 - (now_monotonic - self.created_monotonic) / self.plan.queue_s
        return max(
            1,
            min(
                self.plan.queue_start_position,
                math.ceil(remaining_share * self.plan.queue_start_position),
            ),
        )


class RequestRegistry:
    """All requests of this emulator run, guarded by one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[str, EmulatedRequest] = {}
        self._failures_counted = 0
        self._alternations_counted = 0
        self._last_purge_monotonic = time.monotonic()

    def next_output_style(self, configured_style: str) -> str:
        """Return the output style for a new request; `alternate` flips images, image."""
        if configured_style != "alternate":
            return configured_style
        with self._lock:
            self._alternations_counted += 1
            return "images" if self._alternations_counted % 2 else "image"

    def next_error_shape(self, configured_shape: str) -> str:
        """Return the shape for a new failure; `rotate` cycles string, object, list."""
        if configured_shape != "rotate":
            return configured_shape
        with self._lock:
            shape = ROTATING_ERROR_SHAPES[self._failures_counted % len(ROTATING_ERROR_SHAPES)]
            self._failures_counted += 1
            return shape

    def create(self, plan: RequestPlan, request_ttl_s: float) -> EmulatedRequest:
        """Register a new request that starts its queue time now."""
        created = EmulatedRequest(
            request_id=str(uuid.uuid4()),
            plan=plan,
            created_at=datetime.now(UTC),
            created_monotonic=time.monotonic(),
            polls_500_left=plan.poll_500_count,
            polls_429_left=plan.poll_429_count,
        )
        with self._lock:
            self._purge_expired(created.created_monotonic, request_ttl_s)
            self._requests[created.request_id] = created
        return created

    def find(self, request_id: str, request_ttl_s: float) -> EmulatedRequest | None:
        """Return the request unless it is unknown or older than the TTL."""
        now = time.monotonic()
        with self._lock:
            found = self._requests.get(request_id)
            if found is None:
                return None
            if now - found.created_monotonic > request_ttl_s:
                del self._requests[request_id]
                return None
            return found

    def take_poll_fault(self, emulated: EmulatedRequest) -> int | None:
        """Consume one of the request's `poll-429`, then `poll-500`, answers: its HTTP status,
        or None when none are left."""
        with self._lock:
            if emulated.polls_429_left > 0:
                emulated.polls_429_left -= 1
                return 429
            if emulated.polls_500_left > 0:
                emulated.polls_500_left -= 1
                return 500
            return None

    def cancel(self, emulated: EmulatedRequest) -> CancelOutcome:
        """Cancel the request if it is still queued."""
        now = time.monotonic()
        with self._lock:
            phase = emulated.phase(now)
            if phase is Phase.IN_QUEUE:
                emulated.cancelled_at = datetime.now(UTC)
                return CancelOutcome.CANCELLED
            if phase is Phase.CANCELLED:
                return CancelOutcome.CANCELLED
            return CancelOutcome.NOT_CANCELLABLE

    def settle(
        self, emulated: EmulatedRequest, *, output_name: str | None, failure: Failure | None
    ) -> None:
        """Record the final outcome of a finished request (first outcome wins)."""
        with self._lock:
            if not emulated.settled:
                emulated.settled = True
                emulated.output_name = output_name
                emulated.failure = failure

    def count_by_state(self, request_ttl_s: float) -> dict[str, int]:
        """Count live requests by what /result would say (`completed` = finished, unread)."""
        now = time.monotonic()
        counts: Counter[str] = Counter()
        with self._lock:
            self._purge_expired(now, request_ttl_s, force=True)
            for emulated in self._requests.values():
                counts[emulated.result_status(emulated.phase(now))] += 1
        return dict(counts)

    def _purge_expired(self, now: float, request_ttl_s: float, *, force: bool = False) -> None:
        if not force and now - self._last_purge_monotonic < PURGE_INTERVAL_S:
            return
        self._last_purge_monotonic = now
        expired = [
            request_id
            for request_id, emulated in self._requests.items()
            if now - emulated.created_monotonic > request_ttl_s
        ]
        for request_id in expired:
            del self._requests[request_id]
