"""A job from POST to a verified webhook, through real Redis, Celery, the emulator and a receiver."""

from __future__ import annotations

import contextlib
import io
import signal
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import redis
from PIL import Image

from cli.stack import EMULATOR_TOKEN, Stack, wait_until
from core.clients import ClientStore
from core.metrics import MAX_LABEL_VALUES, OTHER_LABEL_VALUE, Counters, label_value
from core.store import JobStore
from core.webhooks import EXHAUSTED
from tests.support.api import ApiClient
from tests.support.stack import admit
from workers.pipeline import JobPipeline
from workers.polling import FIRST_POLL_S
from workers.run_times import UNKNOWN_RECHECK_S
from workers.throttle import BUCKET_KEY, PLACES_KEY

pytestmark = pytest.mark.integration


def job_body(stack: Stack, prompt: str = "paint the sky red", **extra: Any) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "image_url": f"{stack.emulator_url}/samples/image.png",
        "mask_image_url": f"{stack.emulator_url}/samples/mask.png",
        **extra,
    }


def unique(tag: str) -> str:
    return f"{tag} {time.time_ns()}"


def submits_for(stack: Stack, prompt: str) -> int:
    return int(stack.emulator("/_emulator/stats").json()["submits_by_prompt"].get(prompt, 0))


def test_job_succeeds_and_a_signed_webhook_arrives(
    stack: Stack, api_client: ApiClient, receiver: Any
) -> None:
    prompt = unique("sunset")
    resp = api_client.post(
        "/v1/jobs", json=job_body(stack, prompt, webhook_url=receiver.url, metadata={"order": 7})
    )
    assert resp.status_code == 202
    job = resp.get_json()
    assert resp.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["input"]["num_inference_steps"] == 20

    final = api_client.wait_final(job["id"])
    assert final["status"] == "succeeded", final
    assert final["upstream"]["request_id"] and final["error"] is None
    assert final["metadata"] == {"order": 7}
    output = final["output"]
    assert output["stored"] is True and output["upstream_images"][0].startswith(stack.emulator_url)
    [image_url] = output["images"]  # ours, signed, on the request's root (no PUBLIC_BASE_URL)
    assert image_url.startswith(f"http://localhost/v1/media/{output['media'][0]['id']}?exp=")
    picture = api_client.http.get(image_url.removeprefix("http://localhost"))  # no key
    assert picture.status_code == 200
    with Image.open(io.BytesIO(picture.data)) as img:
        assert img.width > 0 and img.height > 0

    events = wait_until(receiver.received, what="webhook received")
    assert [e.payload["type"] for e in events] == ["job.succeeded"]
    assert events[0].payload["data"]["id"] == job["id"]
    sent = events[0].payload["data"]["output"]
    # Signed when the event was built, on no base (the worker has no PUBLIC_BASE_URL): paths.
    assert {k: v for k, v in sent.items() if k != "images"} == {
        k: v for k, v in output.items() if k != "images"
    }
    [sent_url] = sent["images"]
    assert sent_url.startswith(f"/v1/media/{output['media'][0]['id']}?exp=")
    assert api_client.http.get(sent_url).data == picture.data
    assert not receiver.rejected
    assert submits_for(stack, prompt) == 1

    deliveries = wait_until(
        lambda: api_client.get(f"/v1/jobs/{job['id']}/deliveries").get_json()["deliveries"]
    )
    assert (
        deliveries[0]["status_code"] == 204 and deliveries[0]["webhook_id"] == events[0].webhook_id
    )


def test_progress_events_when_asked(stack: Stack, api_client: ApiClient, receiver: Any) -> None:
    body = job_body(
        stack,
        unique("progress [emulator:queue=1] [emulator:run=1]"),
        webhook_url=receiver.url,
        webhook_events=["job.submitted", "job.running", "job.succeeded"],
    )
    job = api_client.post("/v1/jobs", json=body).get_json()
    api_client.wait_final(job["id"])
    events = wait_until(
        lambda: len(receiver.received()) == 3 and receiver.received(), what="3 events"
    )
    assert [e.payload["type"] for e in events] == ["job.submitted", "job.running", "job.succeeded"]
    assert len({e.webhook_id for e in events}) == 3


