"""Emulator settings: defaults, then environment, then command-line flags."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from emulator.faults import FaultKnobError, Faults

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8100


class ConfigError(ValueError):
    """A setting from the environment or the command line is unusable."""


@dataclass(frozen=True)
class EmulatorConfig:
    """How one emulator process runs; `faults` are the knobs it starts (and resets) with."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    token: str | None = None
    public_url: str | None = None
    quiet: bool = False
    faults: Faults = field(default_factory=Faults)


def faults_from_env(environ: Mapping[str, str]) -> Faults:
    """Build startup knobs from EMULATOR_FAULTS (JSON), EMULATOR_QUEUE_S and EMULATOR_RUN_S."""
    changes: dict[str, object] = {}
    raw_faults = environ.get("EMULATOR_FAULTS", "").strip()
    if raw_faults:
        try:
            parsed = json.loads(raw_faults)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"EMULATOR_FAULTS is not valid JSON: {exc}") from exc
        if not isinstance(parsed, dict):
            raise ConfigError("EMULATOR_FAULTS must be a JSON object")
        changes.update(parsed)
    for env_name, knob in (("EMULATOR_QUEUE_S", "queue_s"), ("EMULATOR_RUN_S", "run_s")):
        if environ.get(env_name):
            changes[knob] = _float(env_name, environ[env_name])
    try:
        return Faults().merged(changes)
    except FaultKnobError as exc:
        raise ConfigError(str(exc)) from exc


def config_from_env(environ: Mapping[str, str] | None = None) -> EmulatorConfig:
    """Build a config from EMULATOR_* environment variables."""
    env = os.environ if environ is None else environ
    port_text = env.get("EMULATOR_PORT", "")
    return EmulatorConfig(
        host=env.get("EMULATOR_HOST") or DEFAULT_HOST,
        port=_int("EMULATOR_PORT", port_text) if port_text else DEFAULT_PORT,
        token=env.get("EMULATOR_TOKEN") or None,
        public_url=env.get("EMULATOR_PUBLIC_URL") or None,
        quiet=env.get("EMULATOR_QUIET", "").lower() in ("1", "true", "yes"),
        faults=faults_from_env(env),
    )


def _float(name: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {text!r}") from None


def _int(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {text!r}") from None
