"""What a worker process holds: connections and the objects built on them, made once per process."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache

from celery import current_app

from core.clients import ClientStore
from core.media import media_store_from_url
from core.metrics import Counters
from core.settings import Settings
from core.store import JobStore, connect_redis
from core.uploads import UploadStore
from core.wakeups import Wakeups
from workers.delivery import WebhookDelivery
from workers.pipeline import JobPipeline
from workers.run_times import RunTimes
from workers.runcomfy import RunComfyClient
from workers.throttle import UpstreamThrottle


@dataclass(frozen=True)
class WorkerRuntime:
    """Per-process collaborators of the tasks."""

    settings: Settings
    store: JobStore
    counters: Counters
    wakeups: Wakeups
    pipeline: JobPipeline
    delivery: WebhookDelivery
    # A dispatch's job steps, all at once: the work is waiting on HTTP, not CPU. As many threads
    # as a batch has steps — with fewer, the last ones of a batch waited for a thread while
    # their lease ran, and with a slow RunComfy were claimed again by another worker.
    steps: ThreadPoolExecutor
    uploads: UploadStore


def runtime() -> WorkerRuntime:
    """This process's runtime (prefork children each build their own after the fork)."""
    return _runtime_for(os.getpid())


@cache
def _runtime_for(pid: int) -> WorkerRuntime:
    settings: Settings = current_app.conf.inpaint_settings
    client = connect_redis(settings.redis)
    store = JobStore(
        client,
        retention_s=settings.job_retention_s,
        media_base_url=settings.public_base_url,
        media_url_ttl_s=settings.media_url_ttl_s,
    )
    counters = Counters(client, buffered=True)
    wakeups = Wakeups(client, current_app)
    runcomfy = RunComfyClient(
        base_url=settings.runcomfy_base_url,
        token=settings.runcomfy_api_token,
        model_id=settings.runcomfy_model_id,
        timeout_s=settings.runcomfy_timeout_s,
        pool_size=settings.dispatch_batch_size,
    )
    throttle = UpstreamThrottle(client, rate_per_s=settings.runcomfy_max_rps)
    uploads = UploadStore(
        client,
        media_store_from_url(
            settings.media_store_url, s3_endpoint_url=settings.media_s3_endpoint_url
        ),
        retention_s=settings.upload_retention_s,
    )
    pipeline = JobPipeline(
        store=store,
        runcomfy=runcomfy,
        settings=settings,
        counters=counters,
        throttle=throttle,
        run_times=RunTimes(client, job_schedule_key=store.job_schedule.key),
        on_events=wakeups.webhooks,
        on_slot_freed=wakeups.jobs,
        uploads=uploads,
    )
    delivery = WebhookDelivery(
        store=store,
        clients=ClientStore(client),
        settings=settings,
        counters=counters,
        on_place_freed=wakeups.webhooks,
    )
    steps = ThreadPoolExecutor(settings.dispatch_batch_size, thread_name_prefix="step")
    return WorkerRuntime(settings, store, counters, wakeups, pipeline, delivery, steps, uploads)
