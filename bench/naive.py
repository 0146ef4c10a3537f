"""THE THING BEING COMPARED AGAINST — a naive Celery design, NOT the gateway.

This is the baseline of `python -m bench.run` (phase "baseline"): the design most people write
first. One Celery task per job, holding its worker slot for the job's whole life:

    submit to RunComfy → loop { time.sleep(2); GET /status } until done → GET /result
    → POST a Standard Webhooks-signed webhook

It is what RunComfy's own clients do (fixed 2 s polling), run in a Celery task. With prefork
`-c 8` at most 8 jobs are in flight at RunComfy, whatever the backlog: 2,000 jobs of 20 s each take
about 2000 / 8 x 22 s. It has none of the gateway's guarantees either (no job record, no retry,
no lease, no global limits) — it exists only to be measured.

Run: `celery -A bench.naive worker -c 8` with REDIS_URL (broker), RUNCOMFY_BASE_URL,
RUNCOMFY_API_TOKEN and NAIVE_WEBHOOK_SECRET (the receiving client's `whsec_` secret) set.
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from typing import Any

import requests
from celery import Celery
from standardwebhooks.webhooks import Webhook

from core.settings import DEFAULT_MODEL_ID

TASK_NAME = "bench.naive.run_job"
POLL_S = 2.0
DONE = {"completed", "succeeded", "failed", "cancelled"}


def create_app(broker_url: str) -> Celery:
    """The naive Celery app (Celery's defaults, JSON messages)."""
    celery = Celery("bench_naive", broker=broker_url)
    celery.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    return celery


app = create_app(os.environ.get("REDIS_URL", "redis://localhost:6379/0"))
_session: requests.Session | None = None


def _http() -> requests.Session:
    global _session
    if _session is None:  # one per worker process, made after the fork
        _session = requests.Session()
    return _session


@app.task(name=TASK_NAME)
def run_job(job_id: str, model_input: dict[str, Any], webhook_url: str) -> str:
    """Submit, sleep-poll until done, fetch the result, send the signed webhook."""
    base = os.environ["RUNCOMFY_BASE_URL"].rstrip("/")
    auth = {"Authorization": f"Bearer {os.environ['RUNCOMFY_API_TOKEN']}"}
    http = _http()
    started = time.time()
    submitted = http.post(f"{base}/v1/models/{DEFAULT_MODEL_ID}", json=model_input,
                          headers=auth, timeout=30)  # fmt: skip
    submitted.raise_for_status()
    request_id = submitted.json()["request_id"]
    calls = 1
    while True:
        time.sleep(POLL_S)
        status = http.get(f"{base}/v1/requests/{request_id}/status", headers=auth, timeout=30)
        calls += 1
        if status.ok and status.json().get("status") in DONE:
            break
    result = http.get(f"{base}/v1/requests/{request_id}/result", headers=auth, timeout=30).json()
    calls += 1
    succeeded = result.get("status") == "succeeded"
    now = datetime.now(UTC)
    body = json.dumps(
        {
            "type": "job.succeeded" if succeeded else "job.failed",
            "timestamp": now.isoformat(),
            "data": {
                "id": job_id,
                "status": "succeeded" if succeeded else "failed",
                "output": result.get("output"),
                "upstream": {"request_id": request_id},
                "upstream_calls": calls,
                "started_at": started,
            },
        }
    )
    webhook_id = f"msg_{job_id}"
    signature = Webhook(os.environ["NAIVE_WEBHOOK_SECRET"]).sign(webhook_id, now, body)
    http.post(
        webhook_url,
        data=body,
        headers={
            "Content-Type": "application/json",
            "webhook-id": webhook_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": signature,
        },
        timeout=15,
    )
    return request_id
