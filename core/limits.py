"""What the operator allows each client: at most so many jobs at RunComfy at once, so many
unfinished, so many POSTs a minute, and a budget per day or month.

The limits live on the client record (core/clients.py) and are checked where their counts are
kept: max-in-flight by fair admission (core/admission.py), the others in the same atomic Redis
call that stores an accepted job (core/store.py), so concurrent POSTs never pass one.
"""

from __future__ import annotations

import calendar
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, datetime
from typing import Any, Literal

BudgetPeriod = Literal["day", "month"]
BUDGET_PERIODS: tuple[BudgetPeriod, ...] = ("day", "month")
RATE_WINDOW_S = 60.0
# A POST refused for too many unfinished jobs: when to try again. Nothing can say when a job
# will end, so this is a polite pace, not a promise.
TOO_MANY_JOBS_RETRY_S = 5
MICRO_USD = 1_000_000  # money is counted in whole micro-dollars in Redis: sums stay exact


def to_micro(usd: float) -> int:
    """USD as whole micro-dollars (rounded to the nearest)."""
    return round(usd * MICRO_USD)


def from_micro(micro: int | str | None) -> float:
    """Whole micro-dollars (as Redis answers them) as USD."""
    return int(micro or 0) / MICRO_USD


@dataclass(frozen=True)
class ClientLimits:
    """The limits set on one client; None: no limit of that kind."""

    max_in_flight: int | None = None
    max_queued: int | None = None
    rate_per_min: int | None = None
    budget_usd: float | None = None
    budget_period: BudgetPeriod | None = None

    def __post_init__(self) -> None:
        for name in ("max_in_flight", "max_queued", "rate_per_min"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a whole number of at least 1")
        if self.budget_usd is not None and not self.budget_usd >= 0:
            raise ValueError("budget_usd must be a number of at least 0")
        if (self.budget_usd is None) != (self.budget_period is None):
            raise ValueError("a budget needs both an amount and a period (day or month)")
        if self.budget_period is not None and self.budget_period not in BUDGET_PERIODS:
            raise ValueError("budget_period must be day or month")

    @property
    def is_empty(self) -> bool:
        """No limit set at all."""
        return self == NO_LIMITS

    def changed(self, **changes: Any) -> ClientLimits:
        """These limits with some set anew (a None leaves that one as it was)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        """Every limit, None where unset (the API's and the CLI's `limits` object)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ClientLimits:
        """Limits as stored; names a later release added are passed over."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in known})


NO_LIMITS = ClientLimits()


@dataclass(frozen=True)
class BudgetWindow:
    """One budget period: its id (a Redis key part, stored on the jobs that reserve in it), and
    how long its counts must be kept for a job accepted at its end to settle in it."""

    period: BudgetPeriod
    id: str
    ends_at: float


def budget_window(period: BudgetPeriod, now: float) -> BudgetWindow:
    """The day or month (UTC) that `now` falls in."""
    at = datetime.fromtimestamp(now, UTC)
    if period == "day":
        start = at.replace(hour=0, minute=0, second=0, microsecond=0)
        return BudgetWindow(period, f"day:{at:%Y-%m-%d}", start.timestamp() + 86400)
    days = calendar.monthrange(at.year, at.month)[1]
    start = at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return BudgetWindow(period, f"month:{at:%Y-%m}", start.timestamp() + days * 86400)


@dataclass(frozen=True)
class Refusal:
    """Why an accept was refused by a limit, and what the caller should know."""

    kind: Literal["too_many_jobs", "rate_limited", "budget_exceeded"]
    retry_after_s: int | None = None
    limit: int | None = None  # of the limit refused (max-queued or rate-per-min)
    budget: dict[str, Any] | None = None  # the budget object, for budget_exceeded


class LimitRefused(Exception):
    """An accept refused by one of the client's limits; nothing was stored."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.kind)
        self.refusal = refusal


def budget_object(
    limits: ClientLimits, window: BudgetWindow, spent_micro: int, reserved_micro: int
) -> dict[str, Any]:
    """The `budget` object of /v1/usage and of a budget_exceeded problem."""
    assert limits.budget_usd is not None
    limit_micro = to_micro(limits.budget_usd)
    return {
        "period": window.period,
        "period_id": window.id.partition(":")[2],
        "limit_usd": limits.budget_usd,
        "spent_usd": from_micro(spent_micro),
        "reserved_usd": from_micro(reserved_micro),
        "remaining_usd": from_micro(max(0, limit_micro - spent_micro - reserved_micro)),
    }
