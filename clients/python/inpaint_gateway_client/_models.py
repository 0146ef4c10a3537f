"""What the gateway answers, as small frozen dataclasses built from its JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled", "expired"})


@dataclass(frozen=True)
class Media:
    """One output image kept in the gateway's media store."""

    id: str
    sha256: str
    content_type: str
    bytes: int


@dataclass(frozen=True)
class Job:
    """A job resource as the gateway answered it (`raw` holds the whole JSON)."""

    id: str
    status: str
    created_at: str
    updated_at: str | None
    finished_at: str | None
    input: dict[str, Any]
    output: dict[str, Any] | None
    error: dict[str, Any] | None
    upstream: dict[str, Any] | None
    webhook_url: str | None
    metadata: dict[str, Any] | None
    cancel_requested: bool
    cost: dict[str, Any] | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Job:
        """A Job from the gateway's job resource."""
        return cls(
            id=body["id"],
            status=body["status"],
            created_at=body.get("created_at", ""),
            updated_at=body.get("updated_at"),
            finished_at=body.get("finished_at"),
            input=body.get("input") or {},
            output=body.get("output"),
            error=body.get("error"),
            upstream=body.get("upstream"),
            webhook_url=body.get("webhook_url"),
            metadata=body.get("metadata"),
            cancel_requested=bool(body.get("cancel_requested")),
            cost=body.get("cost"),
            raw=body,
        )

    @property
    def is_final(self) -> bool:
        """True once the job has ended: succeeded, failed, cancelled or expired."""
        return self.status in FINAL_STATUSES

    @property
    def images(self) -> list[str]:
        """The output images' URLs (signed gateway URLs when stored); empty until succeeded."""
        return list((self.output or {}).get("images") or [])

    @property
    def media(self) -> list[Media]:
        """The stored output images' ids, digests and types, in the order of `images`."""
        return [
            Media(m["id"], m["sha256"], m["content_type"], m["bytes"])
            for m in (self.output or {}).get("media") or []
        ]

    @property
    def queue_position(self) -> int | None:
        """The job's place in RunComfy's queue while it waits there, else None."""
        position = (self.upstream or {}).get("queue_position")
        return position if isinstance(position, int) else None


@dataclass(frozen=True)
class Upload:
    """An image uploaded to the gateway; send `ref` as image or mask."""

    id: str
    ref: str
    sha256: str
    content_type: str
    width: int
    height: int
    bytes: int
    expires_at: str

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Upload:
        """An Upload from POST /v1/uploads' answer."""
        return cls(
            id=body["id"],
            ref=body["ref"],
            sha256=body["sha256"],
            content_type=body["content_type"],
            width=body["width"],
            height=body["height"],
            bytes=body["bytes"],
            expires_at=body["expires_at"],
        )


@dataclass(frozen=True)
class Usage:
    """A client's jobs by final status and spend per UTC day, with its limits and budget."""

    client_id: str
    from_: str
    to: str
    days: list[dict[str, Any]]
    total: dict[str, Any]
    limits: dict[str, Any]
    budget: dict[str, Any] | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Usage:
        """A Usage from GET /v1/usage's answer."""
        return cls(
            client_id=body["client_id"],
            from_=body["from"],
            to=body["to"],
            days=body.get("days") or [],
            total=body.get("total") or {},
            limits=body.get("limits") or {},
            budget=body.get("budget"),
            raw=body,
        )

    @property
    def cost_usd(self) -> float:
        """What the span cost, in USD."""
        return float(self.total.get("cost_usd") or 0)


@dataclass(frozen=True)
class Event:
    """A verified webhook delivery: its type, when it was sent, and the job it is about."""

    type: str
    timestamp: str
    job: Job
    webhook_id: str