def test_upstream_failure_becomes_failed_job_with_webhook(
    stack: Stack, api_client: ApiClient, receiver: Any
) -> None:
    body = job_body(
        stack, unique("[emulator:fail] [emulator:error=object]"), webhook_url=receiver.url
    )
    job = api_client.post("/v1/jobs", json=body).get_json()
    final = api_client.wait_final(job["id"])
    assert final["status"] == "failed"
    assert final["error"]["code"] == "upstream_failed"
    assert final["error"]["message"]
    events = wait_until(receiver.received, what="webhook")
    assert events[0].payload["type"] == "job.failed"


def test_http_200_with_error_code_on_submit_fails_the_job(
    stack: Stack, api_client: ApiClient, receiver: Any
) -> None:
    body = job_body(stack, unique("[emulator:submit-200-error]"), webhook_url=receiver.url)
    job = api_client.post("/v1/jobs", json=body).get_json()
    final = api_client.wait_final(job["id"])
    assert final["status"] == "failed"
    assert final["error"]["code"] == "upstream_rejected"
    assert "400001" in final["error"]["message"]
    assert final["cost"] == {"usd": 0.0, "source": "list_price"}  # refused: nothing ran
    assert wait_until(receiver.received)[0].payload["type"] == "job.failed"


def test_a_submit_accepted_without_a_request_id_fails_the_job_and_is_not_sent_again(
    stack: Stack, api_client: ApiClient
) -> None:
    """RunComfy took the job (a paid run) but its answer has no request id: the job cannot be
    followed, so it fails saying so, and is not submitted again (nor called refused)."""
    prompt = unique("[emulator:submit-no-id]")
    job = api_client.post("/v1/jobs", json=job_body(stack, prompt)).get_json()
    final = api_client.wait_final(job["id"])
    assert final["status"] == "failed" and final["error"]["code"] == "upstream_bad_response"
    assert (
        "no request_id" in final["error"]["message"] and "refused" not in final["error"]["message"]
    )
    assert submits_for(stack, prompt) == 1


@pytest.mark.parametrize(
    ("directive", "code"),
    [
        ("[emulator:no-status]", "upstream_bad_response"),
        ("[emulator:no-output]", "upstream_bad_response"),
    ],
)
def test_bad_upstream_answers_become_readable_failures(
    stack: Stack, api_client: ApiClient, directive: str, code: str
) -> None:
    job = api_client.post("/v1/jobs", json=job_body(stack, unique(directive))).get_json()
    final = api_client.wait_final(job["id"])
    assert final["status"] == "failed"
    assert final["error"]["code"] == code and final["error"]["message"]


def unknown_status_count(redis_client: redis.Redis, word: str) -> int:
    return Counters(redis_client).read_labelled("upstream_unknown_statuses").get(word, 0)


def test_a_status_word_not_known_is_followed_on_until_the_real_end(
    stack: Stack, api_client: ApiClient, redis_client: redis.Redis
) -> None:
    """RunComfy answers a word no one knows while it runs, then the real end: the job succeeds
    (a vocabulary change at RunComfy must not fail the jobs in flight), and the word is counted
    in /metrics."""
    before = unknown_status_count(redis_client, "thinking")
    prompt = unique("[emulator:queue=0] [emulator:run=2] [emulator:running-word=thinking]")
    job = api_client.post("/v1/jobs", json=job_body(stack, prompt)).get_json()
    final = api_client.wait_final(job["id"])
    assert final["status"] == "succeeded" and final["output"]["images"], final
    assert wait_until(lambda: unknown_status_count(redis_client, "thinking") > before)
    metrics = api_client.http.get("/metrics").get_data(as_text=True)
    assert 'inpaint_gateway_upstream_unknown_statuses_total{word="thinking"}' in metrics


def test_a_status_word_not_known_for_good_ends_the_job_expired_with_its_run_cancelled(
    stack: Stack, make_app: Any, api_client: ApiClient, redis_client: redis.Redis
) -> None:
    """The word never changes: the request is followed until the job's deadline, then the job
    ends expired (not failed) and the run, still queued at RunComfy, is cancelled."""
    before = unknown_status_count(redis_client, "mulling")
    short = ApiClient(api_client.creds, make_app(JOB_DEADLINE_S="3").test_client())
    prompt = unique("[emulator:queue=30] [emulator:queued-word=mulling]")
    job = short.post("/v1/jobs", json=job_body(stack, prompt)).get_json()
    final = short.wait_final(job["id"], timeout_s=15)
    assert final["status"] == "expired" and final["error"]["code"] == "deadline_exceeded"
    assert final["upstream"]["status"] == "mulling"
    assert wait_until(lambda: unknown_status_count(redis_client, "mulling") > before)
    status = stack.emulator(f"/v1/requests/{final['upstream']['request_id']}/status").json()
    assert status["status"] == "cancelled"


