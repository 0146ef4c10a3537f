"""`inpaint-gateway`: client management and the listener, run as the commands they are."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime
from typing import Any

import pytest
import redis
import requests
from standardwebhooks.webhooks import Webhook

from cli.processes import ManagedProcess, free_port, venv_script, wait_for_port
from core.clients import ClientStore
from tests.conftest import ApiClient, Stack, wait_until
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
