"""Each broker gets the Celery options of its own transport, and none of the other's."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from urllib.parse import unquote, urlsplit

import pytest
from kombu import Connection

from cli.stack import Stack
from core.clients import ClientStore
from core.settings import Settings
from core.wakeups import JOBS_QUEUE, WEBHOOKS_QUEUE
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


@pytest.fixture(scope="module")
def amqp_stack(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with start_stack(tmp_path_factory.mktemp("amqp"), env={"CELERY_BROKER_URL": amqp_url}) as stack:
        stack.wait_for_worker(stack.worker)
        yield stack


@pytest.fixture
def api(amqp_stack: Stack) -> ApiClient:
    app = create_app({"TESTING": True, "SETTINGS": amqp_stack.settings()})
    return ApiClient(ClientStore(amqp_stack.redis()).create("rabbit"), app.test_client())


def vhost_of(url: str) -> str:
    """The vhost a broker URL names."""
    return unquote(urlsplit(url).path.lstrip("/"))


@pytest.mark.integration
def test_a_job_runs_through_rabbitmq_and_the_worker_heartbeats(
    amqp_stack: Stack, api: ApiClient, amqp_url: str
) -> None:
    job_id = api.post("/v1/jobs", json=job_body(amqp_stack, unique("via rabbitmq"))).get_json()[
        "id"
    ]
    assert api.wait_final(job_id)["status"] == "succeeded"
    timeouts = rabbitmq.rabbitmqctl(
        "list_connections", "-p", vhost_of(amqp_url), "--no-table-headers", "--quiet", "timeout"
    ).split()
    # The worker's consuming connection asked for our heartbeat (RabbitMQ's own is 60 s).
    assert str(AMQP_HEARTBEAT_S) in timeouts, timeouts
    assert "Connected to amqp://" in (amqp_stack.logs / f"{amqp_stack.worker.name}.log").read_text()


@pytest.mark.integration
def test_a_wake_up_rabbitmq_refuses_is_logged_and_the_beat_still_starts_the_job(
    amqp_stack: Stack, api: ApiClient, amqp_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    vhost = vhost_of(amqp_url)
    # The jobs queue refuses every message (an operator's length limit, at its worst): with
    # publisher confirms the refusal reaches the sender; without, the trigger would just vanish.
    refuse_all = json.dumps({"max-length": 0, "overflow": "reject-publish"})
    rabbitmq.rabbitmqctl(
        "set_policy", "-p", vhost, "refuse-jobs", f"^{JOBS_QUEUE}$", refuse_all,
        "--apply-to", "queues",
    )  # fmt: skip
    try:
        with caplog.at_level(logging.WARNING, logger="core.wakeups"):
            resp = api.post("/v1/jobs", json=job_body(amqp_stack, unique("refused wake-up")))
        assert resp.status_code == 202  # the job is stored; its trigger is best effort
        assert "wake-up not sent" in [r.getMessage() for r in caplog.records]
        time.sleep(2)  # the beat's ticks are refused too: nothing reaches a worker
        assert api.get(f"/v1/jobs/{resp.get_json()['id']}").get_json()["status"] == "queued"
    finally:
        rabbitmq.rabbitmqctl("clear_policy", "-p", vhost, "refuse-jobs")
    assert api.wait_final(resp.get_json()["id"])["status"] == "succeeded"
