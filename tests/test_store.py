"""The job store's compare-and-set: a change commits only on the record it was computed from."""

from __future__ import annotations

import pytest
import redis

from core.admission import IN_FLIGHT_KEY
from core.jobs import Job, Status, new_job
from core.store import JobStore, Step

pytestmark = pytest.mark.integration


def a_stored_job(store: JobStore, **kwargs: object) -> Job:
    job = new_job(
        client_id="cli_store",
        input={"prompt": "x"},
        webhook_url=kwargs.pop("webhook_url", None),  # type: ignore[arg-type]
        webhook_events=("job.succeeded",),
        metadata=None,
        deadline_s=900,
    )
    store.create(job)
    return job


def test_a_change_computed_from_a_stale_record_is_computed_again(scratch: redis.Redis) -> None:
    store = JobStore(scratch, retention_s=3600)
    job = a_stored_job(store)
    seen_cancel_requested: list[bool] = []

    def count_an_attempt(j: Job) -> Step:
        seen_cancel_requested.append(j.cancel_requested)
        if len(seen_cancel_requested) == 1:  # another writer commits between our read and write
            store.change(j.id, lambda k: Step(k.changed(2.0, cancel_requested=True), 50.0))
        return Step(j.changed(3.0, submit_attempts=j.submit_attempts + 1), 60.0)

    committed = store.change(job.id, count_an_attempt)

    assert seen_cancel_requested == [False, True]  # computed again from the newer record
    stored = store.get(job.id)
    assert committed is not None and stored == committed.job
    assert stored.cancel_requested and stored.submit_attempts == 1  # neither change lost
    assert scratch.zscore(store.job_schedule.key, job.id) == 60.0


def test_a_declined_or_vanished_change_writes_nothing(scratch: redis.Redis) -> None:
    store = JobStore(scratch, retention_s=3600)
    job = a_stored_job(store)
    before = scratch.get(store.job_key(job.id))
    assert store.change(job.id, lambda j: None) is None
    assert scratch.get(store.job_key(job.id)) == before
    assert store.change("job_missing", lambda j: Step(j.changed(1.0), 2.0)) is None
    assert not scratch.exists(store.job_key("job_missing"))


def test_a_final_change_frees_the_slot_and_queues_its_webhook_in_one_write(
    scratch: redis.Redis,
) -> None:
    store = JobStore(scratch, retention_s=3600)
    job = a_stored_job(store, webhook_url="https://hooks.example/x")
    assert store.admission.admit(max_in_flight=5, slot_ttl_s=600) == [job.id]

    committed = store.change(job.id, lambda j: Step(j.moved_to(Status.SUCCEEDED, 9.0), None))

    assert committed is not None and [e.type for e in committed.events] == ["job.succeeded"]
    event = committed.events[0]
    assert scratch.zscore(IN_FLIGHT_KEY, job.id) is None  # slot released
    assert scratch.zscore(store.job_schedule.key, job.id) is None  # nothing more due
    assert scratch.zscore(store.outbox.schedule.key, event.webhook_id) is not None
    assert [e.webhook_id for e in store.outbox.events_of(job.id)] == [event.webhook_id]
    assert 0 < scratch.ttl(store.job_key(job.id)) <= 3600  # kept for the retention only
    assert 0 < scratch.ttl(store.outbox.event_key(event.webhook_id)) <= 3600


class CountingReads:
    """The real client, with its GETs counted."""

    def __init__(self, client: redis.Redis) -> None:
        self.client, self.gets = client, 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.client, name)

    def get(self, key: str) -> object:
        self.gets += 1
        return self.client.get(key)


def test_a_change_from_the_record_the_caller_holds_reads_nothing(scratch: redis.Redis) -> None:
    counting = CountingReads(scratch)
    store = JobStore(counting, retention_s=3600)  # type: ignore[arg-type]
    job = a_stored_job(store)
    record = store.read(job.id)
    assert record is not None and record.job == job and counting.gets == 1

    first = store.change(job.id, lambda j: Step(j.changed(2.0, polls=1), 10.0), seen=record)
    assert first is not None
    second = store.change(job.id, lambda j: Step(j.changed(3.0, polls=j.polls + 1), 20.0),
                          seen=first.record)  # fmt: skip

    assert counting.gets == 1  # each change computed from the record it was given
    assert second is not None and second.job.polls == 2
    assert store.read(job.id) == second.record  # what it says it wrote is what is stored
    assert scratch.zscore(store.job_schedule.key, job.id) == 20.0


def test_a_change_from_a_stale_record_is_refused_and_computed_again(scratch: redis.Redis) -> None:
    store = JobStore(scratch, retention_s=3600)
    job = a_stored_job(store)
    stale = store.read(job.id)
    store.change(job.id, lambda j: Step(j.changed(2.0, cancel_requested=True), 50.0))
    seen_cancel_requested: list[bool] = []

    def count_a_poll(j: Job) -> Step:
        seen_cancel_requested.append(j.cancel_requested)
        return Step(j.changed(3.0, polls=j.polls + 1), 60.0)

    committed = store.change(job.id, count_a_poll, seen=stale)

    assert seen_cancel_requested == [False, True]  # the stale attempt lost; computed again
    stored = store.get(job.id)
    assert committed is not None and stored == committed.job
    assert stored.cancel_requested and stored.polls == 1  # the other change is kept


def test_a_stale_record_of_a_job_gone_changes_nothing(scratch: redis.Redis) -> None:
    store = JobStore(scratch, retention_s=3600)
    job = a_stored_job(store)
    stale = store.read(job.id)
    scratch.delete(store.job_key(job.id))  # expired past its retention meanwhile
    assert store.change(job.id, lambda j: Step(j.changed(2.0), 9.0), seen=stale) is None
    assert not scratch.exists(store.job_key(job.id))
