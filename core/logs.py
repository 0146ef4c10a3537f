"""JSON-lines logging for every process (API, workers, beat, CLI)."""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter


def configure_logging(level: str = "INFO") -> None:
    """Send JSON lines to stderr: time, level, logger, message and any `extra` fields."""
    # The real stderr: Celery replaces sys.stderr in workers with a proxy into logging itself.
    handler = logging.StreamHandler(sys.__stderr__)
    handler.setFormatter(
        JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Lines that would repeat, several times a second, what our own logs and metrics say.
    chatty_loggers = ("urllib3", "celery.beat", "celery.worker.strategy", "celery.app.trace",
                      "celery.worker.request")  # fmt: skip
    for chatty in chatty_loggers:
        logging.getLogger(chatty).setLevel(max(root.level, logging.WARNING))