def test_status_words_from_a_hostile_upstream_keep_the_metric_small(
    scratch: redis.Redis,
) -> None:
    """Every word a new one: at most MAX_LABEL_VALUES words are kept as labels, the rest counted
    as "other"; a word is made safe as a label value first."""
    counters = Counters(scratch, buffered=True)
    for n in range(MAX_LABEL_VALUES + 10):
        counters.add_labelled("upstream_unknown_statuses", f"word_{n}")
    counters.add_labelled("upstream_unknown_statuses", "word_0")  # a word already kept
    counters.flush()
    counters.add_labelled("upstream_unknown_statuses", 'Bad "Word"} ' + "x" * 100)
    counters.flush()
    counted = counters.read_labelled("upstream_unknown_statuses")
    assert len(counted) == MAX_LABEL_VALUES + 1 and counted["word_0"] == 2
    assert counted[OTHER_LABEL_VALUE] == 11
    assert sum(counted.values()) == MAX_LABEL_VALUES + 12
    assert label_value('Bad "Word"} ' + "x" * 100) == "bad__word___" + "x" * 20
    assert label_value("  ") == OTHER_LABEL_VALUE


def test_transient_poll_errors_are_retried(stack: Stack, api_client: ApiClient) -> None:
    job = api_client.post(
        "/v1/jobs", json=job_body(stack, unique("[emulator:poll-500=2]"))
    ).get_json()
    assert api_client.wait_final(job["id"])["status"] == "succeeded"


def test_a_run_of_429s_is_retried_when_retry_after_says(
    stack: Stack, api_client: ApiClient
) -> None:
    """Six polls answered 429 with `Retry-After: 1`: each retry comes 1-2 s later, so the job is
    done within about 12 s. Growing the backoff under the 1 s floor would take at least 31 s
    (1 + 1 + 2 + 4 + 8 + 16), about 45 s on average."""
    posted = time.monotonic()
    job = api_client.post(
        "/v1/jobs", json=job_body(stack, unique("[emulator:poll-429=6]"))
    ).get_json()
    assert api_client.wait_final(job["id"], timeout_s=60)["status"] == "succeeded"
    assert time.monotonic() - posted < 25


@contextlib.contextmanager
def submitted_here(
    stack: Stack, pipeline: JobPipeline, client: ApiClient, directive: str, retry_after_s: int
) -> Iterator[str]:
    """POST a job whose submit is answered as `directive` says (with `Retry-After:
    retry_after_s`), and take its submit step in this process, the stack's worker stopped."""
    stack.emulator("/_emulator/faults", method="POST", json={"retry_after_s": retry_after_s})
    stack.worker.signal(signal.SIGSTOP)  # only this test's pipeline acts on the job
    try:
        body = job_body(stack, unique(f"[emulator:{directive}]"))
        job_id = client.post("/v1/jobs", json=body).get_json()["id"]
        admit(pipeline)
        pipeline.advance(job_id)
        yield job_id
    finally:
        pipeline.store.redis.delete(BUCKET_KEY, PLACES_KEY)  # a 429's pause of every call
        stack.emulator("/_emulator/reset", method="POST")
        stack.worker.signal(signal.SIGCONT)


def test_a_step_over_the_rate_cap_waits_for_its_place_and_is_counted(
    stack: Stack, api_client: ApiClient, pipeline: JobPipeline
) -> None:
    """While the shared rate cap is spent (here: a 429's cool-down), a due submit makes no call:
    the job is due again at the moment the bucket gave it, and the postponement is counted."""
    stack.worker.signal(signal.SIGSTOP)  # only this test's pipeline acts on the job
    try:
        job_id = api_client.post("/v1/jobs", json=job_body(stack, unique("capped"))).get_json()[
            "id"
        ]
        admit(pipeline)
        before = pipeline.counters.read()
        asked_at = time.time()
        pipeline.throttle.cool_down(5.0)
        pipeline.advance(job_id)
        after = pipeline.counters.read()
        job = pipeline.store.get(job_id)
        assert job is not None and job.status.value == "queued" and job.submit_attempts == 0
        assert after["upstream_submits"] == before["upstream_submits"]
        assert after["upstream_calls_postponed"] == before["upstream_calls_postponed"] + 1
        due_at = pipeline.store.job_schedule.due_at(job_id)
        assert due_at is not None and asked_at + 4.9 <= due_at <= asked_at + 5.5
    finally:
        pipeline.store.redis.delete(BUCKET_KEY, PLACES_KEY)
        stack.worker.signal(signal.SIGCONT)
    assert api_client.wait_final(job_id)["status"] == "succeeded"


