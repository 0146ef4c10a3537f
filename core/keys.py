"""The one namespace every Redis key of the gateway lives under."""

from __future__ import annotations

PREFIX = "igw:"
COUNTERS_KEY = PREFIX + "counters"  # one hash of every counter (core/metrics.py)
