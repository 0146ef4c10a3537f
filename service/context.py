"""What a request handler may use: one object per app, built by create_app."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis
from celery import Celery
from flask import current_app
from prometheus_client import CollectorRegistry

from core.clients import ClientStore
from core.commands import JobCommands
from core.settings import Settings
from core.store import JobStore
from core.uploads import UploadStore

if TYPE_CHECKING:
    from service.auth import RecentKeys
    from service.waiting import JobEndWaits


@dataclass(frozen=True)
class ServiceContext:
    """The API's collaborators."""

    settings: Settings
    redis: redis.Redis
    store: JobStore
    clients: ClientStore
    commands: JobCommands
    celery: Celery
    metrics_registry: CollectorRegistry
    recent_keys: RecentKeys
    uploads: UploadStore
    waits: JobEndWaits  # GET /v1/jobs/{id}?wait=N


def ctx() -> ServiceContext:
    """The current app's ServiceContext."""
    return current_app.extensions["inpaint_gateway"]
