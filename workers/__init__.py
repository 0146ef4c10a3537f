"""Celery workers: `celery -A workers worker` and `celery -A workers beat`.

The Celery app is made on first use of `workers.app` (reading settings then), so importing a
submodule — as the API does to send tasks — never reads the environment or connects.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "app":
        from core.settings import load_settings_or_exit
        from workers.celery_app import create_celery_app

        app = create_celery_app(load_settings_or_exit())
        globals()["app"] = app
        return app
    raise AttributeError(f"module 'workers' has no attribute {name!r}")
