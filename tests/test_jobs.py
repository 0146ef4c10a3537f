"""The job record and its forward-only status machine."""

from __future__ import annotations

import itertools
import json

import pytest

from core.jobs import (
    FINAL_STATUSES,
    IllegalTransition,
    Job,
    JobError,
    Status,
    StoredImage,
    Upstream,
    can_move,
    new_job,
)
from core.media_urls import MediaLinks
from service.schemas import JobSchema

LINKS = MediaLinks(key=b"k" * 32, base="https://gw.example", expires_at=2_000_000_000)
ORDER = [Status.QUEUED, Status.SUBMITTED, Status.RUNNING]


def a_job(**changes: object) -> Job:
    job = new_job(
        client_id="cli_1",
        input={"prompt": "p"},
        webhook_url="https://example.com/hook",
        webhook_events=("job.succeeded",),
        metadata={"k": "v"},
        deadline_s=900,
        now=1_700_000_000.0,
    )
    return job.changed(job.updated_at, **changes) if changes else job


@pytest.mark.parametrize(("current", "target"), list(itertools.product(Status, Status)))
def test_statuses_only_move_forward(current: Status, target: Status) -> None:
    expected = (not current.is_final) and (
        target.is_final or (target in ORDER and ORDER.index(target) > ORDER.index(current))
    )
    assert can_move(current, target) is expected


def test_moving_backwards_or_out_of_a_final_status_raises() -> None:
    running = a_job().moved_to(Status.RUNNING, 1.0)
    with pytest.raises(IllegalTransition):
        running.moved_to(Status.SUBMITTED, 2.0)
    done = running.moved_to(Status.SUCCEEDED, 3.0, output_images=("https://x/1.png",))
    for status in Status:
        with pytest.raises(IllegalTransition):
            done.moved_to(status, 4.0)


def test_final_statuses_set_finished_at() -> None:
    for status in FINAL_STATUSES:
        assert a_job().moved_to(status, 5.0).finished_at == 5.0
    assert a_job().moved_to(Status.SUBMITTED, 5.0).finished_at is None


def test_json_round_trip_keeps_every_field() -> None:
    job = (
        a_job()
        .moved_to(
            Status.FAILED,
            9.0,
            error=JobError("upstream_failed", "boom"),
            upstream=Upstream("req-1", "failed", None),
            output_images=None,
        )
        .with_note(9.0, "a note")
    )
    assert Job.from_json(job.to_json()) == job


def test_records_read_across_a_rolling_update() -> None:
    """A field the previous release does not know is written only once set (so its replicas
    read the record meanwhile), and a field from a newer release is skipped, not a crash."""
    job = a_job()
    assert "submits_unanswered" not in json.loads(job.to_json())
    assert "unknown_status_looks" not in json.loads(job.to_json())
    puzzled = job.changed(2.0, unknown_status_looks=3)
    assert Job.from_json(puzzled.to_json()).unknown_status_looks == 3
    unanswered = job.changed(2.0, submits_unanswered=1)
    assert json.loads(unanswered.to_json())["submits_unanswered"] == 1
    assert Job.from_json(unanswered.to_json()) == unanswered
    newer = json.loads(job.to_json()) | {"a_field_from_a_newer_release": [1, 2]}
    assert Job.from_json(json.dumps(newer)) == job


def test_resource_shows_the_contract_and_no_internals() -> None:
    job = a_job(submit_started_at=3.0).moved_to(
        Status.SUCCEEDED,
        10.0,
        output_images=("https://x/1.png",),
        upstream=Upstream("r", "succeeded"),
    )
    resource = job.to_resource(LINKS)
    assert set(resource) == {
        "id", "status", "created_at", "updated_at", "finished_at", "input", "output", "error",
        "upstream", "webhook_url", "webhook_events", "metadata", "cancel_requested", "cost",
    }  # fmt: skip
    assert resource["cost"] is None  # not known until the job ends
    assert job.with_cost(0.0125, "upstream").to_resource(LINKS)["cost"] == {
        "usd": 0.0125,
        "source": "upstream",
    }
    assert Job.from_json(job.with_cost(0.0, "list_price").to_json()).cost_usd == 0.0
    assert resource["output"] == {  # not stored: RunComfy's URLs
        "images": ["https://x/1.png"],
        "upstream_images": ["https://x/1.png"],
        "stored": False,
        "media": [],
    }
    assert resource["upstream"] == {
        "request_id": "r",
        "status": "succeeded",
        "queue_position": None,
    }
    assert resource["created_at"].endswith("Z")


@pytest.mark.parametrize("stored", [False, True])
@pytest.mark.parametrize("status", [Status.QUEUED, Status.SUCCEEDED, Status.FAILED])
def test_the_documented_schema_is_the_resource(status: Status, stored: bool) -> None:
    # Job views answer to_resource() as is; JobSchema (OpenAPI, webhook docs) must say the same.
    job = a_job()
    succeeded = status is Status.SUCCEEDED
    if status is not Status.QUEUED:
        job = job.moved_to(
            status,
            10.0,
            output_images=("https://x/1.png",) if succeeded else None,
            output_media=(StoredImage("upl_" + "a" * 32, "f" * 64, "image/png", 9),)
            if succeeded and stored
            else None,
            error=JobError("upstream_failed", "boom") if status is Status.FAILED else None,
            upstream=Upstream("r", status.value, None),
        )
    resource = job.to_resource(LINKS)
    assert JobSchema().dump(resource) == resource
    assert set(JobSchema().fields) == set(resource)


def test_notes_are_bounded() -> None:
    job = a_job()
    for i in range(50):
        job = job.with_note(float(i), f"note {i}")
    assert len(job.notes) == 20 and job.notes[-1].endswith("note 49")
