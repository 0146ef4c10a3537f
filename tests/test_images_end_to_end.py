"""Pictures carried both ways, end to end (PRODUCT §10): a job from uploads and a job from data
URIs reach RunComfy (the emulator, over HTTP) as exactly those bytes, through the real API, Redis,
Celery worker and a webhook receiver verifying signatures; no record or payload carries base64."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from typing import Any

import pytest
import redis
import requests

from cli.stack import Stack, wait_until
from core.store import JobStore
from tests.support.api import ApiClient

pytestmark = pytest.mark.integration


def sample_pictures(stack: Stack) -> tuple[bytes, bytes]:
    """The emulator's sample picture and the mask over its house."""
    image = requests.get(f"{stack.emulator_url}/samples/image.png", timeout=10)
    mask = requests.get(f"{stack.emulator_url}/samples/mask.png", timeout=10)
    assert image.status_code == mask.status_code == 200
    return image.content, mask.content


def upload(api_client: ApiClient, data: bytes) -> dict[str, Any]:
    answer = api_client.post("/v1/uploads", data=data, content_type="image/png")
    assert answer.status_code in (200, 201), answer.get_json()
    return dict(answer.get_json())


def received_by_runcomfy(stack: Stack, job: dict[str, Any]) -> dict[str, Any]:
    """What the emulator says it received for the job's request, per image field."""
    request_id = job["upstream"]["request_id"]
    answer = stack.emulator(f"/_emulator/requests/{request_id}")
    assert answer.status_code == 200, answer.text
    return dict(answer.json()["inputs"])


def run_to_the_end(
    api_client: ApiClient, receiver: Any, body: dict[str, Any]
) -> tuple[dict[str, Any], Any]:
    """POST the job; the job once final and its verified webhook."""
    accepted = api_client.post("/v1/jobs", json=body | {"webhook_url": receiver.url})
    assert accepted.status_code == 202, accepted.get_json()
    final = api_client.wait_final(accepted.get_json()["id"])
    [event] = wait_until(receiver.received, what="the job's webhook")
    assert not receiver.rejected
    return final, event


def assert_no_base64_anywhere(
    redis_client: redis.Redis, job: dict[str, Any], event: Any, *pictures: bytes
) -> None:
    """The record, the resource and the webhook name pictures by ref or URL, never by bytes."""
    record = redis_client.get(JobStore.job_key(job["id"]))
    assert record is not None
    for text in (str(record), json.dumps(job), json.dumps(event.payload)):
        assert "base64" not in text
        for picture in pictures:
            assert base64.b64encode(picture)[:64].decode() not in text


def test_a_job_from_uploads_reaches_runcomfy_as_exactly_those_bytes(
    stack: Stack, api_client: ApiClient, receiver: Any, redis_client: redis.Redis
) -> None:
    image, mask = sample_pictures(stack)
    image_upload, mask_upload = upload(api_client, image), upload(api_client, mask)
    body = {
        "prompt": f"a blue cabin {time.time_ns()}",
        "image_url": image_upload["ref"],
        "mask_image_url": mask_upload["ref"],
    }

    final, event = run_to_the_end(api_client, receiver, body)

    assert final["status"] == "succeeded", final
    assert final["input"]["image_url"] == image_upload["ref"]
    assert final["input"]["mask_image_url"] == mask_upload["ref"]
    received = received_by_runcomfy(stack, final)
    assert received["image_url"]["kind"] == received["mask_image_url"]["kind"] == "data_uri"
    assert received["image_url"]["sha256"] == image_upload["sha256"] == sha256(image)
    assert received["mask_image_url"]["sha256"] == mask_upload["sha256"] == sha256(mask)
    assert event.payload["type"] == "job.succeeded"
    assert_no_base64_anywhere(redis_client, final, event, image, mask)


def test_a_job_from_data_uris_reaches_runcomfy_as_exactly_those_bytes(
    stack: Stack, api_client: ApiClient, receiver: Any, redis_client: redis.Redis
) -> None:
    image, mask = sample_pictures(stack)
    body = {
        "prompt": f"a blue cabin {time.time_ns()}",
        "image_url": data_uri(image),
        "mask_image_url": data_uri(mask),
    }

    final, event = run_to_the_end(api_client, receiver, body)

    assert final["status"] == "succeeded", final
    # Kept as the client's uploads: the job shows their refs, and they can be read back.
    for field, picture in (("image_url", image), ("mask_image_url", mask)):
        ref = final["input"][field]
        assert ref.startswith("upload:upl_"), ref
        kept = api_client.get(f"/v1/uploads/{ref.removeprefix('upload:')}").get_json()
        assert kept["sha256"] == sha256(picture)
        assert received_by_runcomfy(stack, final)[field]["sha256"] == sha256(picture)
    assert_no_base64_anywhere(redis_client, final, event, image, mask)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()