def test_a_submit_told_to_wait_past_the_deadline_is_looked_at_by_the_deadline(
    stack: Stack, make_app: Any, redis_client: Any, pipeline: JobPipeline
) -> None:
    """A 429 on submit asking for 60 s, for a job with 20 s to live: its next look is at its
    deadline (where it expires), not 40 s after it."""
    client = ApiClient(
        ClientStore(redis_client).create("short"), make_app(JOB_DEADLINE_S="20").test_client()
    )
    with submitted_here(stack, pipeline, client, "submit-429", retry_after_s=60) as job_id:
        job = pipeline.store.get(job_id)
        assert job is not None and "HTTP 429" in (job.last_transient_error or "")
        assert pipeline.store.job_schedule.due_at(job_id) == pytest.approx(
            job.deadline_at, abs=0.01
        )


def test_a_resubmit_after_a_503_waits_at_least_its_retry_after(
    stack: Stack, api_client: ApiClient, pipeline: JobPipeline
) -> None:
    """A 503 on submit (outcome unknown; SUBMIT_UNKNOWN=resubmit) asking for 30 s: the resubmit
    waits that long, not the first backoff's 0.5-1 s."""
    asked_at = time.time()
    with submitted_here(stack, pipeline, api_client, "submit-503", retry_after_s=30) as job_id:
        job = pipeline.store.get(job_id)
        assert job is not None and job.submit_unknown_outcomes == 1
        due_at = pipeline.store.job_schedule.due_at(job_id)
        assert due_at is not None and due_at >= asked_at + 30
        cancelled = api_client.post(f"/v1/jobs/{job_id}/cancel").get_json()
        assert cancelled["status"] == "cancelled"  # no 503s every 30 s under other tests


def test_image_output_style_is_normalised_to_a_list(stack: Stack, api_client: ApiClient) -> None:
    job = api_client.post("/v1/jobs", json=job_body(stack, unique("[emulator:image]"))).get_json()
    final = api_client.wait_final(job["id"])
    assert final["status"] == "succeeded"
    assert isinstance(final["output"]["images"], list) and len(final["output"]["images"]) == 1


def test_cancel_while_queued_here_is_immediate(
    stack: Stack, api_client: ApiClient, receiver: Any
) -> None:
    prompt = unique("cancel-here")
    stack.worker.signal(signal.SIGSTOP)  # nobody takes the job: it stays queued here
    try:
        job = api_client.post(
            "/v1/jobs", json=job_body(stack, prompt, webhook_url=receiver.url)
        ).get_json()
        resp = api_client.post(f"/v1/jobs/{job['id']}/cancel")
        assert resp.status_code == 202
        assert resp.get_json()["status"] == "cancelled"
    finally:
        stack.worker.signal(signal.SIGCONT)
    events = wait_until(receiver.received, what="cancel webhook")
    assert events[0].payload["type"] == "job.cancelled"
    time.sleep(1.0)  # a worker that wakes now must not submit it
    assert submits_for(stack, prompt) == 0
    assert api_client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 409


def test_cancel_while_queued_upstream_cancels_at_runcomfy(
    stack: Stack, api_client: ApiClient, receiver: Any
) -> None:
    body = job_body(stack, unique("[emulator:queue=20]"), webhook_url=receiver.url)
    job = api_client.post("/v1/jobs", json=body).get_json()
    api_client.wait_for(job["id"], lambda j: j["status"] == "submitted")
    resp = api_client.post(f"/v1/jobs/{job['id']}/cancel")
    assert resp.status_code == 202 and resp.get_json()["cancel_requested"] is True
    final = api_client.wait_final(job["id"])
    assert final["status"] == "cancelled"
    assert final["upstream"]["status"] == "cancelled"
    assert wait_until(receiver.received)[0].payload["type"] == "job.cancelled"


