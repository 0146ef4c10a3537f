"""The job: its record, its status machine, and how it is shown to clients."""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from core.media_urls import MediaLinks


class Status(StrEnum):
    """Where a job is (docs/api.md, "The job resource")."""

    QUEUED = "queued"
    SUBMITTED = "submitted"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def is_final(self) -> bool:
        """True for the four statuses a job ends in."""
        return self in FINAL_STATUSES

    @property
    def rank(self) -> int:
        """Position in the forward-only order; all final statuses share the last rank."""
        return _RANK[self]


FINAL_STATUSES = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELLED, Status.EXPIRED})
_RANK = {Status.QUEUED: 0, Status.SUBMITTED: 1, Status.RUNNING: 2} | dict.fromkeys(
    FINAL_STATUSES, 3
)


class IllegalTransition(ValueError):
    """A status change that would move a job backwards or out of a final status."""


def can_move(current: Status, target: Status) -> bool:
    """Statuses only move forward; a final status never changes."""
    return not current.is_final and target.rank > current.rank


JOB_ID_PATTERN = re.compile(r"job_[0-9a-f]{24}")


def new_job_id() -> str:
    """A fresh, unguessable job id (matches JOB_ID_PATTERN)."""
    return "job_" + secrets.token_hex(12)


def iso(ts: float | None) -> str | None:
    """Epoch seconds as an ISO-8601 UTC string (milliseconds), or None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class JobError:
    """Why a job failed, in words a caller can act on."""

    code: str
    message: str


@dataclass(frozen=True)
class Upstream:
    """What RunComfy last told us about the job's request."""

    request_id: str
    status: str | None = None
    queue_position: int | None = None


@dataclass(frozen=True)
class StoredImage:
    """One output image kept in the media store: an upload of the job's client, its id the
    media id of `/v1/media/{id}`."""

    id: str
    sha256: str
    content_type: str
    bytes: int


