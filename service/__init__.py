"""The HTTP API: `gunicorn "service:create_app()"` (dev: `flask --app service run`)."""

from __future__ import annotations

import functools
from typing import Any

from flask import Flask
from prometheus_client import CollectorRegistry

from core.clients import ClientStore
from core.commands import JobCommands
from core.http.egress import EgressPolicy
from core.logs import configure_logging
from core.media import media_store_from_url
from core.metrics import Counters, GatewayCollector
from core.pricing import ListPrice
from core.settings import Settings, load_settings_or_exit
from core.store import JobStore, connect_redis
from core.uploads import UploadStore
from core.wakeups import DISPATCH_JOBS_TASK, Wakeups
from service.auth import RecentKeys
from service.console import init_console
from service.context import ServiceContext
from service.docs import SWAGGER_UI_ASSETS_PATH
from service.problems import ProblemApi
from service.waiting import JobEndWaits
from workers.runcomfy import RunComfyClient

MAX_BODY_BYTES = 64 * 1024
PRICE_FETCH_TIMEOUT_S = 3.0  # on the accept path, once per ten minutes at most


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    """The API app. `test_config` may carry "SETTINGS" (a Settings) and Flask options."""
    app = Flask(__name__)
    app.config.update(
        MAX_CONTENT_LENGTH=MAX_BODY_BYTES,
        API_TITLE="inpaint-gateway",
        API_VERSION="v1",
        OPENAPI_VERSION="3.1.0",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH="/docs",
        OPENAPI_SWAGGER_UI_URL=SWAGGER_UI_ASSETS_PATH,  # served by service/docs.py
        # Swagger UI would show a badge image from swagger.io's online validator: a request to
        # the internet on every visit, from a page that must work without it.
        OPENAPI_SWAGGER_UI_CONFIG={"validatorUrl": None},
    )
    app.json.sort_keys = False  # type: ignore[attr-defined]  # resources read in contract order
    if test_config:
        app.config.update(test_config)
    settings: Settings = app.config.get("SETTINGS") or load_settings_or_exit()
    if not app.testing:
        configure_logging(settings.log_level)

    app.extensions["inpaint_gateway"] = service_context(settings)
    app.extensions["celery"] = app.extensions["inpaint_gateway"].celery

    from service import docs, health, jobs, media, uploads, usage

    api = ProblemApi(
        app,
        spec_kwargs={"info": {"description": "Inpainting jobs on RunComfy, with signed webhooks."}},
    )
    api.spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    api.register_blueprint(jobs.blp)
    api.register_blueprint(usage.blp)
    api.register_blueprint(uploads.blp)
    api.register_blueprint(media.blp)
    app.register_blueprint(health.bp)
    app.register_blueprint(docs.bp)
    init_console(app)
    return app


def service_context(settings: Settings) -> ServiceContext:
    """The API's collaborators, built once per app from its settings."""
    from workers.celery_app import create_celery_app  # the app sends tasks; it never runs them

    client = connect_redis(settings.redis, socket_timeout_s=5)
    store = JobStore(
        client,
        retention_s=settings.job_retention_s,
        media_base_url=settings.public_base_url,
        media_url_ttl_s=settings.media_url_ttl_s,
        replica_wait_ms=settings.redis_replica_wait_ms,
    )
    counters = Counters(client)
    celery = create_celery_app(settings)
    # A budget's reservation needs the list price: cached in Redis for every replica; this
    # client fetches it only when the cache is stale and no one else is fetching.
    list_price = ListPrice(
        client,
        fetch=RunComfyClient(
            base_url=settings.runcomfy_base_url,
            token=settings.runcomfy_api_token,
            model_id=settings.runcomfy_model_id,
            timeout_s=PRICE_FETCH_TIMEOUT_S,
        ).list_price_usd,
    )
    registry = CollectorRegistry(auto_describe=True)
    registry.register(GatewayCollector(store, counters))
    uploads = UploadStore(
        client,
        media_store_from_url(
            settings.media_store_url, s3_endpoint_url=settings.media_s3_endpoint_url
        ),
        retention_s=settings.upload_retention_s,
    )
    return ServiceContext(
        settings=settings,
        redis=client,
        store=store,
        clients=ClientStore(client),
        commands=JobCommands(
            store=store,
            settings=settings,
            counters=counters,
            wakeups=Wakeups(client, celery),
            egress=EgressPolicy.from_cidrs(list(settings.webhook_allowed_networks)),
            list_price_usd=functools.partial(list_price.usd_per_image, wait_s=2.0),
            uploads=uploads,
        ),
        celery=celery,
        metrics_registry=registry,
        recent_keys=RecentKeys(),
        uploads=uploads,
        waits=JobEndWaits(client, slots=settings.api_wait_slots),
    )


def warm_up(app: Flask) -> None:
    """Before a process takes requests: pay what the first wake-up would pay inside one.

    Celery builds its app, transport and broker connection lazily on the first send (~30 ms
    here, holding the GIL: every request in flight in the process waits). Sending one wake-up
    now does it all, and only nudges the dispatcher; best effort, as every wake-up is.
    """
    app.extensions["celery"].finalize()
    ctx: ServiceContext = app.extensions["inpaint_gateway"]
    ctx.commands.wakeups.send(DISPATCH_JOBS_TASK)
