"""`inpaint-gateway`: client management and the listener, run as the commands they are."""

from __future__ import annotations

import json
import shlex
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import pytest
import redis
import requests
from standardwebhooks.webhooks import Webhook

from cli.stack import ManagedProcess, Stack, free_port, venv_script, wait_for_port, wait_until
from core.clients import MAX_RETIRED_SECRETS, SECRET_ROTATION_OVERLAP_S, ClientStore
from tests.support.api import ApiClient
from tests.test_end_to_end import job_body, unique

pytestmark = pytest.mark.integration


def cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "REDIS_URL": stack.redis_server.url}
    return subprocess.run(
        [venv_script("inpaint-gateway"), *args], env=env, capture_output=True, text=True, timeout=60
    )


def all_redis_values(client: redis.Redis) -> str:
    parts = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        if kind == "string":
            parts.append(str(client.get(key)))
        elif kind == "hash":
            parts.append(json.dumps(client.hgetall(key)))
        elif kind == "set":
            parts.append(" ".join(client.smembers(key)))
        parts.append(str(key))
    return "\n".join(parts)


def test_create_list_revoke(stack: Stack, redis_client: redis.Redis) -> None:
    created = cli(stack, "clients", "create", "team-a", "--json")
    assert created.returncode == 0, created.stderr
    creds = json.loads(created.stdout)
    assert set(creds) == {"client_id", "api_key", "webhook_secret"}
    assert creds["webhook_secret"].startswith("whsec_")
    store = ClientStore(redis_client)
    assert store.authenticate(creds["api_key"]).id == creds["client_id"]  # type: ignore[union-attr]
    assert creds["api_key"] not in all_redis_values(redis_client)  # only its hash is stored

    listed = cli(stack, "clients", "list", "--json")
    rows = {r["client_id"]: r for r in json.loads(listed.stdout)}
    assert rows[creds["client_id"]]["name"] == "team-a"
    assert creds["api_key"] not in listed.stdout and creds["webhook_secret"] not in listed.stdout

    assert cli(stack, "clients", "revoke", creds["client_id"]).returncode == 0
    assert store.authenticate(creds["api_key"]) is None
    assert cli(stack, "clients", "revoke", "cli_nope").returncode != 0


