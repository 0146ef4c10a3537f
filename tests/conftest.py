"""Fixtures of the test suite; what they are built from lives in tests/support/.

The real stack (tests/support/stack.py over cli/stack.py) is started once per test session:
redis-server, the emulator, a Celery worker and beat, each a process with the commands
docker-compose.yml and deploy/ run, on free ports. Tests talk to the API through Flask's test
client (the same app gunicorn serves) and receive webhooks on a real receiver that verifies
signatures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from cli.listener import WebhookReceiver
from cli.stack import Stack
from core.clients import ClientStore
from core.media import media_store_from_url
from core.metrics import Counters
from core.store import JobStore, connect_redis
from core.uploads import UploadStore
from service import create_app
from tests.support.api import ApiClient
from tests.support.stack import start_stack
from workers.pipeline import JobPipeline
from workers.run_times import RunTimes
from workers.runcomfy import RunComfyClient
from workers.throttle import UpstreamThrottle


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = start_stack(tmp_path_factory.mktemp("stack"))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def redis_client(stack: Stack) -> Iterator[redis.Redis]:
    client = connect_redis(stack.redis_server.url)
    yield client
    client.close()


@pytest.fixture
def scratch(stack: Stack) -> Iterator[redis.Redis]:
    """A Redis database no worker looks at, empty for each test."""
    client = connect_redis(stack.redis_server.url.rsplit("/", 1)[0] + "/4")
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def make_app(stack: Stack) -> Iterator[Callable[..., Any]]:
    """An API app on the stack's Redis and broker (overrides: env-style settings); each app's
    Redis connections are closed at the end, not left to the garbage collector (whose
    ResourceWarning would fail whichever test it happened in)."""
    built: list[Any] = []

    def build(**overrides: str) -> Any:
        built.append(create_app({"TESTING": True, "SETTINGS": stack.settings(**overrides)}))
        return built[-1]

    yield build
    for each in built:
        each.extensions["inpaint_gateway"].waits.close()
        each.extensions["inpaint_gateway"].redis.close()


@pytest.fixture(scope="session")
def app(make_app: Callable[..., Any]) -> Any:
    return make_app()


@pytest.fixture
def api_client(app: Any, redis_client: redis.Redis) -> ApiClient:
    """A fresh client (own key, own secret) per test: tests never see each other's jobs."""
    return ApiClient(ClientStore(redis_client).create("test-client"), app.test_client())


@pytest.fixture
def receiver(api_client: ApiClient) -> Iterator[WebhookReceiver]:
    """A real webhook receiver verifying with the test client's secret."""
    rx = WebhookReceiver(secret=api_client.creds.webhook_secret).start()
    yield rx
    rx.stop()


@pytest.fixture
def pipeline(stack: Stack, redis_client: redis.Redis) -> Iterator[JobPipeline]:
    """A pipeline in this process, on the stack's Redis and emulator (a second 'worker')."""
    settings = stack.settings()
    runcomfy = RunComfyClient(
        base_url=settings.runcomfy_base_url,
        token=settings.runcomfy_api_token,
        model_id=settings.runcomfy_model_id,
        timeout_s=5,
    )
    store = JobStore(
        redis_client,
        retention_s=settings.job_retention_s,
        media_base_url=settings.public_base_url,
        media_url_ttl_s=settings.media_url_ttl_s,
    )
    built = JobPipeline(
        store=store,
        runcomfy=runcomfy,
        settings=settings,
        counters=Counters(redis_client),
        throttle=UpstreamThrottle(redis_client, rate_per_s=settings.runcomfy_max_rps),
        run_times=RunTimes(redis_client, job_schedule_key=store.job_schedule.key),
        on_events=lambda: None,
        on_slot_freed=lambda: None,
        uploads=UploadStore(
            redis_client,
            media_store_from_url(settings.media_store_url),
            retention_s=settings.upload_retention_s,
        ),
    )
    yield built
    runcomfy.close()
    assert built.outputs is not None  # built by the pipeline itself
    built.outputs.close()  # its kept-alive connections, not left to the garbage collector
    assert built.inputs is not None
    built.inputs.fetcher.close()
