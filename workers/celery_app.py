"""The Celery app: production settings in one place."""

from __future__ import annotations

import warnings
from typing import Any
from urllib.parse import urlsplit

from celery import Celery
from celery.exceptions import CPendingDeprecationWarning
from celery.signals import celeryd_after_setup, setup_logging
from kombu import Exchange, Queue

from core.logs import configure_logging
from core.settings import Settings, load_settings
from core.wakeups import (
    DISPATCH_JOBS_TASK,
    DISPATCH_WEBHOOKS_TASK,
    JOBS_QUEUE,
    REMOVE_EXPIRED_UPLOADS_TASK,
    WEBHOOKS_QUEUE,
)

# Expired uploads' bytes wait at most this long to be removed; their records are gone at once.
REMOVE_EXPIRED_UPLOADS_EVERY_S = 600.0

REDIS_BROKER_SCHEMES = frozenset({"redis", "rediss", "sentinel"})
AMQP_BROKER_SCHEMES = frozenset({"amqp", "amqps", "pyamqp"})
# Redis has no consumer acks: a message taken and not acked within this long is handed out again.
# Longer than any dispatch runs (its steps are leased for far less), so none runs twice at once.
REDIS_VISIBILITY_TIMEOUT_S = 600
# RabbitMQ notices a dead worker's connection (and requeues what it held) within about twice
# this; the worker likewise notices a broker gone silent. Celery's 120 s default is slow for that.
AMQP_HEARTBEAT_S = 30


@celeryd_after_setup.connect(weak=False)
def _quiet_the_cancel_default_warning(**_: object) -> None:
    """Celery warns on every broker connection loss that cancelling the tasks it holds will
    become the default in 6.0; ours is set, to False, on purpose. (After the worker's setup:
    its logging setup puts an 'always' filter for these warnings in front of any made before.)"""
    warnings.filterwarnings(
        "ignore", message=r"\s*In Celery 5.1 we introduced", category=CPendingDeprecationWarning
    )


def create_celery_app(settings: Settings | None = None) -> Celery:
    """A Celery app for `settings` (read from the environment if not given)."""
    settings = settings or load_settings()
    app = Celery("inpaint_gateway", broker=settings.celery_broker_url, include=["workers.tasks"])
    tick = settings.dispatch_interval_s
    transport = broker_options(settings.celery_broker_url)
    # A sentinel:// broker is a Redis one (its options above), told which master to ask for.
    sentinel = sentinel_transport_options(settings)
    if sentinel:
        transport["broker_transport_options"] = {
            **transport["broker_transport_options"],
            **sentinel,
        }
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        result_backend=None,
        # Messages are only triggers (the schedules in Redis are the truth), yet we still ack late
        # so a trigger held by a killed worker comes back rather than vanishing.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_queues=[
            Queue(name, Exchange(name, type="direct"), routing_key=name)
            for name in (JOBS_QUEUE, WEBHOOKS_QUEUE)
        ],
        task_default_queue=JOBS_QUEUE,
        task_routes={
            DISPATCH_JOBS_TASK: {"queue": JOBS_QUEUE, "routing_key": JOBS_QUEUE},
            DISPATCH_WEBHOOKS_TASK: {"queue": WEBHOOKS_QUEUE, "routing_key": WEBHOOKS_QUEUE},
            REMOVE_EXPIRED_UPLOADS_TASK: {"queue": JOBS_QUEUE, "routing_key": JOBS_QUEUE},
        },
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        **transport,
        # A dispatch whose broker connection drops runs to its end (its steps stored), rather than
        # being terminated mid-call: a submit cut off that way is "outcome unknown" and is sent
        # again — a second paid run. Its trigger then comes back from the broker: harmless.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        beat_schedule={
            "dispatch-jobs": {
                "task": DISPATCH_JOBS_TASK,
                "schedule": tick,
                "options": {"queue": JOBS_QUEUE, "expires": max(2 * tick, 1.0)},
            },
            "dispatch-webhooks": {
                "task": DISPATCH_WEBHOOKS_TASK,
                "schedule": tick,
                "options": {"queue": WEBHOOKS_QUEUE, "expires": max(2 * tick, 1.0)},
            },
            "remove-expired-uploads": {
                "task": REMOVE_EXPIRED_UPLOADS_TASK,
                "schedule": REMOVE_EXPIRED_UPLOADS_EVERY_S,
                "options": {"queue": JOBS_QUEUE, "expires": REMOVE_EXPIRED_UPLOADS_EVERY_S},
            },
        },
        beat_max_loop_interval=max(tick / 2, 0.05),
    )
    app.conf.inpaint_settings = settings
    setup_logging.connect(
        _json_logging_for(settings), weak=False, dispatch_uid="inpaint-gateway-logging"
    )
    return app


def broker_options(broker_url: str) -> dict[str, Any]:
    """The Celery settings that depend on the broker's transport, chosen by its URL's scheme."""
    scheme = urlsplit(broker_url).scheme.lower()
    if scheme in REDIS_BROKER_SCHEMES:
        return {"broker_transport_options": {"visibility_timeout": REDIS_VISIBILITY_TIMEOUT_S}}
    if scheme in AMQP_BROKER_SCHEMES:
        return {
            # A send returns once RabbitMQ has the message, not when it left our socket: a
            # wake-up the broker lost in a restart is then an error we log, not a silent gap.
            "broker_transport_options": {"confirm_publish": True},
            "broker_heartbeat": AMQP_HEARTBEAT_S,
        }
    # Only the scheme: the URL may carry the broker's password.
    raise ValueError(f"no broker transport known for the scheme {scheme!r}")


def sentinel_transport_options(settings: Settings) -> dict[str, object]:
    """kombu's sentinel transport options for a `sentinel://` broker: the master it asks the
    sentinels for, and the sentinels' own password (the URL's is the master's)."""
    sentinel = settings.redis_sentinel
    if sentinel is None or not settings.celery_broker_url.startswith("sentinel://"):
        return {}
    options: dict[str, object] = {"master_name": sentinel.master}
    if sentinel.password:
        options["sentinel_kwargs"] = {"password": sentinel.password}
    return options


def _json_logging_for(settings: Settings):  # type: ignore[no-untyped-def]
    """Handle Celery's setup_logging signal: our JSON lines instead of Celery's own format."""

    def configure(**_: object) -> None:
        configure_logging(settings.log_level)

    return configure
