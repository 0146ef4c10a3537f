"""Fault knobs of the emulator and the seeded dice that decide when a fault fires."""

from __future__ import annotations

import dataclasses
import math
import random
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from emulator.directives import DirectiveError, status_word

OUTPUT_STYLES = ("images", "image", "alternate")
ERROR_SHAPES = ("string", "object", "list", "rotate")
# How the paid account stands: `out_of_balance` answers every submit 402 (400002), while
# requests already accepted go on (they are paid for); `token_refused` answers every call 401
# (400004).
ACCOUNT_STATES = ("ok", "out_of_balance", "token_refused")

# RunComfy keeps outputs about 7 days (documented for Serverless; the Model API says nothing).
OUTPUT_TTL_S = 7 * 24 * 3600.0

T = TypeVar("T")


class FaultKnobError(ValueError):
    """A knob name or value the emulator does not understand."""


@dataclass(frozen=True)
class Faults:
    """Global knobs; rates are probabilities per call (or per request for `rate_fail`)."""

    queue_s: float = 1.0
    run_s: float = 2.0
    # Each request's run lasts run_s plus a random extra of 0 to this: real run times vary, and
    # a poller that only learns one figure must not be judged on runs that never do.
    run_spread_s: float = 0.0
    queue_start_position: int = 3
    rate_5xx: float = 0.0
    rate_5xx_after_accept: float = 0.0
    rate_429: float = 0.0
    retry_after_s: int | None = 1
    rate_200_error: float = 0.0
    rate_slow: float = 0.0
    slow_s: float = 2.0
    rate_trickle: float = 0.0
    trickle_s: float = 5.0
    rate_fail: float = 0.0
    output_style: str = "images"
    error_shape: str = "rotate"
    request_ttl_s: float = 3600.0
    output_ttl_s: float = OUTPUT_TTL_S  # then /outputs/<name> answers 404, as a deleted object
    queued_word: str | None = None  # answered while queued, in place of in_queue
    running_word: str | None = None  # answered while running, in place of in_progress
    base_price_usd: float = 0.0125  # the list price per output image (GET /v1/models/{id})
    include_cost: bool = True  # False: /result never carries `cost`, even when asked
    account: str = "ok"
    seed: int | None = None

    def merged(self, changes: Mapping[str, Any]) -> Faults:
        """Return a copy with `changes` applied, after checking every name and value."""
        checked: dict[str, Any] = {}
        for name, value in changes.items():
            check = _KNOB_CHECKS.get(name)
            if check is None:
                raise FaultKnobError(f"unknown fault knob {name!r}")
            checked[name] = check(name, value)
        return dataclasses.replace(self, **checked)

    def as_json(self) -> dict[str, Any]:
        """Return the knobs as a JSON-ready dict."""
        return dataclasses.asdict(self)


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise FaultKnobError(f"{name} must be a number")
    return float(value)


def _probability(name: str, value: object) -> float:
    number = _number(name, value)
    if not 0 <= number <= 1:
        raise FaultKnobError(f"{name} must be between 0 and 1")
    return number


def _seconds(name: str, value: object) -> float:
    number = _number(name, value)
    if number < 0:
        raise FaultKnobError(f"{name} must be a number of seconds >= 0")
    return number


def _price(name: str, value: object) -> float:
    number = _number(name, value)
    if number < 0:
        raise FaultKnobError(f"{name} must be a price in USD >= 0")
    return number


def _bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise FaultKnobError(f"{name} must be true or false")
    return value


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise FaultKnobError(f"{name} must be an integer >= 1")
    return value


def _optional_whole_seconds(name: str, value: object) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise FaultKnobError(f"{name} must be null or an integer >= 0")
    return value


def _optional_int(name: str, value: object) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise FaultKnobError(f"{name} must be null or an integer")
    return value


def _optional_status_word(name: str, value: object) -> str | None:
    if value is None:
        return None
    try:
        return status_word(name, value)
    except DirectiveError as exc:
        raise FaultKnobError(str(exc)) from None


def _one_of(choices: Sequence[str]) -> Callable[[str, object], str]:
    def check(name: str, value: object) -> str:
        if value not in choices:
            raise FaultKnobError(f"{name} must be one of {', '.join(choices)}")
        return str(value)

    return check


_KNOB_CHECKS: dict[str, Callable[[str, object], Any]] = {
    "queue_s": _seconds,
    "run_s": _seconds,
    "run_spread_s": _seconds,
    "queue_start_position": _positive_int,
    "rate_5xx": _probability,
    "rate_5xx_after_accept": _probability,
    "rate_429": _probability,
    "retry_after_s": _optional_whole_seconds,
    "rate_200_error": _probability,
    "rate_slow": _probability,
    "slow_s": _seconds,
    "rate_trickle": _probability,
    "trickle_s": _seconds,
    "rate_fail": _probability,
    "output_style": _one_of(OUTPUT_STYLES),
    "error_shape": _one_of(ERROR_SHAPES),
    "request_ttl_s": _seconds,
    "output_ttl_s": _seconds,
    "queued_word": _optional_status_word,
    "running_word": _optional_status_word,
    "base_price_usd": _price,
    "include_cost": _bool,
    "account": _one_of(ACCOUNT_STATES),
    "seed": _optional_int,
}
assert set(_KNOB_CHECKS) == {f.name for f in dataclasses.fields(Faults)}


class FaultControl:
    """The live knobs of a running emulator and the seeded random source behind them."""

    def __init__(self, startup_faults: Faults) -> None:
        self._startup_faults = startup_faults
        self._lock = threading.Lock()
        self._faults = startup_faults
        self._rng = random.Random(startup_faults.seed)

    def current(self) -> Faults:
        """Return the knobs in force now."""
        with self._lock:
            return self._faults

    def update(self, changes: Mapping[str, Any]) -> Faults:
        """Merge `changes` into the knobs; a new `seed` re-seeds the dice."""
        with self._lock:
            self._faults = self._faults.merged(changes)
            if "seed" in changes:
                self._rng.seed(self._faults.seed)
            return self._faults

    def reset(self) -> Faults:
        """Go back to the knobs the emulator started with, and re-seed the dice."""
        with self._lock:
            self._faults = self._startup_faults
            self._rng.seed(self._faults.seed)
            return self._faults

    def roll(self, probability: float) -> bool:
        """Return True with the given probability."""
        if probability <= 0:
            return False
        with self._lock:
            return self._rng.random() < probability

    def extra_s(self, spread_s: float) -> float:
        """A random extra of 0 to `spread_s` seconds (0 when there is no spread)."""
        if spread_s <= 0:
            return 0.0
        with self._lock:
            return self._rng.uniform(0.0, spread_s)

    def pick(self, choices: Sequence[T]) -> T:
        """Return one of `choices` at random."""
        with self._lock:
            return self._rng.choice(choices)
