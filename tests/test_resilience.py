"""Workers against a broken broker and a stop request: resume or exit, never idle; hand back work."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from cli.stack import RedisServer, Stack, free_port, venv_script, wait_until
from core.clients import ClientStore
from core.store import JobStore, connect_redis
from service import create_app
from tests.support.api import ApiClient
from tests.support.stack import start_stack
from tests.test_end_to_end import job_body, submits_for, unique

pytestmark = pytest.mark.integration
RESUME_WITHIN_S = 30.0


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = start_stack(tmp_path_factory.mktemp("resilience"))
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def api(own_stack: Stack) -> ApiClient:
    app = create_app({"TESTING": True, "SETTINGS": own_stack.settings()})
    return ApiClient(
        ClientStore(connect_redis(own_stack.redis_server.url)).create("r"), app.test_client()
    )


def post_until_accepted(api: ApiClient, body: dict[str, Any], timeout_s: float = 20) -> str:
    """POST, retrying while the store is still coming back (503) — as a client would."""
    key = hashlib.sha256(body["prompt"].encode()).hexdigest()
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            resp = api.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
            if resp.status_code in (200, 202):
                return str(resp.get_json()["id"])
            last = resp.get_json()
        except Exception as exc:
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"POST not accepted within {timeout_s} s: {last}")


def ensure_worker(stack: Stack) -> None:
    """Act as the supervisor: a worker that exited is started again."""
    if not stack.worker.running:
        stack.worker.start()


@pytest.mark.parametrize("how", ["clean restart", "SIGKILL"])
def test_a_redis_restart_never_leaves_the_worker_idle(
    own_stack: Stack, api: ApiClient, how: str
) -> None:
    ensure_worker(own_stack)
    assert (
        api.wait_final(post_until_accepted(api, job_body(own_stack, unique("before"))))["status"]
        == "succeeded"
    )
    if how == "SIGKILL":
        own_stack.redis_server.kill()
    else:
        own_stack.redis_server.stop()
    time.sleep(2)
    own_stack.redis_server.start()
    restarted_at = time.monotonic()
    job_id = post_until_accepted(api, job_body(own_stack, unique("after")))
    deadline = restarted_at + RESUME_WITHIN_S
    while time.monotonic() < deadline:
        status = api.get(f"/v1/jobs/{job_id}").get_json()["status"]
        if status == "succeeded" or not own_stack.worker.running:
            break
        time.sleep(0.2)
    if own_stack.worker.running:
        assert status == "succeeded", f"worker alive but idle {RESUME_WITHIN_S} s after the restart"
    else:
        # The other allowed outcome: it exited non-zero so that its supervisor restarts it.
        assert own_stack.worker.process is not None and own_stack.worker.process.returncode != 0
        own_stack.worker.start()
        assert api.wait_final(job_id)["status"] == "succeeded"


def ping(stack: Stack) -> int:
    """The worker health check used by compose and Kubernetes."""
    argv = [
        venv_script("celery"),
        "-A",
        "workers",
        "inspect",
        "ping",
        "-d",
        f"{stack.worker.name}@*",
        "--timeout",
        "3",
    ]
    hostname = subprocess.run(
        ["hostname"], capture_output=True, text=True, check=True
    ).stdout.strip()
    argv[5] = f"{stack.worker.name}@{hostname}"
    return subprocess.run(argv, env=stack.env, capture_output=True, timeout=60).returncode


def test_the_health_check_notices_a_stuck_worker(own_stack: Stack) -> None:
    ensure_worker(own_stack)
    assert ping(own_stack) == 0
    own_stack.worker.signal(signal.SIGSTOP)  # alive, consuming nothing
    try:
        assert ping(own_stack) != 0
    finally:
        own_stack.worker.signal(signal.SIGCONT)
    assert ping(own_stack) == 0


def test_sigterm_finishes_what_the_worker_holds(own_stack: Stack, api: ApiClient) -> None:
    ensure_worker(own_stack)
    tag = unique("sigterm")
    ids = [
        post_until_accepted(api, job_body(own_stack, f"{tag} {i} [emulator:run=3]"))
        for i in range(10)
    ]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not all(
        api.get(f"/v1/jobs/{i}").get_json()["status"] == "running" for i in ids
    ):
        time.sleep(0.1)
    own_stack.worker.signal(signal.SIGTERM)
    assert own_stack.worker.process is not None
    assert own_stack.worker.process.wait(30) == 0  # warm shutdown: the batch finished, clean exit
    own_stack.worker.start()
    for i, job_id in enumerate(ids):
        assert api.wait_final(job_id)["status"] == "succeeded"
        assert submits_for(own_stack, f"{tag} {i} [emulator:run=3]") == 1


def test_sigterm_during_submits_lets_them_end_and_store_their_request_ids(
    own_stack: Stack, api: ApiClient
) -> None:
    """SIGTERM while submits wait for RunComfy (3 s each): the worker exits 0 only after they
    end, and before anything restarts every job it submitted holds its request id — no
    "outcome unknown", one paid submit each. (The test above signals once every job runs
    upstream, when the worker holds no step: it would pass with a cold shutdown too.)"""
    ensure_worker(own_stack)
    store = JobStore(connect_redis(own_stack.redis_server.url), retention_s=3600)
    own_stack.emulator("/_emulator/faults", method="POST", json={"rate_slow": 1.0, "slow_s": 3})
    tag = unique("sigterm mid-submit")
    prompts = [f"{tag} {i} [emulator:run=1]" for i in range(4)]
    try:
        ids = [post_until_accepted(api, job_body(own_stack, prompt)) for prompt in prompts]

        def submitting() -> list[str]:
            jobs = [store.get(job_id) for job_id in ids]
            return [j.id for j in jobs if j and j.submit_started_at and j.request_id is None]

        in_flight = wait_until(submitting, timeout_s=15, what="a submit waiting for RunComfy")
        worker = own_stack.worker.process
        assert worker is not None
        # The main process only, as Kubernetes and Docker (with an init) send it: SIGTERM to the
        # whole group also kills the pool's children mid-step (systemd: KillMode=mixed).
        os.kill(worker.pid, signal.SIGTERM)
        assert worker.wait(40) == 0  # warm: the submits ended first
        for job_id in in_flight:
            job = store.get(job_id)
            assert job is not None and job.request_id is not None, job
            assert job.submit_unknown_outcomes == 0 and job.submit_started_at is None, job
    finally:
        own_stack.emulator("/_emulator/faults", method="POST", json={"rate_slow": 0.0})
        ensure_worker(own_stack)
    for job_id, prompt in zip(ids, prompts, strict=True):
        assert api.wait_final(job_id)["status"] == "succeeded"
        assert submits_for(own_stack, prompt) == 1


def submit_calls(stack: Stack) -> int:
    """Submits the emulator has received (counted on arrival, before any delay)."""
    return int(stack.emulator("/_emulator/stats").json()["calls"].get("submit", 0))


def unknown_outcomes_metric(api: ApiClient) -> float:
    """inpaint_gateway_submit_outcome_unknown_total as GET /metrics shows it."""
    text = api.get("/metrics").get_data(as_text=True)
    for family in text_string_to_metric_families(text):
        if family.name == "inpaint_gateway_submit_outcome_unknown":
            return sum(sample.value for sample in family.samples)
    raise AssertionError("no submit_outcome_unknown metric")


def test_a_worker_killed_during_a_submit_leaves_a_job_submitted_once_more(
    own_stack: Stack, api: ApiClient
) -> None:
    """SIGKILL while a submit waits for RunComfy (3 s): nothing is stored of its answer. Once
    the step's lease ends, the job's submit outcome is unknown — noted, counted (the workers'
    buffered counter, read through /metrics) — and it is submitted once more (SUBMIT_UNKNOWN=
    resubmit): it succeeds, with two submits at RunComfy, the killed one among them."""
    ensure_worker(own_stack)
    store = JobStore(connect_redis(own_stack.redis_server.url), retention_s=3600)
    counted_before = unknown_outcomes_metric(api)
    prompt = f"{unique('killed mid-submit')} [emulator:run=1]"
    calls_before = submit_calls(own_stack)
    own_stack.emulator("/_emulator/faults", method="POST", json={"rate_slow": 1.0, "slow_s": 3})
    try:
        job_id = post_until_accepted(api, job_body(own_stack, prompt))

        def submitting() -> bool:
            job = store.get(job_id)
            return job is not None and job.submit_started_at is not None and not job.request_id

        wait_until(submitting, timeout_s=15, what="the submit waiting for RunComfy")
        wait_until(  # and it has reached RunComfy (the kill must not land before it is sent)
            lambda: submit_calls(own_stack) > calls_before, timeout_s=10, what="the submit sent"
        )
        own_stack.worker.kill()
    finally:
        own_stack.emulator("/_emulator/faults", method="POST", json={"rate_slow": 0.0})
        ensure_worker(own_stack)
    assert api.wait_final(job_id, timeout_s=60)["status"] == "succeeded"
    job = store.get(job_id)
    assert job is not None
    assert job.submit_attempts == 2 and job.submit_unknown_outcomes == 1, job
    assert any("submit outcome unknown" in note for note in job.notes), job.notes
    assert submits_for(own_stack, prompt) == 2
    wait_until(
        lambda: unknown_outcomes_metric(api) == counted_before + 1,
        what="the unknown outcome counted",
    )


def test_worker_logs_are_json_lines_with_the_job(own_stack: Stack, api: ApiClient) -> None:
    ensure_worker(own_stack)
    job_id = post_until_accepted(api, job_body(own_stack, unique("logged")))
    api.wait_final(job_id)

    def finished_lines() -> list[dict[str, Any]]:
        lines = Path(own_stack.logs / "worker1.log").read_text(errors="replace").splitlines()
        records = [json.loads(line) for line in lines if line.startswith("{")]
        return [
            r for r in records if r.get("message") == "job finished" and r.get("job_id") == job_id
        ]

    # Logged just after the final status is stored (and the freed slot's wake-up sent): a moment
    # after the API shows it, on a busy machine.
    finished = wait_until(finished_lines, timeout_s=10, what="the job's 'job finished' line")
    assert finished[0]["upstream_request_id"] and finished[0]["level"] == "INFO"


def test_the_api_starts_and_answers_503_while_redis_is_down(own_stack: Stack) -> None:
    # An API replica may boot before Redis (or during its restart): it must come up, say it is
    # not ready, and refuse work with a retryable 503 — not crash-loop at import.
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    app = create_app(
        {
            "TESTING": True,
            "SETTINGS": own_stack.settings(REDIS_URL=nowhere, CELERY_BROKER_URL=nowhere),
        }
    )
    http = app.test_client()
    assert http.get("/healthz").status_code == 200
    assert http.get("/readyz").status_code == 503
    answer = http.post(
        "/v1/jobs", json={"prompt": "x"}, headers={"Authorization": "Bearer igw_whatever"}
    )
    assert answer.status_code == 503
    assert answer.headers["Content-Type"] == "application/problem+json"
    assert "Retry-After" in answer.headers
    assert http.get("/metrics").status_code == 503


def test_a_broker_drop_does_not_cut_a_submit_short(tmp_path: Path) -> None:
    """The broker (only) goes down while a submit is waiting for RunComfy's answer: the step
    finishes and stores the request id — one paid submit, no "outcome unknown". (With Celery's
    cancel-on-connection-loss, the task was terminated mid-call and the job submitted again.)"""
    broker = RedisServer(tmp_path / "broker", appendonly=False).start()
    slow = json.dumps({"rate_slow": 1.0, "slow_s": 3})
    stack = start_stack(  # one process: -c 2 meets kombu's reconnect bug first (and exits)
        tmp_path, env={"CELERY_BROKER_URL": broker.url, "EMULATOR_FAULTS": slow}, concurrency=1
    )
    try:
        app = create_app({"TESTING": True, "SETTINGS": stack.settings()})
        store = connect_redis(stack.redis_server.url)
        api = ApiClient(ClientStore(store).create("b"), app.test_client())
        prompt = unique("broker drop")
        job_id = post_until_accepted(api, job_body(stack, prompt))
        jobs = JobStore(store, retention_s=3600)
        wait_until(
            lambda: (job := jobs.get(job_id)) is not None and job.submit_started_at is not None,
            timeout_s=30,
            what="the submit under way",
        )
        time.sleep(0.5)  # the submit waits for its answer (3 s)
        broker.kill()
        time.sleep(2)
        broker.start()
        deadline = time.monotonic() + 60
        while (job := jobs.get(job_id)) is not None and not job.status.is_final:
            assert time.monotonic() < deadline, f"not final 60 s after the broker came back: {job}"
            ensure_worker(stack)  # the supervisor's part, should the worker exit
            time.sleep(0.5)
        assert job is not None and job.status.value == "succeeded", job
        assert job.submit_unknown_outcomes == 0 and submits_for(stack, prompt) == 1
        log = (stack.logs / "worker1.log").read_text(errors="replace")
        assert "Connection to broker lost" in log  # the drop was seen,
        assert "In Celery 5.1 we introduced" not in log  # without 6.0's warning, set on purpose
    finally:
        stack.stop()
        broker.stop()


def test_a_full_redis_is_a_503_and_stores_nothing(own_stack: Stack, tmp_path: Path) -> None:
    """Redis at its maxmemory under noeviction (deploy/redis.yaml) refuses writes: the POST is
    a retryable 503, as when Redis is down (it was a 500), and the job is not half-stored."""
    full = RedisServer(tmp_path / "full", appendonly=False).start()
    try:
        app = create_app(
            {
                "TESTING": True,
                "SETTINGS": own_stack.settings(REDIS_URL=full.url, CELERY_BROKER_URL=full.url),
            }
        )
        client = redis.Redis.from_url(full.url)
        creds = ClientStore(client).create("filled up")
        body = job_body(own_stack, unique("no room"))
        client.config_set("maxmemory", client.info("memory")["used_memory"])
        client.config_set("maxmemory-policy", "noeviction")
        keys_before = client.dbsize()
        answer = app.test_client().post(
            "/v1/jobs", json=body, headers={"Authorization": f"Bearer {creds.api_key}"}
        )
        assert answer.status_code == 503, answer.get_data(as_text=True)
        assert answer.headers["Content-Type"] == "application/problem+json"
        assert "Retry-After" in answer.headers
        assert client.dbsize() == keys_before
        client.close()
    finally:
        full.stop()
