"""The one namespace every Redis key of the gateway lives under."""

from __future__ import annotations

PREFIX = "igw:"
