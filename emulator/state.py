"""Everything one running emulator holds in memory, reachable from any view."""

from __future__ import annotations

from dataclasses import dataclass

from flask import current_app

from emulator.config import EmulatorConfig
from emulator.faults import FaultControl
from emulator.outputs import HeldInputs, OutputRenderer, OutputStore
from emulator.requests_state import RequestRegistry
from emulator.stats import CallStats

EXTENSION_KEY = "runcomfy_emulator"


@dataclass(frozen=True)
class EmulatorState:
    """The emulator's shared, lock-guarded parts."""

    config: EmulatorConfig
    faults: FaultControl
    registry: RequestRegistry
    stats: CallStats
    outputs: OutputStore
    held_inputs: HeldInputs
    renderer: OutputRenderer
    sample_image_png: bytes
    sample_mask_png: bytes


def current_state() -> EmulatorState:
    """Return the state of the app handling the current request."""
    state: EmulatorState = current_app.extensions[EXTENSION_KEY]
    return state
