"""Each broker gets the Celery options of its own transport, and none of the other's."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from kombu import Connection

from core.clients import ClientStore
from core.settings import Settings
from core.wakeups import WEBHOOKS_QUEUE
from service import create_app
from tests.support import rabbitmq
from tests.support.api import ApiClient
from tests.support.stack import start_stack
from tests.test_end_to_end import job_body, unique
from workers.celery_app import (
    AMQP_HEARTBEAT_S,
    REDIS_VISIBILITY_TIMEOUT_S,
    broker_options,
    create_celery_app,
)


@pytest.mark.parametrize(
    "url", ["redis://localhost:6379/0", "rediss://:pw@cache.example:6380/1", "REDIS://h/0"]
)
def test_a_redis_broker_gets_its_visibility_timeout_and_nothing_of_amqp(url: str) -> None:
    assert broker_options(url) == {
        "broker_transport_options": {"visibility_timeout": REDIS_VISIBILITY_TIMEOUT_S}
    }


@pytest.mark.parametrize(
    "url", ["amqp://guest:guest@localhost:5672//", "amqps://u:p@mq.example/prod", "pyamqp://h//"]
)
def test_an_amqp_broker_gets_publisher_confirms_and_heartbeats_and_no_redis_options(
    url: str,
) -> None:
    options = broker_options(url)
    assert options == {
        "broker_transport_options": {"confirm_publish": True},
        "broker_heartbeat": AMQP_HEARTBEAT_S,
    }
    assert "visibility_timeout" not in options["broker_transport_options"]


def test_an_unknown_scheme_is_refused_without_repeating_the_url() -> None:
    with pytest.raises(ValueError, match="'sqs'") as raised:
        broker_options("sqs://key:s3cret@queue.example/")
    assert "s3cret" not in str(raised.value)


def celery_conf_for(broker_url: str) -> dict[str, object]:
    """The settings a Celery app built for `broker_url` ends up with."""
    settings = dataclasses.replace(Settings(), celery_broker_url=broker_url)
    app = create_celery_app(settings)
    try:
        return {
            "transport_options": dict(app.conf.broker_transport_options),
            "heartbeat": app.conf.broker_heartbeat,
            "acks_late": app.conf.task_acks_late,
            "prefetch": app.conf.worker_prefetch_multiplier,
        }
    finally:
        app.close()


def test_the_celery_app_takes_the_options_of_its_broker() -> None:
    redis_conf = celery_conf_for("redis://localhost:6379/0")
    amqp_conf = celery_conf_for("amqp://guest:guest@localhost:5672//")
    assert redis_conf["transport_options"] == {"visibility_timeout": REDIS_VISIBILITY_TIMEOUT_S}
    assert amqp_conf["transport_options"] == {"confirm_publish": True}
    assert amqp_conf["heartbeat"] == AMQP_HEARTBEAT_S
    assert redis_conf["heartbeat"] != AMQP_HEARTBEAT_S  # Celery's default: Redis has none
    # What both share: a trigger held by a killed worker comes back.
    for conf in (redis_conf, amqp_conf):
        assert (conf["acks_late"], conf["prefetch"]) == (True, 1)


@pytest.fixture(scope="module")
def amqp_url() -> Iterator[str]:
    reason = rabbitmq.unreachable_reason()
    if reason is not None:
        pytest.skip(reason)
    with rabbitmq.private_vhost("inpaint-options") as url:
        yield url


@pytest.mark.integration
def test_rabbitmq_confirms_each_send(amqp_url: str) -> None:
    app = create_celery_app(dataclasses.replace(Settings(), celery_broker_url=amqp_url))
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=3)
            assert conn.connection.confirm_publish is True
        app.send_task("inpaint.nothing", queue=WEBHOOKS_QUEUE)
        with Connection(amqp_url) as conn:
            _, ready, _ = conn.default_channel.queue_declare(WEBHOOKS_QUEUE, passive=True)
        assert ready == 1  # confirmed: in the queue by the time send_task returned
    finally:
        app.close()


@pytest.mark.integration
def test_a_job_runs_through_rabbitmq_and_the_worker_heartbeats(
    amqp_url: str, tmp_path: Path
) -> None:
    with start_stack(tmp_path, env={"CELERY_BROKER_URL": amqp_url}) as stack:
        stack.wait_for_worker(stack.worker)
        app = create_app({"TESTING": True, "SETTINGS": stack.settings()})
        api = ApiClient(ClientStore(stack.redis()).create("rabbit"), app.test_client())
        job_id = api.post("/v1/jobs", json=job_body(stack, unique("via rabbitmq"))).get_json()["id"]
        assert api.wait_final(job_id)["status"] == "succeeded"
        vhost = unquote(urlsplit(amqp_url).path.lstrip("/"))
        timeouts = rabbitmq.rabbitmqctl(
            "list_connections", "-p", vhost, "--no-table-headers", "--quiet", "timeout"
        ).split()
        # The worker's consuming connection asked for our heartbeat (RabbitMQ's own is 60 s).
        assert str(AMQP_HEARTBEAT_S) in timeouts, timeouts
        assert "Connected to amqp://" in (stack.logs / f"{stack.worker.name}.log").read_text()