@dataclass(frozen=True)
class Job:
    """The job record: the source of truth, stored whole in Redis."""

    id: str
    client_id: str
    input: dict[str, Any]
    created_at: float
    status: Status = Status.QUEUED
    updated_at: float = 0.0
    finished_at: float | None = None
    deadline_at: float = 0.0
    output_images: tuple[str, ...] | None = None  # RunComfy's URLs of the output
    # The output's copies in the media store, one per image; None: not stored (a record of the
    # previous release, or copies that kept failing past OUTPUT_COPY_DEADLINE_S).
    output_media: tuple[StoredImage, ...] | None = None
    error: JobError | None = None
    upstream: Upstream | None = None
    webhook_url: str | None = None
    webhook_events: tuple[str, ...] = ()
    metadata: dict[str, Any] | None = None
    cancel_requested: bool = False
    # Internal bookkeeping, never shown to clients.
    submit_started_at: float | None = None
    submitted_at: float | None = None  # when RunComfy accepted the submit (the timeline's step)
    submit_attempts: int = 0
    submit_unknown_outcomes: int = 0
    submits_unanswered: int = 0  # of those: no answer at all (timed out, cut off, worker died)
    cancel_sent: bool = False
    cancel_failures: int = 0  # cancels RunComfy did not take (5xx, 429, no answer)
    polls: int = 0
    running_since: float | None = None  # estimated start of the run (see workers/polling.py)
    last_seen_queued_at: float | None = None
    transient_errors: int = 0
    unknown_status_looks: int = 0  # looks in a row that saw a RunComfy status word not known
    account_waits: int = 0  # steps in a row RunComfy refused for the account (core/account.py)
    # What the job cost (USD), once known: RunComfy's own figure ("upstream") or the list price
    # times the images ("list_price"); set in the change that makes the job final.
    cost_usd: float | None = None
    cost_source: str | None = None
    # The budget reservation made at accept (the estimated cost) and the budget period it was
    # made in ("day:2026-12-07", "month:2026-12"); settled against the cost when the job ends.
    reserved_usd: float = 0.0
    reserved_in: str | None = None
    last_transient_error: str | None = None
    # Copies of a finished run's output that failed in a row, and since when (the job stays
    # running meanwhile, its result held back until they succeed or OUTPUT_COPY_DEADLINE_S).
    output_copy_failures: int = 0
    output_copy_failing_since: float | None = None
    notes: tuple[str, ...] = field(default=())

    # --- status machine -------------------------------------------------------------------

    def moved_to(self, target: Status, now: float, **changes: Any) -> Job:
        """This job in `target` status (forward only), with other fields changed too."""
        if not can_move(self.status, target):
            raise IllegalTransition(f"{self.id}: {self.status} -> {target} is not allowed")
        finished = now if target.is_final else None
        return replace(self, status=target, updated_at=now, finished_at=finished, **changes)

    def changed(self, now: float, **changes: Any) -> Job:
        """This job with fields changed, status untouched."""
        return replace(self, updated_at=now, **changes)

    def with_note(self, now: float, text: str) -> Job:
        """Record something worth knowing later (kept short: the last 20 notes)."""
        stamped = f"{iso(now)} {text}"
        return replace(self, updated_at=now, notes=(*self.notes, stamped)[-20:])

    def with_cost(self, usd: float, source: str) -> Job:
        """This job with its cost known (`source`: one of COST_SOURCES)."""
        assert source in COST_SOURCES, source
        return replace(self, cost_usd=round(usd, 6), cost_source=source)

    @property
    def request_id(self) -> str | None:
        """RunComfy's request id once the submit was accepted."""
        return self.upstream.request_id if self.upstream else None

    # --- storage --------------------------------------------------------------------------

    def to_json(self) -> str:
        """The stored form."""
        # Not dataclasses.asdict: it deep-copies every nested value, and this runs on every
        # change of every job (on the accept path, a large share of a POST's time).
        data = dict(self.__dict__)
        data["error"] = _plain(self.error)
        data["upstream"] = _plain(self.upstream)
        if self.output_media is not None:
            data["output_media"] = [m.__dict__ for m in self.output_media]
        for name in _LEFT_OUT_WHILE_ZERO:
            if not data[name]:
                del data[name]
        for name in _LEFT_OUT_WHILE_NONE:
            if data[name] is None:
                del data[name]
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Job:
        """Inverse of to_json."""
        data = json.loads(text)
        data["status"] = Status(data["status"])
        if data.get("error"):
            data["error"] = JobError(**data["error"])
        if data.get("upstream"):
            data["upstream"] = Upstream(**data["upstream"])
        if data.get("output_images") is not None:
            data["output_images"] = tuple(data["output_images"])
        if data.get("output_media") is not None:
            data["output_media"] = tuple(StoredImage(**m) for m in data["output_media"])
        data["webhook_events"] = tuple(data.get("webhook_events") or ())
        data["notes"] = tuple(data.get("notes") or ())
        try:
            return cls(**data)
        except TypeError:  # a field a newer release wrote (during a rolling update): skipped
            return cls(**{k: v for k, v in data.items() if k in _FIELD_NAMES})

    # --- what clients see -----------------------------------------------------------------

    def to_resource(self, links: MediaLinks) -> dict[str, Any]:
        """The job resource of the HTTP API and of webhook payloads; `links` signs the URLs of
        stored outputs (afresh for each answer and each event)."""
        return {
            "id": self.id,
            "status": self.status.value,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
            "finished_at": iso(self.finished_at),
            "input": self.input,
            "output": self._output(links),
            "error": _plain(self.error),
            "upstream": _plain(self.upstream),
            "webhook_url": self.webhook_url,
            "webhook_events": list(self.webhook_events),
            "metadata": self.metadata,
            "cancel_requested": self.cancel_requested,
            "cost": (
                {"usd": self.cost_usd, "source": self.cost_source}
                if self.cost_usd is not None
                else None
            ),
        }

    def _output(self, links: MediaLinks) -> dict[str, Any] | None:
        """The output: our signed URLs when stored, else RunComfy's own (also for a record of
        the previous release, which kept only those)."""
        if self.output_images is None:
            return None
        upstream = list(self.output_images)
        if self.output_media is None:
            return {"images": upstream, "upstream_images": upstream, "stored": False, "media": []}
        return {
            "images": [links.url(m.id) for m in self.output_media],
            "upstream_images": upstream,
            "stored": True,
            "media": [dict(m.__dict__) for m in self.output_media],
        }


_FIELD_NAMES = frozenset(f.name for f in fields(Job))
# Fields added since the previous release, written only when set: a replica still running that
# release (during a rolling update) reads the record as long as they are 0 — nearly always.
_LEFT_OUT_WHILE_ZERO = (
    "submits_unanswered",
    "cancel_failures",
    "unknown_status_looks",
    "account_waits",
    "reserved_usd",
    "output_copy_failures",
)
_LEFT_OUT_WHILE_NONE = (
    "submitted_at",
    "cost_usd",
    "cost_source",
    "reserved_in",
    "output_media",
    "output_copy_failing_since",
)
COST_SOURCES = ("upstream", "list_price")


def _plain(value: JobError | Upstream | None) -> dict[str, Any] | None:
    """A flat dataclass as a new dict (None stays None)."""
    return None if value is None else dict(value.__dict__)


def new_job(
    *,
    client_id: str,
    input: dict[str, Any],
    webhook_url: str | None,
    webhook_events: tuple[str, ...],
    metadata: dict[str, Any] | None,
    deadline_s: float,
    now: float | None = None,
) -> Job:
    """A freshly accepted job, status queued."""
    created = time.time() if now is None else now
    return Job(
        id=new_job_id(),
        client_id=client_id,
        input=input,
        created_at=created,
        updated_at=created,
        deadline_at=created + deadline_s,
        webhook_url=webhook_url,
        webhook_events=webhook_events,
        metadata=metadata,
    )