def test_cancel_while_running_reports_the_honest_final_state(
    stack: Stack, api_client: ApiClient, receiver: Any
) -> None:
    body = job_body(stack, unique("[emulator:queue=0] [emulator:run=3]"), webhook_url=receiver.url)
    job = api_client.post("/v1/jobs", json=body).get_json()
    api_client.wait_for(job["id"], lambda j: j["status"] == "running")
    assert api_client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    final = api_client.wait_final(job["id"])
    assert final["status"] == "succeeded"  # RunComfy runs it to the end; we say so
    assert final["cancel_requested"] is True
    assert wait_until(receiver.received)[0].payload["type"] == "job.succeeded"


def test_deadline_expires_the_job_and_cancels_upstream(
    stack: Stack, make_app: Any, api_client: ApiClient, receiver: Any
) -> None:
    short = ApiClient(api_client.creds, make_app(JOB_DEADLINE_S="2").test_client())
    body = job_body(stack, unique("[emulator:queue=30]"), webhook_url=receiver.url)
    job = short.post("/v1/jobs", json=body).get_json()
    final = short.wait_final(job["id"], timeout_s=15)
    assert final["status"] == "expired"
    assert final["error"]["code"] == "deadline_exceeded"
    assert wait_until(receiver.received)[0].payload["type"] == "job.expired"
    status = stack.emulator(f"/v1/requests/{final['upstream']['request_id']}/status").json()
    assert status["status"] == "cancelled"


def test_webhook_retries_keep_the_same_webhook_id(
    stack: Stack, api_client: ApiClient, receiver: Any
) -> None:
    receiver.forced_status = 503
    job = api_client.post(
        "/v1/jobs", json=job_body(stack, unique("retry"), webhook_url=receiver.url)
    ).get_json()
    api_client.wait_final(job["id"])
    wait_until(
        lambda: (
            len(api_client.get(f"/v1/jobs/{job['id']}/deliveries").get_json()["deliveries"]) >= 2
        ),
        what="two failed attempts",
    )
    receiver.forced_status = None
    events = wait_until(receiver.received, what="delivery after recovery")
    deliveries = api_client.get(f"/v1/jobs/{job['id']}/deliveries").get_json()["deliveries"]
    assert {d["webhook_id"] for d in deliveries} == {events[0].webhook_id}
    assert [d["status_code"] for d in deliveries][:2] == [503, 503]
    assert deliveries[-1]["status_code"] == 204
    assert [d["attempt"] for d in deliveries] == list(range(1, len(deliveries) + 1))


def test_a_webhook_that_never_succeeds_ends_exhausted_and_changes_nothing_else(
    stack: Stack, api_client: ApiClient, receiver: Any, redis_client: Any
) -> None:
    """Every attempt answered 500: the event is tried on the whole WEBHOOK_RETRY_SCHEDULE, then
    recorded exhausted (not scheduled again) and counted; the job stays as it ended (§6: a
    webhook that never succeeds never changes the job's status)."""
    exhausted_before = Counters(redis_client).read()["webhook_exhausted"]
    receiver.forced_status = 500
    job = api_client.post(
        "/v1/jobs", json=job_body(stack, unique("never delivered"), webhook_url=receiver.url)
    ).get_json()
    assert api_client.wait_final(job["id"])["status"] == "succeeded"
    store = JobStore(redis_client, retention_s=stack.settings().job_retention_s)
    tries = len(stack.settings().webhook_retry_schedule_s)

    def exhausted() -> list[Any]:
        return [e for e in store.outbox.events_of(job["id"]) if e.state == EXHAUSTED]

    events = wait_until(exhausted, timeout_s=30, what="the event recorded exhausted")
    deliveries = api_client.get(f"/v1/jobs/{job['id']}/deliveries").get_json()["deliveries"]
    assert [d["status_code"] for d in deliveries] == [500] * tries
    assert {d["webhook_id"] for d in deliveries} == {events[0].webhook_id}
    assert deliveries[-1]["next_attempt_at"] is None
    assert api_client.get(f"/v1/jobs/{job['id']}").get_json()["status"] == "succeeded"
    wait_until(
        lambda: Counters(redis_client).read()["webhook_exhausted"] == exhausted_before + 1,
        what="webhook_exhausted counted",
    )
    time.sleep(1.5)  # the last gap of the schedule: no attempt comes after it
    assert len(api_client.get(f"/v1/jobs/{job['id']}/deliveries").get_json()["deliveries"]) == tries


