"""Run the emulator: `python -m emulator --host H --port P`."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from types import FrameType

from emulator.app import create_app
from emulator.config import ConfigError, EmulatorConfig, config_from_env
from emulator.server import EmulatorServer


def build_config(argv: Sequence[str], environ: Mapping[str, str]) -> EmulatorConfig:
    """Combine defaults, EMULATOR_* environment variables and flags (flags win)."""
    parser = argparse.ArgumentParser(
        prog="python -m emulator", description="Local emulator of RunComfy's Model API."
    )
    parser.add_argument("--host", help="bind address (EMULATOR_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (EMULATOR_PORT, default 8100)")
    parser.add_argument("--token", help="the only bearer token accepted (EMULATOR_TOKEN)")
    parser.add_argument("--queue-s", type=float, help="seconds in_queue (EMULATOR_QUEUE_S)")
    parser.add_argument("--run-s", type=float, help="seconds in_progress (EMULATOR_RUN_S)")
    parser.add_argument(
        "--run-spread-s", type=float, help="each run lasts --run-s plus a random 0 to this"
    )
    parser.add_argument(
        "--output-ttl-s", type=float, help="seconds an output URL answers (default 7 days)"
    )
    parser.add_argument("--public-url", help="base of returned URLs (EMULATOR_PUBLIC_URL)")
    parser.add_argument(
        "--quiet", action="store_true", default=None, help="no request log (EMULATOR_QUIET)"
    )
    args = parser.parse_args(argv)
    try:
        config = config_from_env(environ)
        knob_changes = {
            knob: value
            for knob, value in (
                ("queue_s", args.queue_s),
                ("run_s", args.run_s),
                ("run_spread_s", args.run_spread_s),
                ("output_ttl_s", args.output_ttl_s),
            )
            if value is not None
        }
        faults = config.faults.merged(knob_changes)
    except (ConfigError, ValueError) as exc:
        parser.error(str(exc))
    overrides = {
        name: value
        for name, value in (
            ("host", args.host),
            ("port", args.port),
            ("token", args.token),
            ("public_url", args.public_url),
            ("quiet", args.quiet),
        )
        if value is not None
    }
    return dataclasses.replace(config, faults=faults, **overrides)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGINT or SIGTERM."""
    config = build_config(sys.argv[1:] if argv is None else argv, os.environ)
    # A line per request on stderr unless quiet (emulator.app logs them at INFO).
    logging.basicConfig(
        level=logging.WARNING if config.quiet else logging.INFO, format="%(message)s"
    )
    logging.getLogger("waitress").setLevel(logging.WARNING)  # not its "Serving on" line
    server = EmulatorServer(create_app(config), config.host, config.port)
    stop_requested = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    server.start()
    print(f"emulator listening on http://{config.host}:{server.port}", flush=True)
    while not stop_requested.wait(timeout=0.5):
        pass
    server.stop()
    print("emulator stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