def test_the_store_url_may_come_from_a_file(stack: Stack, tmp_path: Any) -> None:
    """REDIS_URL_FILE (a mounted secret, as deploy/ recommends for a URL with a password) is
    read as the services read it — not ignored for localhost's Redis."""
    url_file = tmp_path / "redis-url"
    url_file.write_text(stack.redis_server.url + "\n")
    env = {"PATH": "/usr/bin:/bin", "REDIS_URL_FILE": str(url_file)}
    argv = [venv_script("inpaint-gateway"), "clients"]
    created = subprocess.run([*argv, "create", "from-file", "--json"], env=env,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert created.returncode == 0, created.stderr
    client_id = json.loads(created.stdout)["client_id"]
    listed = cli(stack, "clients", "list", "--json")  # by REDIS_URL: the same store
    assert client_id in {row["client_id"] for row in json.loads(listed.stdout)}


def test_unreachable_redis_is_one_clear_line() -> None:
    result = subprocess.run(
        [venv_script("inpaint-gateway"), "clients", "list"],
        env={"PATH": "/usr/bin:/bin", "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "not reachable" in result.stderr and "Traceback" not in result.stderr


def test_rotated_secret_signs_with_both(stack: Stack, app: Any, redis_client: redis.Redis) -> None:
    from cli.listener import WebhookReceiver

    store = ClientStore(redis_client)
    creds = store.create("rotating")
    rotated = json.loads(cli(stack, "clients", "rotate-secret", creds.client_id, "--json").stdout)
    assert rotated["webhook_secret"] != creds.webhook_secret
    old_rx = WebhookReceiver(secret=creds.webhook_secret).start()
    new_rx = WebhookReceiver(secret=rotated["webhook_secret"]).start()
    try:
        api = ApiClient(creds, app.test_client())
        for rx in (old_rx, new_rx):
            job = api.post(
                "/v1/jobs", json=job_body(stack, unique("rotate"), webhook_url=rx.url)
            ).get_json()
            api.wait_final(job["id"])
            assert (
                wait_until(rx.received, what="verified delivery")[0].payload["data"]["id"]
                == job["id"]
            )
            assert not rx.rejected
    finally:
        old_rx.stop()
        new_rx.stop()


def test_a_second_rotation_within_the_overlap_keeps_the_first_secret_signing(
    scratch: redis.Redis,
) -> None:
    """Each replaced secret signs for its own 24 h: a second rotation (say, the new secret was
    pasted in the wrong place) used to cut off the team still on the first one at once."""
    store = ClientStore(scratch)
    first = store.create("rotating twice")
    second = store.rotate_webhook_secret(first.client_id)
    third = store.rotate_webhook_secret(first.client_id)
    client = store.get(first.client_id)
    assert client is not None and second is not None and third is not None
    now = time.time()
    assert client.signing_secrets(now) == [third, second, first.webhook_secret]
    (_, second_until), (_, first_until) = client.retired_secrets(now)
    assert now + SECRET_ROTATION_OVERLAP_S - 60 < first_until < second_until
    assert client.signing_secrets((first_until + second_until) / 2) == [third, second]
    assert client.signing_secrets(second_until) == [third]


def test_rotations_keep_at_most_max_retired_secrets_signing(scratch: redis.Redis) -> None:
    store = ClientStore(scratch)
    creds = store.create("rotating often")
    issued = [creds.webhook_secret]
    for _ in range(MAX_RETIRED_SECRETS + 2):
        secret = store.rotate_webhook_secret(creds.client_id)
        assert secret is not None
        issued.append(secret)
    client = store.get(creds.client_id)
    assert client is not None
    assert client.signing_secrets(time.time()) == issued[::-1][: MAX_RETIRED_SECRETS + 1]


def test_client_records_stay_readable_across_releases(scratch: redis.Redis) -> None:
    """The previous release reads a record only if it has no field it does not know: the
    earlier secrets are stored only when there are some; and a later release's field is passed
    over when read here."""
    store = ClientStore(scratch)
    creds = store.create("mixed releases")
    store.rotate_webhook_secret(creds.client_id)
    key = f"igw:apiclient:{creds.client_id}"
    record = json.loads(scratch.get(key) or "")
    assert "earlier_webhook_secrets" not in record  # one rotation: as the previous release wrote
    scratch.set(key, json.dumps(record | {"field_of_a_later_release": 1}))
    client = store.get(creds.client_id)
    assert client is not None and client.previous_webhook_secret == creds.webhook_secret


def test_rotations_and_a_revoke_at_once_lose_none_of_each_other(scratch: redis.Redis) -> None:
    """Each change is computed on the record as it is when written: rotations at once each
    keep their secret signing, and a revoke among them stays a revoke."""
    store = ClientStore(scratch)
    creds = store.create("busy operators")
    start = threading.Barrier(MAX_RETIRED_SECRETS)

    def rotate() -> str | None:
        start.wait()
        return store.rotate_webhook_secret(creds.client_id)

    def revoke() -> str | None:
        start.wait()
        store.revoke(creds.client_id)
        return None

    jobs = [rotate] * (MAX_RETIRED_SECRETS - 1) + [revoke]
    with ThreadPoolExecutor(len(jobs)) as pool:
        issued = {secret for secret in pool.map(lambda job: job(), jobs) if secret}
    client = store.get(creds.client_id)
    assert client is not None and client.revoked_at is not None
    assert set(client.signing_secrets(time.time())) == issued | {creds.webhook_secret}


def test_listen_verifies_and_prints(tmp_path: Any) -> None:
    secret = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    port = free_port()
    log = tmp_path / "listen.log"
    listener = ManagedProcess(
        "listen", [venv_script("inpaint-gateway"), "listen", "--port", str(port), "--secret", secret],
        env={"PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"}, log_path=log,
    ).start()  # fmt: skip
    try:
        wait_for_port(port, process=listener.process)
        body = json.dumps(
            {
                "type": "job.succeeded",
                "timestamp": "t",
                "data": {"id": "job_1", "status": "succeeded"},
            }
        )
        now = datetime.now(UTC)
        signature = Webhook(secret).sign("msg_1", now, body)
        headers = {
            "webhook-id": "msg_1",
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": signature,
        }
        url = f"http://127.0.0.1:{port}/webhook"
        assert requests.post(url, data=body, headers=headers, timeout=5).status_code == 204
        forged = headers | {"webhook-signature": "v1,AAAA" + signature[7:]}
        assert requests.post(url, data=body, headers=forged, timeout=5).status_code == 401
        line = wait_until(
            lambda: [x for x in log.read_text().splitlines() if x.startswith("{")],
            what="printed event",
        )
        assert json.loads(line[0])["job_id"] == "job_1" and len(line) == 1
        refusals = wait_until(
            lambda: [x for x in log.read_text().splitlines() if x.startswith("refused delivery")],
            what="printed refusal",
        )
        assert len(refusals) == 1
        assert refusals[0].startswith("refused delivery msg_1: answered 401, bad signature: ")
    finally:
        listener.stop()


def test_the_listener_keeps_connections_alive_until_it_stops() -> None:
    """As a real receiver does: several webhooks on one connection; stopped, it answers none."""
    import http.client

    from cli.listener import WebhookReceiver

    secret = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    receiver = WebhookReceiver(secret=secret).start()
    connection = http.client.HTTPConnection("127.0.0.1", receiver.port, timeout=5)
    try:
        for n in range(3):
            body = json.dumps({"type": "job.succeeded", "timestamp": "t", "data": {"n": n}})
            now = datetime.now(UTC)
            headers = {
                "webhook-id": f"msg_{n}",
                "webhook-timestamp": str(int(now.timestamp())),
                "webhook-signature": Webhook(secret).sign(f"msg_{n}", now, body),
            }
            connection.request("POST", "/webhook", body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            assert response.status == 204 and not response.will_close
            if n == 0:
                port_of_first = connection.sock.getsockname()[1]
        assert connection.sock.getsockname()[1] == port_of_first  # one connection for all three
        assert [e.webhook_id for e in receiver.received()] == ["msg_0", "msg_1", "msg_2"]
        chunked = requests.post(receiver.url, data=iter([b"{}"]), timeout=5)  # no length given
        assert chunked.status_code == 411
        receiver.stop()
        with pytest.raises((http.client.HTTPException, OSError)):
            connection.request("POST", "/webhook", body="{}", headers={"webhook-id": "msg_3"})
            connection.getresponse()
        assert len(receiver.received()) == 3
    finally:
        connection.close()
        receiver.stop()


def test_up_stops_with_one_line_when_the_api_port_is_taken(tmp_path: Any) -> None:
    """Something else on the API's port answered the printed curl while gunicorn failed to bind
    and was restarted every 2 s behind the welcome."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [venv_script("inpaint-gateway"), "up", "--api-port", str(port)],
            cwd=tmp_path, env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
    assert result.returncode != 0
    assert f"port {port} (api) is in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_clients_say_which_redis_they_read(stack: Stack) -> None:
    """Against another Redis on the same port, `clients list` printed nothing, and nothing said
    where it had looked."""
    listed = cli(stack, "clients", "list")
    assert listed.returncode == 0, listed.stderr
    assert f"clients: Redis at {stack.redis_server.url} (REDIS_URL)" in listed.stderr.splitlines()
    unset = subprocess.run(
        [venv_script("inpaint-gateway"), "clients", "list"], env={"PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "clients: Redis at redis://localhost:6379/0 (the default: REDIS_URL is unset)" in (
        unset.stderr
    )


def test_the_redis_line_hides_the_password() -> None:
    port = free_port()
    result = subprocess.run(
        [venv_script("inpaint-gateway"), "clients", "list"],
        env={"PATH": "/usr/bin:/bin", "REDIS_URL": f"redis://admin:s3cret@127.0.0.1:{port}/2"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert f"clients: Redis at redis://admin:***@127.0.0.1:{port}/2 (REDIS_URL)" in result.stderr
    assert "s3cret" not in result.stderr + result.stdout


def test_the_sample_prompt_speaks_of_what_the_sample_mask_covers() -> None:
    """The welcome's curl asked to paint the sky over a mask that covers the house."""
    from io import BytesIO

    from PIL import Image

    from cli.stack import EMULATOR_SAMPLE_PROMPT, sample_job_body
    from emulator.images import make_sample_image, make_sample_mask

    body = sample_job_body("http://emulator")
    assert body["mask_image_url"] == "http://emulator/samples/mask.png"
    image = Image.open(BytesIO(make_sample_image())).convert("RGB")
    mask = Image.open(BytesIO(make_sample_mask())).convert("L")
    wall, sky = (200, 60, 50), (0, 0)
    walls = [xy for xy in _pixels(image) if image.getpixel(xy) == wall]
    assert walls and all(mask.getpixel(xy) == 255 for xy in walls)  # the house: repainted
    assert mask.getpixel(sky) == 0  # the sky: kept
    assert "house" in body["prompt"] and "sky" not in body["prompt"]
    assert body["prompt"] == EMULATOR_SAMPLE_PROMPT


def _pixels(image: Any) -> list[tuple[int, int]]:
    return [(x, y) for x in range(0, image.width, 4) for y in range(0, image.height, 4)]


def test_failed_webhook_attempts_are_reported_from_the_worker_log(
    stack: Stack, api_client: ApiClient
) -> None:
    """make run's listener sees only the deliveries that reach it; a webhook_url that answers
    500 failed in silence. The lines come from the real worker's log."""
    from cli.devstack import FailedAttemptReporter
    from cli.listener import WebhookReceiver

    shown: list[str] = []
    reporter = FailedAttemptReporter(stack.logs / f"{stack.worker.name}.log", shown.append)
    failing = WebhookReceiver(secret=api_client.creds.webhook_secret, forced_status=500).start()
    try:
        job = api_client.post(
            "/v1/jobs", json=job_body(stack, unique("failing hook"), webhook_url=failing.url)
        ).get_json()
        api_client.wait_final(job["id"])

        def reported() -> list[str]:
            reporter.poll()
            return [line for line in shown if job["id"] in line]

        lines = wait_until(reported, what="the failed attempt reported")
    finally:
        failing.stop()
    assert lines[0] == (
        f"webhook job.succeeded for {job['id']}: attempt 1 failed (HTTP 500); will retry"
    )


def test_the_failed_attempt_reporter_reads_only_new_whole_lines(tmp_path: Any) -> None:
    from cli.devstack import FailedAttemptReporter

    log = tmp_path / "worker.log"
    attempt = {"message": "webhook attempt", "job_id": "job_1", "event_type": "job.failed",
               "attempt": 3, "error": "timed out after 15 s", "state": "exhausted"}  # fmt: skip
    log.write_text(json.dumps(attempt) + "\n")  # an earlier run's
    shown: list[str] = []
    reporter = FailedAttemptReporter(log, shown.append)
    reporter.poll()
    assert shown == []
    with log.open("a") as out:
        out.write("not json\n" + json.dumps(attempt | {"error": None, "state": "delivered"}) + "\n")
        out.write(json.dumps(attempt)[:20])  # half written
    reporter.poll()
    assert shown == []
    with log.open("a") as out:
        out.write(json.dumps(attempt)[20:] + "\n")
    reporter.poll()
    assert shown == [
        "webhook job.failed for job_1: attempt 3 failed (timed out after 15 s); no attempts left"
    ]


def test_up_runs_the_stack_prints_a_curl_that_works_and_stops_on_ctrl_c(
    stack: Stack, tmp_path: Any
) -> None:
    """make run end to end, on the session's Redis (a database of its own): the welcome's curl
    submits the sample job, its verified webhook is printed, so is a failed attempt, and
    Ctrl-C stops every process it started."""
    redis_url = stack.redis_url.rsplit("/", 1)[0] + "/6"
    ports = {option: free_port() for option in ("--api-port", "--listener-port", "--emulator-port")}
    log = tmp_path / "up.log"
    argv = [venv_script("inpaint-gateway"), "up", "--workers", "1"]
    env = {"PATH": "/usr/bin:/bin", "REDIS_URL": redis_url, "WEB_CONCURRENCY": "1",
           "PYTHONUNBUFFERED": "1"}  # fmt: skip
    up = ManagedProcess("up", [*argv, *(str(v) for kv in ports.items() for v in kv)],
                        env=env, log_path=log, cwd=tmp_path).start()  # fmt: skip
    try:
        text = wait_until(
            lambda: "--data-binary" in (t := log.read_text()) and t, timeout_s=90,
            what="the welcome",
        )  # fmt: skip
        curl = shlex.split(text.split("Submit the sample job:", 1)[1].split("Then:", 1)[0])
        headers = dict(curl[i + 1].split(": ", 1) for i, w in enumerate(curl) if w == "-H")
        body = json.loads(curl[curl.index("-d") + 1])
        assert "house" in body["prompt"]
        job = requests.post(curl[curl.index("POST") + 1], json=body, headers=headers, timeout=10)
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]

        # The upload curl, as printed: the sample picture piped from the emulator into POST.
        upload_line = next(line for line in text.splitlines() if "/v1/uploads" in line)
        uploaded = subprocess.run(["bash", "-o", "pipefail", "-c", upload_line],
                                  capture_output=True, text=True, timeout=30)  # fmt: skip
        assert uploaded.returncode == 0, uploaded.stderr
        assert json.loads(uploaded.stdout)["ref"].startswith("upload:upl_"), uploaded.stdout

        def printed(wanted: str) -> list[str]:
            return [line for line in log.read_text().splitlines() if wanted in line]

        event = wait_until(lambda: printed(f'"job_id": "{job_id}"'), timeout_s=60, what="event")
        assert json.loads(event[0])["verified"] is True
        down = f"http://127.0.0.1:{free_port()}/webhook"
        failing = requests.post(
            curl[curl.index("POST") + 1], json=body | {"webhook_url": down}, headers=headers,
            timeout=10,
        ).json()["id"]  # fmt: skip
        attempt = wait_until(lambda: printed(f"for {failing}: attempt 1 failed"), timeout_s=60,
                             what="the failed attempt shown")  # fmt: skip
        assert "could not connect" in attempt[0] and "will retry" in attempt[0]
        up.signal(signal.SIGINT)
        assert up.process is not None and up.process.wait(60) == 0
        assert printed("[make run] stopped")
        for port in ports.values():  # nothing it started listens any more
            with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                pass
    finally:
        up.stop()
        client = redis.Redis.from_url(redis_url)
        client.flushdb()
        client.close()


def test_the_makefile_python_probe_is_quiet_about_missing_or_broken_pythons(
    tmp_path: Any,
) -> None:
    """pyenv's shims answer `command -v python3.13` and then fail loudly when run: every
    `make` printed their complaints."""
    import shutil
    import sys
    from pathlib import Path

    make = shutil.which("make")
    if make is None:
        pytest.skip("no make binary (apt-get install make)")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    broken = bin_dir / "python3.13"
    broken.write_text("#!/bin/sh\necho 'pyenv: python3.13: command not found' >&2\nexit 127\n")
    broken.chmod(0o755)
    (bin_dir / "python3.11").symlink_to(sys.executable)  # python3.12: missing (only bin_dir
    # is on PATH: a python3.12 of the machine's would be found first)
    makefile = Path(__file__).resolve().parent.parent / "Makefile"
    probe = subprocess.run(
        # The ";" has make run the recipe through sh (whose echo is built in: no PATH needed).
        [make, "-s", "-f", str(makefile), "--eval", "probe: ; @echo $(PYTHON);", "probe"],
        cwd=tmp_path, env={"PATH": str(bin_dir)}, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    assert probe.stderr == ""
    assert probe.stdout.strip() == str(bin_dir / "python3.11")


def test_an_operator_sets_shows_and_clears_a_clients_limits(
    stack: Stack, redis_client: redis.Redis, api_client: ApiClient
) -> None:
    client_id = api_client.creds.client_id
    set_ = cli(
        stack, "clients", "set-limits", client_id, "--max-in-flight", "3", "--rate-per-min", "60",
        "--budget-usd", "12.5", "--budget-period", "month", "--json",
    )  # fmt: skip
    assert set_.returncode == 0, set_.stderr
    assert json.loads(set_.stdout)["limits"] == {
        "max_in_flight": 3, "max_queued": None, "rate_per_min": 60,
        "budget_usd": 12.5, "budget_period": "month",
    }  # fmt: skip
    # Named limits change; the others keep their value.
    assert cli(stack, "clients", "set-limits", client_id, "--max-queued", "50").returncode == 0
    stored = ClientStore(redis_client).get(client_id)
    assert stored is not None and stored.limits.max_queued == 50
    assert stored.limits.max_in_flight == 3 and stored.limits.budget_usd == 12.5
    listed = cli(stack, "clients", "list").stdout
    row = next(line for line in listed.splitlines() if line.startswith(client_id))
    assert "--max-in-flight 3 --max-queued 50 --rate-per-min 60" in row
    assert "--budget-usd 12.5 --budget-period month" in row

    job = api_client.post("/v1/jobs", json=job_body(stack)).get_json()
    api_client.wait_final(job["id"])
    shown = json.loads(cli(stack, "clients", "show", client_id, "--json").stdout)
    assert shown["limits"]["max_queued"] == 50 and shown["unfinished"] == 0
    assert shown["this_month"]["jobs"]["succeeded"] >= 1
    assert shown["budget"]["period"] == "month" and shown["budget"]["limit_usd"] == 12.5
    assert shown["budget"]["spent_usd"] == pytest.approx(shown["this_month"]["cost_usd"])
    text = cli(stack, "clients", "show", client_id).stdout
    assert "budget:" in text and "12.5 USD a month" in text
    assert api_client.creds.api_key not in text + json.dumps(shown)

    cleared = cli(stack, "clients", "set-limits", client_id, "--clear")
    assert cleared.returncode == 0 and cleared.stdout.strip() == "no limits"
    half = cli(stack, "clients", "set-limits", client_id, "--budget-usd", "5")
    assert half.returncode != 0 and "--budget-period" in half.stderr
    assert cli(stack, "clients", "set-limits", "cli_nope", "--max-queued", "1").returncode != 0
    assert cli(stack, "clients", "set-limits", client_id, "--max-queued", "0").returncode != 0


def test_rotate_key_prints_a_new_key_and_the_old_one_ends_after_its_overlap(
    stack: Stack, redis_client: redis.Redis
) -> None:
    store = ClientStore(redis_client)
    creds = store.create("rotating")
    rotated = cli(stack, "clients", "rotate-key", creds.client_id, "--overlap-s", "1", "--json")
    assert rotated.returncode == 0, rotated.stderr
    answer = json.loads(rotated.stdout)
    assert answer["client_id"] == creds.client_id and answer["api_key"].startswith("igw_")
    assert store.authenticate(answer["api_key"]) is not None
    assert store.authenticate(creds.api_key) is not None  # within the overlap
    wait_until(lambda: store.authenticate(creds.api_key) is None, timeout_s=3)
    assert store.authenticate(answer["api_key"]) is not None


def test_clients_usage_shows_every_clients_jobs_and_spend(
    stack: Stack, api_client: ApiClient
) -> None:
    job = api_client.post("/v1/jobs", json=job_body(stack)).get_json()
    done = api_client.wait_final(job["id"])
    assert done["cost"] is not None
    client_id = api_client.creds.client_id
    rows = json.loads(cli(stack, "clients", "usage", "--client", client_id, "--json").stdout)
    assert [row["client_id"] for row in rows] == [client_id]
    assert rows[0]["total"]["jobs"]["succeeded"] == 1
    assert rows[0]["total"]["cost_usd"] == pytest.approx(done["cost"]["usd"])
    api = api_client.get("/v1/usage").get_json()
    assert api["total"] == rows[0]["total"]  # the operator and the team see the same figures
    table = cli(stack, "clients", "usage").stdout
    line = next(line for line in table.splitlines() if line.startswith(client_id))
    assert f"{done['cost']['usd']:.4f}" in line
    assert (
        cli(stack, "clients", "usage", "--from", "2026-02-02", "--to", "2026-02-01").returncode != 0
    )
    assert cli(stack, "clients", "usage", "--client", "cli_nope").returncode != 0