def test_redeliver_sends_the_final_event_again(
    stack: Stack, api_client: ApiClient, receiver: Any
) -> None:
    job = api_client.post(
        "/v1/jobs", json=job_body(stack, unique("redeliver"), webhook_url=receiver.url)
    ).get_json()
    api_client.wait_final(job["id"])
    first = wait_until(receiver.received)[0]
    assert api_client.post(f"/v1/jobs/{job['id']}/webhook/redeliver").status_code == 202
    events = wait_until(
        lambda: len(receiver.received()) == 2 and receiver.received(), what="redelivery"
    )
    assert events[1].webhook_id == first.webhook_id
    assert events[1].payload == first.payload


def test_clients_only_see_their_own_jobs(
    stack: Stack, app: Any, redis_client: Any, api_client: ApiClient
) -> None:
    from core.clients import ClientStore

    other = ApiClient(ClientStore(redis_client).create("other-team"), app.test_client())
    job = api_client.post("/v1/jobs", json=job_body(stack, unique("mine"))).get_json()
    assert other.get(f"/v1/jobs/{job['id']}").status_code == 404
    assert other.post(f"/v1/jobs/{job['id']}/cancel").status_code == 404
    assert other.get(f"/v1/jobs/{job['id']}/deliveries").status_code == 404
    assert other.post(f"/v1/jobs/{job['id']}/webhook/redeliver").status_code == 404
    assert other.get("/v1/jobs").get_json()["jobs"] == []
    assert [j["id"] for j in api_client.get("/v1/jobs").get_json()["jobs"]] == [job["id"]]


def test_secrets_never_reach_logs_or_responses(
    stack: Stack, api_client: ApiClient, receiver: Any
) -> None:
    job = api_client.post(
        "/v1/jobs", json=job_body(stack, unique("[emulator:fail]"), webhook_url=receiver.url)
    ).get_json()
    final = api_client.wait_final(job["id"])
    wait_until(receiver.received)
    secrets = [EMULATOR_TOKEN, api_client.creds.api_key, api_client.creds.webhook_secret]
    responses = [
        final,
        api_client.get(f"/v1/jobs/{job['id']}/deliveries").get_json(),
        api_client.get("/v1/jobs").get_json(),
        api_client.post("/v1/jobs", json={"prompt": 1}).get_json(),
    ]
    logs = "\n".join(p.read_text(errors="replace") for p in stack.logs.iterdir())
    assert "job finished" in logs  # the logs are there and were read
    for secret in secrets:
        assert secret not in logs
        assert all(secret not in str(r) for r in responses)


def test_workers_hold_no_slot_while_runcomfy_works(stack: Stack, api_client: ApiClient) -> None:
    """30 jobs run upstream at once on a worker with 2 slots: no task waits for RunComfy."""
    tag = unique("parallel")
    ids = [
        api_client.post(
            "/v1/jobs", json=job_body(stack, f"{tag} {i} [emulator:queue=0] [emulator:run=4]")
        ).get_json()["id"]
        for i in range(30)
    ]
    peak = 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and peak < 30:
        peak = max(
            peak, stack.emulator("/_emulator/stats").json()["requests"].get("in_progress", 0)
        )
        time.sleep(0.1)
    assert peak >= 25, f"only {peak} ran at once on 2 worker slots"
    for job_id in ids:
        assert api_client.wait_final(job_id)["status"] == "succeeded"


def test_a_fast_shape_is_learned_and_then_looked_at_sooner(
    stack: Stack, api_client: ApiClient
) -> None:
    # A run already done at the first look teaches its shape's run time from RunComfy's own
    # created/finished times; the next job of that shape is looked at when it should be done
    # rather than after a full FIRST_POLL_S.
    shape = {"num_inference_steps": 29, "image_size": "square"}  # no other test uses it

    def accepted_to_final_s() -> float:
        body = job_body(stack, unique("[emulator:queue=0] [emulator:run=0]"), **shape)
        job = api_client.post("/v1/jobs", json=body).get_json()
        final = api_client.wait_final(job["id"])
        assert final["status"] == "succeeded", final
        return _epoch(final["finished_at"]) - _epoch(final["created_at"])

    assert accepted_to_final_s() >= FIRST_POLL_S  # nothing learned yet
    time.sleep(UNKNOWN_RECHECK_S + 0.2)  # every worker process has re-read the learned times
    assert accepted_to_final_s() < 0.8 * FIRST_POLL_S


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
