"""A local emulator of RunComfy's Model API for offline runs and tests."""

from __future__ import annotations

from emulator.app import create_app
from emulator.config import EmulatorConfig
from emulator.faults import Faults

__all__ = ["EmulatorConfig", "Faults", "create_app"]
