"""Bad requests to the HTTP API: each gets the right 4xx as problem+json, and nothing is written.

The app under test runs on its own Redis database (db 2 of the stack's redis-server) for both the
store and the Celery broker, so no worker or beat ever touches it: whatever a request wrote, or
enqueued on the `jobs` broker list, is still there to see. Every bad request is checked against a
full snapshot of that database (every key, its type and its whole value) taken just before it; a
positive control shows the same check does see a valid request's job and broker message.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import pytest
import redis
from flask import url_for
from openapi_spec_validator import validate
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from cli.stack import EMULATOR_TOKEN, Stack
from core.clients import ClientStore, NewClientCredentials
from core.http import egress
from core.http.egress import EgressPolicy
from core.http.names import NameLookup
from core.outbox import WebhookOutbox
from core.store import PREFIX, connect_redis
from core.wakeups import JOBS_QUEUE
from service import MAX_BODY_BYTES
from service.jobs import job_location
from service.schemas import (
    INPUT_FIELDS,
    MAX_METADATA_BYTES,
    MAX_METADATA_DEPTH,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_URL_CHARS,
)
from tests.support.peers import dns_peer

pytestmark = pytest.mark.integration

ISOLATED_DB = 2
WAKEUP_FLAGS = PREFIX + "wakeup:*"  # 2-second "a wake-up is pending" flags (core/wakeups.py)
PROBLEM_JSON = "application/problem+json"

# A request body that is accepted as is (test_the_base_body_is_accepted proves it), so each bad case
# below differs from an accepted request only in what it names. Image URLs are not fetched at submit.
VALID: dict[str, Any] = {
    "prompt": "paint the sky red",
    "image_url": "https://images.example.com/in.png",
    "mask_image_url": "https://images.example.com/mask.png",
}


def body(**overrides: Any) -> dict[str, Any]:
    """VALID with fields replaced or added."""
    return {**VALID, **overrides}


def without(name: str) -> dict[str, Any]:
    """VALID minus one field."""
    return {k: v for k, v in VALID.items() if k != name}


def raw_json(text_after_open_brace: str) -> str:
    """VALID as JSON text with more members spliced in verbatim (for literals json.dumps refuses)."""
    return "{" + text_after_open_brace + "," + json.dumps(VALID)[1:]


# --- the isolated app -----------------------------------------------------------------------


@dataclass
class Isolated:
    """An API app whose store and broker are Redis db 2, and the clients and jobs in it."""

    redis: redis.Redis
    http: Any
    alice: NewClientCredentials
    bob: NewClientCredentials
    revoked: NewClientCredentials
    job_ids: dict[str, str]  # alice_queued, alice_final, bob_job

    def auth(self, who: str) -> dict[str, str]:
        """The Authorization header for one of the AUTH modes."""
        return {
            "alice": {"Authorization": f"Bearer {self.alice.api_key}"},
            "none": {},
            "basic": {"Authorization": "Basic dXNlcjpwYXNzd29yZA=="},
            "bare_key": {"Authorization": self.alice.api_key},
            "empty_bearer": {"Authorization": "Bearer "},
            "unknown": {"Authorization": "Bearer igw_" + "A" * 43},
            "revoked": {"Authorization": f"Bearer {self.revoked.api_key}"},
        }[who]

    def secrets(self) -> list[str]:
        """Strings that must never appear in an answer to a bad request."""
        return [
            self.alice.api_key,
            self.alice.webhook_secret,
            self.revoked.api_key,
            self.bob.api_key,
            "whsec_",
            EMULATOR_TOKEN,
            "redis://",
        ]

    def forget_wakeups(self) -> None:
        """Drop the 2-second wake-up flags so that no key expires between two snapshots."""
        flags = self.redis.keys(WAKEUP_FLAGS)
        if flags:
            self.redis.delete(*flags)


def redis_db_url(server_url: str, db: int) -> str:
    base, _, current = server_url.rpartition("/")
    assert current.isdigit(), f"expected a redis URL ending in /<db>, got {server_url}"
    return f"{base}/{db}"


@pytest.fixture(scope="module")
def isolated(stack: Stack, make_app: Callable[..., Any]) -> Iterator[Isolated]:
    url = redis_db_url(stack.redis_server.url, ISOLATED_DB)
    client = connect_redis(url)
    client.flushdb()
    app = make_app(REDIS_URL=url, CELERY_BROKER_URL=url, WEBHOOK_ALLOWED_NETWORKS="")
    settings = app.extensions["inpaint_gateway"].settings
    assert settings.redis_url == url and settings.celery_broker_url == url
    assert settings.webhook_allowed_networks == ()

    clients = ClientStore(client)
    alice, bob, revoked = (clients.create(name) for name in ("alice", "bob", "revoked"))
    assert clients.revoke(revoked.client_id)
    http = app.test_client()

    def submit(creds: NewClientCredentials) -> str:
        resp = http.post(
            "/v1/jobs", json=VALID, headers={"Authorization": f"Bearer {creds.api_key}"}
        )
        assert resp.status_code == 202, resp.get_data(as_text=True)
        return str(resp.get_json()["id"])

    job_ids = {"alice_queued": submit(alice), "alice_final": submit(alice), "bob_job": submit(bob)}
    cancelled = http.post(
        f"/v1/jobs/{job_ids['alice_final']}/cancel",
        headers={"Authorization": f"Bearer {alice.api_key}"},
    )
    assert cancelled.status_code == 202 and cancelled.get_json()["status"] == "cancelled"
    # The lists a job with a webhook has beside its record (its events, their attempts): a path
    # naming one of those keys must find no job.
    client.rpush(WebhookOutbox.job_events_key(job_ids["alice_final"]), "msg_0")
    client.rpush(WebhookOutbox.deliveries_key(job_ids["alice_final"]), "{}")

    iso = Isolated(client, http, alice, bob, revoked, job_ids)
    iso.forget_wakeups()
    yield iso
    client.flushdb()
    client.close()


def snapshot(client: redis.Redis) -> dict[str, tuple[str, Any]]:
    """Every key in the database with its type and whole value."""
    state: dict[str, tuple[str, Any]] = {}
    for key in map(str, client.keys("*")):  # text already: decode_responses=True
        kind = str(client.type(key))
        value: Any
        if kind == "string":
            value = client.get(key)
        elif kind == "list":
            value = tuple(client.lrange(key, 0, -1))
        elif kind == "set":
            value = tuple(sorted(client.smembers(key)))
        elif kind == "zset":
            value = tuple(client.zrange(key, 0, -1, withscores=True))
        elif kind == "hash":
            value = tuple(sorted(client.hgetall(key).items()))
        elif kind == "none":  # expired between KEYS and TYPE
            continue
        else:
            raise AssertionError(f"key {key!r} has a type this snapshot does not read: {kind}")
        state[key] = (kind, value)
    return state


def changes(before: dict[str, tuple[str, Any]], after: dict[str, tuple[str, Any]]) -> list[str]:
    """Readable differences between two snapshots."""
    added = [f"+ {k} {after[k][0]}" for k in sorted(after.keys() - before.keys())]
    removed = [f"- {k}" for k in sorted(before.keys() - after.keys())]
    changed = [f"~ {k}" for k in sorted(before.keys() & after.keys()) if before[k] != after[k]]
    return added + removed + changed


# --- the bad requests -----------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    """One bad request and the answer it must get."""

    status: int
    errors: frozenset[str] | None = None  # for 422: exactly the fields that must be named
    method: str = "POST"
    path: str = "/v1/jobs"  # may name {alice_queued}, {alice_final}, {bob_job}
    json: Any = None  # sent as JSON (json.dumps) unless `data` is given
    data: str | bytes | None = None  # sent verbatim
    content_type: str | None = "application/json"
    auth: str = "alice"
    headers: tuple[tuple[str, str], ...] = ()


def fields(*names: str) -> frozenset[str]:
    return frozenset(names)


def invalid(errors: frozenset[str], payload: Any) -> Bad:
    """A POST /v1/jobs with a JSON body that must be a 422 naming exactly `errors`."""
    return Bad(422, errors, json=payload)


def bad_webhook(url: str) -> Bad:
    return invalid(fields("webhook_url"), body(webhook_url=url))


def query(qs: str, *names: str) -> Bad:
    return Bad(422, fields(*names), method="GET", path="/v1/jobs?" + qs, content_type=None)


LONG_URL = "https://images.example.com/" + "a" * MAX_URL_CHARS
TOO_MANY_LORAS = [{"path": f"owner/lora-{i}"} for i in range(4)]
BIG_METADATA = {"blob": "x" * MAX_METADATA_BYTES}


def nested(depth: int) -> dict[str, Any]:
    """An object `depth` (2 or more) levels deep, itself the first, an empty list the last."""
    value: Any = []
    for _ in range(depth - 1):
        value = {"a": value}
    assert isinstance(value, dict)
    return value


GZIP = (("Content-Encoding", "gzip"),)
NAN_CURSOR = base64.urlsafe_b64encode(b"nan|job_x").decode().rstrip("=")  # decodes, floats to NaN
DEEP_JSON = '{"metadata": {"a": ' + "[" * 20_000 + "]" * 20_000 + "}}"  # well under 64 KiB


BAD_REQUESTS = [
    # --- the body as a whole
    pytest.param(Bad(400, data='{"prompt": "paint",'), id="malformed-json"),
    pytest.param(Bad(400, data="{'prompt': 'single quotes'}"), id="python-dict-not-json"),
    pytest.param(Bad(400, data=b'{"prompt": "\xff\xfe"}'), id="invalid-utf8-body"),
    pytest.param(
        Bad(400, data=DEEP_JSON),
        id="json-nested-20000-deep",
    ),
    pytest.param(Bad(422, fields("body"), data="[1, 2]"), id="json-array-body"),
    pytest.param(Bad(422, fields("body"), data='"paint the sky"'), id="json-string-body"),
    pytest.param(Bad(422, fields("body"), data="42"), id="json-number-body"),
    pytest.param(Bad(422, fields("body"), data="null"), id="json-null-body"),
    pytest.param(
        Bad(422, fields("prompt", "image_url", "mask_image_url"), data=b""),
        id="empty-body-json-content-type",
    ),
    pytest.param(
        Bad(422, fields("prompt", "image_url", "mask_image_url"), data=b"", content_type=None),
        id="empty-body-no-content-type",
    ),
    pytest.param(
        Bad(415, data=json.dumps(VALID), content_type="text/plain"), id="content-type-text-plain"
    ),
    pytest.param(
        Bad(415, data="prompt=x", content_type="application/x-www-form-urlencoded"),
        id="content-type-form",
    ),
    pytest.param(Bad(415, data=json.dumps(VALID), content_type=None), id="content-type-missing"),
    pytest.param(
        Bad(415, data=gzip.compress(json.dumps(VALID).encode()), headers=GZIP), id="gzip-body"
    ),
    pytest.param(  # as if it were compressed: taken as it is, it was accepted
        Bad(415, data=json.dumps(VALID), headers=(("Content-Encoding", "br"),)), id="br-body"
    ),
    pytest.param(Bad(422, fields("foo"), path="/v1/jobs?foo=1", json=VALID), id="post-query-foo"),
    pytest.param(
        Bad(
            422,
            fields("foo"),
            method="GET",
            path="/v1/jobs/{alice_queued}?foo=1",
            content_type=None,
        ),
        id="get-job-query-foo",
    ),
    pytest.param(
        Bad(413, data=json.dumps(body(metadata={"pad": "x" * 65 * 1024}))), id="body-over-64KiB"
    ),
    # --- required fields and the prompt
    pytest.param(invalid(fields("prompt"), without("prompt")), id="missing-prompt"),
    pytest.param(invalid(fields("image_url"), without("image_url")), id="missing-image_url"),
    pytest.param(
        invalid(fields("mask_image_url"), without("mask_image_url")), id="missing-mask_image_url"
    ),
    pytest.param(invalid(fields("prompt"), body(prompt="")), id="empty-prompt"),
    pytest.param(invalid(fields("prompt"), body(prompt=" \t\n ")), id="blank-prompt"),
    pytest.param(
        invalid(fields("prompt"), body(prompt="x" * (MAX_PROMPT_CHARS + 1))), id="prompt-8001-chars"
    ),
    pytest.param(invalid(fields("prompt"), body(prompt=None)), id="null-prompt"),
    # --- unknown fields
    pytest.param(
        invalid(fields("num_inference_step"), body(num_inference_step=20)),
        id="misspelt-num_inference_step",
    ),
    pytest.param(invalid(fields("input"), body(input={"seed": 1})), id="unknown-field-input"),
    # --- wrong types
    pytest.param(invalid(fields("strength"), body(strength="0.5")), id="string-for-float"),
    pytest.param(invalid(fields("control_scale"), body(control_scale=True)), id="bool-for-float"),
    pytest.param(
        invalid(fields("num_inference_steps"), body(num_inference_steps=True)), id="bool-for-int"
    ),
    pytest.param(
        invalid(fields("num_inference_steps"), body(num_inference_steps=2.5)), id="float-for-int"
    ),
    pytest.param(
        invalid(fields("num_inference_steps"), body(num_inference_steps="20")), id="string-for-int"
    ),
    pytest.param(invalid(fields("seed"), body(seed=7.5)), id="fraction-for-seed"),
    pytest.param(invalid(fields("prompt"), body(prompt={"text": "sky"})), id="object-for-prompt"),
    pytest.param(invalid(fields("prompt"), body(prompt=["sky"])), id="list-for-prompt"),
    pytest.param(invalid(fields("loras"), body(loras="owner/lora")), id="string-for-loras"),
    pytest.param(invalid(fields("image_size"), body(image_size=1)), id="int-for-image_size"),
    # --- numeric ranges
    *(
        pytest.param(invalid(fields(name), body(**{name: value})), id=f"{name}-{value}")
        for name in ("control_start", "control_end", "control_scale", "strength")
        for value in (-0.01, 1.01)
    ),
    pytest.param(
        invalid(fields("num_inference_steps"), body(num_inference_steps=0)),
        id="num_inference_steps-0",
    ),
    pytest.param(
        invalid(fields("num_inference_steps"), body(num_inference_steps=31)),
        id="num_inference_steps-31",
    ),
    pytest.param(invalid(fields("seed"), body(seed=-1)), id="seed-negative"),
    pytest.param(invalid(fields("seed"), body(seed=MAX_SEED + 1)), id="seed-over-2**53-1"),
    pytest.param(
        invalid(fields("control_start"), body(control_start=0.8, control_end=0.5)),
        id="control_start-after-control_end",
    ),
    pytest.param(
        invalid(fields("control_start"), body(control_start=0.7)),
        id="control_start-after-default-control_end",
    ),
    # --- NaN and infinities: not JSON (Python's json module would read them), so a 400
    pytest.param(Bad(400, data=raw_json('"strength": NaN')), id="NaN-strength"),
    pytest.param(
        Bad(400, data=raw_json('"control_scale": Infinity')),
        id="Infinity-control_scale",
    ),
    pytest.param(
        Bad(400, data=raw_json('"control_end": -Infinity')),
        id="minus-Infinity-control_end",
    ),
    pytest.param(
        Bad(400, data=raw_json('"loras": [{"path": "a/b", "scale": NaN}]')),
        id="NaN-lora-scale",
    ),
    pytest.param(
        Bad(400, data=raw_json('"num_inference_steps": NaN')),
        id="NaN-num_inference_steps",
    ),
    pytest.param(Bad(400, data=raw_json('"seed": Infinity')), id="Infinity-seed"),
    pytest.param(Bad(400, data=raw_json('"strength": 1e400')), id="overflowing-1e400"),
    # --- loras
    pytest.param(invalid(fields("loras"), body(loras=TOO_MANY_LORAS)), id="four-loras"),
    pytest.param(invalid(fields("loras.0.path"), body(loras=[{"scale": 1}])), id="lora-no-path"),
    pytest.param(
        invalid(fields("loras.1.path"), body(loras=[{"path": "a/b"}, {"path": ""}])),
        id="lora-empty-path",
    ),
    pytest.param(
        invalid(fields("loras.0.weight"), body(loras=[{"path": "a/b", "weight": 1}])),
        id="lora-unknown-key",
    ),
    pytest.param(
        invalid(fields("loras.0.scale"), body(loras=[{"path": "a/b", "scale": 5}])),
        id="lora-scale-5",
    ),
    pytest.param(
        invalid(fields("loras.0.scale"), body(loras=[{"path": "a/b", "scale": -0.5}])),
        id="lora-scale-negative",
    ),
    pytest.param(invalid(fields("loras.0"), body(loras=["owner/lora"])), id="lora-not-an-object"),
    # --- enums
    pytest.param(invalid(fields("image_size"), body(image_size="huge")), id="image_size-huge"),
    pytest.param(
        invalid(fields("image_size"), body(image_size="SQUARE_HD")), id="image_size-wrong-case"
    ),
    pytest.param(
        invalid(fields("output_format"), body(output_format="gif")), id="output_format-gif"
    ),
    # --- image URLs
    *(
        pytest.param(invalid(fields(name), body(**{name: url})), id=f"{name}-{label}")
        for name in ("image_url", "mask_image_url")
        for label, url in (
            ("ftp", "ftp://images.example.com/in.png"),
            ("javascript", "javascript:alert(1)"),
            ("no-scheme", "images.example.com/in.png"),
            ("over-4096-chars", LONG_URL),
            ("port-out-of-range", "https://images.example.com:99999/in.png"),
            ("port-0", "https://images.example.com:0/in.png"),
            ("nul-at-the-end", "https://images.example.com/in.png\x00"),
            ("newline-inside", "https://images.example.com/in\n.png"),
            ("user-and-password", "https://me:s3cret@images.example.com/in.png"),
        )
    ),
    # --- webhook URLs: malformed
    pytest.param(bad_webhook("ftp://hooks.example.com/x"), id="webhook_url-ftp"),
    pytest.param(bad_webhook("javascript:alert(1)"), id="webhook_url-javascript"),
    pytest.param(bad_webhook("hooks.example.com/x"), id="webhook_url-no-scheme"),
    pytest.param(bad_webhook(LONG_URL), id="webhook_url-over-4096-chars"),
    # --- webhook URLs: hostile targets (no network allowed in this app)
    pytest.param(
        bad_webhook("http://169.254.169.254/latest/meta-data/"), id="webhook_url-metadata-ip"
    ),
    pytest.param(bad_webhook("http://10.0.0.1/hook"), id="webhook_url-private-ip"),
    pytest.param(bad_webhook("https://192.168.1.10/hook"), id="webhook_url-private-ip-https"),
    pytest.param(bad_webhook("http://localhost/hook"), id="webhook_url-localhost"),
    pytest.param(bad_webhook("http://127.0.0.1:6379/"), id="webhook_url-loopback-redis-port"),
    pytest.param(bad_webhook("https://[::1]/hook"), id="webhook_url-ipv6-loopback"),
    pytest.param(bad_webhook("https://0177.0.0.1/hook"), id="webhook_url-octal-ipv4-loopback"),
    pytest.param(bad_webhook("https://2130706433/hook"), id="webhook_url-one-number-ipv4"),
    pytest.param(bad_webhook("https://[::ffff:127.0.0.1]/hook"), id="webhook_url-ipv4-mapped-v6"),
    pytest.param(bad_webhook("http://nonexistent.invalid/x"), id="webhook_url-does-not-resolve"),
    pytest.param(
        bad_webhook("https://user:pw@hooks.example.com/x"), id="webhook_url-with-credentials"
    ),
    # --- webhook events
    pytest.param(
        invalid(fields("webhook_events.0"), body(webhook_events=["job.exploded"])),
        id="webhook_events-unknown",
    ),
    pytest.param(
        invalid(fields("webhook_events"), body(webhook_events=["job.succeeded", "job.succeeded"])),
        id="webhook_events-duplicate",
    ),
    pytest.param(
        invalid(fields("webhook_events"), body(webhook_events=[])), id="webhook_events-empty"
    ),
    pytest.param(
        invalid(fields("webhook_events"), body(webhook_events="job.succeeded")),
        id="webhook_events-string",
    ),
    # --- metadata
    pytest.param(invalid(fields("metadata"), body(metadata=[1, 2])), id="metadata-list"),
    pytest.param(invalid(fields("metadata"), body(metadata="order-7")), id="metadata-string"),
    pytest.param(invalid(fields("metadata"), body(metadata=BIG_METADATA)), id="metadata-over-4KiB"),
    pytest.param(
        invalid(fields("metadata"), body(metadata=nested(MAX_METADATA_DEPTH + 1))),
        id="metadata-nested-past-its-depth",
    ),
    pytest.param(
        Bad(400, data=raw_json('"metadata": {"ratio": NaN}')),
        id="NaN-inside-metadata",
    ),
    pytest.param(
        Bad(400, data=raw_json('"metadata": {"note": "\\ud800"}')),
        id="half-a-surrogate-pair-in-metadata",
    ),
    pytest.param(
        Bad(400, data=json.dumps({**VALID, "prompt": "sky ?"}).replace("?", "\\udfff")),
        id="half-a-surrogate-pair-in-prompt",
    ),
    # --- several bad fields at once: every one is named
    pytest.param(
        invalid(
            fields(
                "prompt",
                "image_url",
                "strength",
                "num_inference_steps",
                "loras.0.scale",
                "loras.2.path",
                "output_format",
                "num_inference_step",
            ),
            {
                "prompt": "",
                "image_url": "ftp://x",
                "mask_image_url": VALID["mask_image_url"],
                "strength": "1",
                "num_inference_steps": 99,
                "loras": [{"path": "a/b", "scale": 9}, {"path": "c/d"}, {}],
                "output_format": "bmp",
                "num_inference_step": 20,
            },
        ),
        id="many-bad-fields-all-named",
    ),
    # --- authentication
    pytest.param(Bad(401, json=VALID, auth="none"), id="no-authorization"),
    pytest.param(Bad(401, json=VALID, auth="basic"), id="basic-scheme"),
    pytest.param(Bad(401, json=VALID, auth="bare_key"), id="key-without-scheme"),
    pytest.param(Bad(401, json=VALID, auth="empty_bearer"), id="bearer-without-key"),
    pytest.param(Bad(401, json=VALID, auth="unknown"), id="unknown-api-key"),
    pytest.param(Bad(401, json=VALID, auth="revoked"), id="revoked-api-key"),
    pytest.param(
        Bad(401, method="GET", path="/v1/jobs", content_type=None, auth="none"),
        id="list-without-authorization",
    ),
    pytest.param(
        Bad(401, method="GET", path="/v1/jobs/{alice_queued}", content_type=None, auth="revoked"),
        id="get-with-revoked-key",
    ),
    pytest.param(
        Bad(401, data="not even json", content_type="text/plain", auth="none"),
        id="auth-checked-before-content-type",
    ),
    # --- listing
    pytest.param(query("status=done", "status"), id="list-bad-status"),
    pytest.param(query("limit=0", "limit"), id="list-limit-0"),
    pytest.param(query("limit=101", "limit"), id="list-limit-101"),
    pytest.param(query("limit=ten", "limit"), id="list-limit-not-a-number"),
    pytest.param(query("cursor=%21%21garbage%21%21", "cursor"), id="list-garbage-cursor"),
    pytest.param(query("cursor=bm90LWEtY3Vyc29y", "cursor"), id="list-base64-not-a-cursor"),
    pytest.param(query("cursor=" + "A" * 201, "cursor"), id="list-cursor-too-long"),
    pytest.param(
        query("cursor=" + NAN_CURSOR, "cursor"),
        id="list-cursor-decoding-to-nan",
    ),
    pytest.param(
        query("stauts=failed", "stauts"),
        id="list-misspelt-status-parameter",
    ),
    # --- other clients' jobs, missing jobs, final jobs
    *(
        pytest.param(
            Bad(404, method=method, path=path.format(job="{bob_job}"), content_type=None),
            id=f"{label}-other-clients-job",
        )
        for label, method, path in (
            ("get", "GET", "/v1/jobs/{job}"),
            ("cancel", "POST", "/v1/jobs/{job}/cancel"),
            ("deliveries", "GET", "/v1/jobs/{job}/deliveries"),
            ("redeliver", "POST", "/v1/jobs/{job}/webhook/redeliver"),
        )
    ),
    pytest.param(
        Bad(404, method="GET", path="/v1/jobs/job_doesnotexist", content_type=None),
        id="get-nonexistent-job",
    ),
    *(  # an id naming another of the job's keys (a list, a hash) is no job either
        pytest.param(
            Bad(
                404,
                method=method,
                path=path.format(job="{alice_final}" + suffix),
                content_type=None,
            ),
            id=f"{label}-job-id{suffix.replace(':', '-')}",
        )
        for suffix in (":events", ":deliveries")
        for label, method, path in (
            ("get", "GET", "/v1/jobs/{job}"),
            ("cancel", "POST", "/v1/jobs/{job}/cancel"),
            ("deliveries", "GET", "/v1/jobs/{job}/deliveries"),
            ("redeliver", "POST", "/v1/jobs/{job}/webhook/redeliver"),
        )
    ),
    pytest.param(
        Bad(404, path="/v1/jobs/job_doesnotexist/cancel", content_type=None),
        id="cancel-nonexistent-job",
    ),
    pytest.param(
        Bad(409, path="/v1/jobs/{alice_final}/cancel", content_type=None), id="cancel-final-job"
    ),
    pytest.param(
        Bad(409, path="/v1/jobs/{alice_queued}/webhook/redeliver", content_type=None),
        id="redeliver-live-job",
    ),
    pytest.param(
        Bad(409, path="/v1/jobs/{alice_final}/webhook/redeliver", content_type=None),
        id="redeliver-job-without-webhook_url",
    ),
    # --- routing
    pytest.param(
        Bad(405, method="DELETE", path="/v1/jobs/{alice_queued}", content_type=None),
        id="delete-not-allowed",
    ),
    pytest.param(
        Bad(404, method="GET", path="/v1/nothing-here", content_type=None), id="unknown-route"
    ),
]


def send(iso: Isolated, bad: Bad) -> Any:
    """Send one Bad request through the app's test client."""
    kwargs: dict[str, Any] = {"headers": iso.auth(bad.auth) | dict(bad.headers)}
    if bad.data is not None:
        kwargs["data"] = bad.data
    elif bad.json is not None:
        kwargs["data"] = json.dumps(bad.json)
    if bad.content_type is not None:
        kwargs["content_type"] = bad.content_type
    path = bad.path.format(**iso.job_ids)
    return iso.http.open(path, method=bad.method, **kwargs)


def assert_problem(iso: Isolated, resp: Any, bad: Bad) -> dict[str, Any]:
    """The answer is exactly the problem+json `bad` calls for, and gives nothing away."""
    text = resp.get_data(as_text=True)
    assert resp.status_code == bad.status, text
    assert resp.mimetype == PROBLEM_JSON, (resp.content_type, text)
    problem = json.loads(text)
    assert isinstance(problem, dict), text
    assert problem["status"] == bad.status
    for member in ("type", "title", "detail"):
        assert isinstance(problem[member], str) and problem[member].strip(), (member, problem)
    assert problem["type"].startswith("https://") or problem["type"] == "about:blank"
    if bad.status == 422:
        assert bad.errors is not None
        errors = problem["errors"]
        assert set(errors) == set(bad.errors), errors
        for name, messages in errors.items():
            assert isinstance(messages, list) and messages, (name, messages)
            assert all(isinstance(m, str) and m for m in messages), (name, messages)
    else:
        assert "errors" not in problem, problem
    if bad.status == 401:
        assert resp.headers.get("WWW-Authenticate", "").startswith("Bearer "), resp.headers
    lowered = text.lower()
    for leak in ("traceback", 'file "', "site-packages", "/work/"):
        assert leak not in lowered, f"{leak!r} in the answer: {text}"
    for secret in iso.secrets():
        assert secret not in text, f"a secret is in the answer: {text}"
    return problem


@pytest.mark.parametrize("bad", BAD_REQUESTS)
def test_bad_request_is_a_problem_and_writes_nothing(isolated: Isolated, bad: Bad) -> None:
    before = snapshot(isolated.redis)
    assert JOBS_QUEUE in before, "the setup's jobs should have left broker messages to compare"
    try:
        resp = send(isolated, bad)
        assert_problem(isolated, resp, bad)
        assert changes(before, snapshot(isolated.redis)) == []
    finally:
        isolated.forget_wakeups()  # a request that did write must not flake the next snapshot


def test_a_webhook_host_whose_name_servers_do_not_answer_is_a_422_within_the_lookup_limit(
    isolated: Isolated, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lookup is given up on at its limit: the request thread is not held for the system
    resolver's retries (10 s and more), which a few such POSTs would spend every API thread on."""
    commands = isolated.http.application.extensions["inpaint_gateway"].commands
    monkeypatch.setattr(egress, "LOOKUP_TIMEOUT_S", 0.5)
    with dns_peer(silent=True) as peer:
        monkeypatch.setattr(commands, "egress", EgressPolicy(names=NameLookup((peer.address,))))
        bad = bad_webhook("https://hangs.example.com/hook")
        before = snapshot(isolated.redis)
        started = time.monotonic()
        resp = send(isolated, bad)
        took_s = time.monotonic() - started
    problem = assert_problem(isolated, resp, bad)
    assert problem["errors"]["webhook_url"] == [
        "webhook host hangs.example.com did not resolve within 0.5 s"
    ]
    assert 0.5 <= took_s < 1.5 and peer.asked
    assert changes(before, snapshot(isolated.redis)) == []


def test_a_method_not_allowed_says_which_are(isolated: Isolated) -> None:
    bad = Bad(405, method="DELETE", path="/v1/jobs/{alice_queued}", content_type=None)
    resp = send(isolated, bad)
    assert_problem(isolated, resp, bad)
    assert {m.strip() for m in resp.headers["Allow"].split(",")} >= {"GET", "HEAD"}


def test_the_cases_are_many_and_distinct() -> None:
    ids = [p.id for p in BAD_REQUESTS]
    assert len(ids) == len(set(ids)) and len(ids) >= 30
    requests_ = [p.values[0] for p in BAD_REQUESTS]
    assert len({repr(r) for r in requests_}) == len(requests_)


# --- controls: the same check sees a request that does write --------------------------------


def test_the_base_body_is_accepted(isolated: Isolated) -> None:
    """Every POST case above differs from an accepted body only in what it names."""
    resp = send(isolated, Bad(202, json=VALID))
    assert resp.status_code == 202, resp.get_data(as_text=True)
    isolated.forget_wakeups()


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({}, id="defaults"),
        pytest.param(
            {
                "prompt": "y" * MAX_PROMPT_CHARS,
                "control_start": 0,
                "control_end": 0,
                "control_scale": 1,
                "strength": 0,
                "loras": [{"path": "a/b", "scale": 4}, {"path": "c/d", "scale": 0}, {"path": "e"}],
                "image_size": "portrait_16_9",
                "num_inference_steps": 30,
                "seed": MAX_SEED,
                "output_format": "webp",
                "webhook_events": ["job.succeeded", "job.submitted"],
                "metadata": {"m": "z" * (MAX_METADATA_BYTES - len('{"m":""}'))},
            },
            id="every-field-at-its-limit",
        ),
        pytest.param(  # 4 KiB of UTF-8: two bytes a character, not \u00e9's six
            {"metadata": {"m": "é" * ((MAX_METADATA_BYTES - len('{"m":""}')) // 2)}},
            id="metadata-of-4KiB-in-utf-8",
        ),
        pytest.param(  # sent as \ud83d\ude00: a whole surrogate pair is a character
            {"prompt": "a sky like 😀", "metadata": {"mood": "😀"}}, id="emoji-as-escapes"
        ),
        pytest.param(
            {"control_start": 1, "control_end": 1, "num_inference_steps": 1, "seed": 0},
            id="lower-and-upper-edges",
        ),
        pytest.param({"metadata": nested(MAX_METADATA_DEPTH)}, id="metadata-at-its-depth"),
        pytest.param(  # JSON Schema's integer: a number without a fraction, however written
            {"seed": 7.0, "num_inference_steps": 2e1}, id="integers-written-with-a-point"
        ),
    ],
)
def test_a_valid_request_is_stored_and_enqueued(
    isolated: Isolated, stack: Stack, extra: dict[str, Any]
) -> None:
    """Positive control: the snapshot check does see a new job and a `jobs` broker message."""
    isolated.forget_wakeups()  # a pending flag would suppress this request's broker message
    payload = {
        **VALID,
        "image_url": f"{stack.emulator_url}/samples/image.png",
        "mask_image_url": f"{stack.emulator_url}/samples/mask.png",
        **extra,
    }
    before = snapshot(isolated.redis)
    resp = send(isolated, Bad(202, json=payload))
    after = snapshot(isolated.redis)
    isolated.forget_wakeups()

    assert resp.status_code == 202, resp.get_data(as_text=True)
    job = resp.get_json()
    assert job["status"] == "queued"
    assert set(job["input"]) == set(INPUT_FIELDS)
    for name, value in payload.items():
        if name in job["input"]:
            expected = [{"scale": 1.0, **lora} for lora in value] if name == "loras" else value
            assert job["input"][name] == expected, name
            if name in ("seed", "num_inference_steps"):  # 7.0 is taken, as the int RunComfy wants
                assert type(job["input"][name]) is int, (name, job["input"][name])
    assert job["metadata"] == payload.get("metadata")
    assert job["webhook_events"] == payload.get("webhook_events", job["webhook_events"])
    diff = changes(before, after)
    assert f"+ {PREFIX}job:{job['id']} string" in diff, diff
    assert f"~ {PREFIX}client:{isolated.alice.client_id}:jobs" in diff, diff
    assert f"~ {JOBS_QUEUE}" in diff, diff
    queued = after[JOBS_QUEUE][1]
    assert len(queued) == len(before[JOBS_QUEUE][1]) + 1
    message = json.loads(queued[0])  # kombu LPUSHes; the newest is first
    assert message["headers"]["task"] == "inpaint_gateway.dispatch_jobs"


@pytest.mark.parametrize("script_root", ["", "/gateway"])
def test_location_is_the_path_url_for_builds(app: Any, script_root: str) -> None:
    with app.test_request_context(base_url=f"http://api.internal{script_root}/"):
        assert job_location("job_abc") == url_for("jobs.Job", job_id="job_abc")
        assert job_location("job_abc") == f"{script_root}/v1/jobs/job_abc"


def test_a_chunked_body_over_the_limit_is_a_413_not_cut_to_it(isolated: Isolated) -> None:
    """Werkzeug reads a chunked body up to MAX_CONTENT_LENGTH and stops without a word: a JSON
    body padded to the limit with more behind it was accepted (202), its tail never read."""
    padded = json.dumps(VALID).encode().ljust(MAX_BODY_BYTES) + b"GARBAGE"
    at_limit = json.dumps(VALID).encode().ljust(MAX_BODY_BYTES)

    def post_chunked(body: bytes, content_type: str = "application/json") -> Any:
        return isolated.http.post(
            "/v1/jobs",
            input_stream=io.BytesIO(body),
            headers={"Transfer-Encoding": "chunked"} | isolated.auth("alice"),
            content_type=content_type,
            environ_overrides={"wsgi.input_terminated": True},  # as gunicorn says of chunked
        )

    try:
        too_large = post_chunked(padded)
        assert too_large.status_code == 413, too_large.get_data(as_text=True)
        assert f"{MAX_BODY_BYTES // 1024} KiB" in too_large.get_json()["detail"]
        accepted = post_chunked(at_limit)
        assert accepted.status_code == 202, accepted.get_data(as_text=True)
        assert post_chunked(padded, "text/plain").status_code == 415
    finally:
        isolated.forget_wakeups()


def test_a_password_in_a_url_is_not_echoed_back(isolated: Isolated) -> None:
    """A URL both malformed and holding user:password: no error repeats the password (the
    character check, first before, echoed the whole URL; and a password holding "/", "?" or
    "#" ends urlsplit's host part early, so it passed for a path and the port error echoed it)."""
    for name in ("image_url", "webhook_url"):
        for url in (
            "https://me:s3cret@images.example.com/a b",
            "https://me:s3cr/et@images.example.com/a",
            "https://me:s3cr?et@images.example.com/a",
            "https://me:s3cr#et@images.example.com/a",
        ):
            resp = isolated.http.post(
                "/v1/jobs", json=body(**{name: url}), headers=isolated.auth("alice")
            )
            assert resp.status_code == 422, (url, resp.get_data(as_text=True))
            assert "s3cr" not in resp.get_data(as_text=True), url


def test_metadata_nested_as_deep_as_json_parses_is_a_4xx_never_a_500(isolated: Isolated) -> None:
    """Nested just shallower than the parse's recursion limit, metadata parsed, then measuring
    it (deeper in the stack) ran out of recursion: a 500. Where that limit falls depends on the
    stack, so every depth around it is tried."""
    statuses = set()
    for depth in range(600, 1000):
        data = raw_json('"metadata": {"a": ' + "[" * depth + "]" * depth + "}")
        resp = send(isolated, Bad(422, data=data))
        statuses.add(resp.status_code)
    assert statuses == {400, 422}  # too deep to parse, or parsed and refused: both reached


def test_metrics_are_prometheus_text_with_one_charset(isolated: Isolated) -> None:
    resp = isolated.http.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == CONTENT_TYPE_LATEST  # was given a second charset
    names = {family.name for family in text_string_to_metric_families(resp.get_data(as_text=True))}
    assert {
        "inpaint_gateway_jobs_steps_overdue",
        "inpaint_gateway_upstream_calls_postponed",
    } <= names


def test_the_openapi_document_is_valid_and_says_what_is_sent(isolated: Isolated) -> None:
    """Errors are documented as they are answered (problem+json, the Problem schema; they were
    documented as flask-smorest's application/json {code, status, message}), each route with
    the problems it may give, and POST /v1/jobs with its Idempotency-Key header."""
    doc = isolated.http.get("/openapi.json").get_json()
    validate(doc)  # OpenAPI 3.1
    problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    responses = doc["components"]["responses"]
    for name, component in responses.items():
        if name == "DEFAULT_ERROR" or int(HTTPStatus[name]) >= 400:
            assert component["content"] == problem, name
    post = doc["paths"]["/v1/jobs"]["post"]
    assert {"400", "401", "409", "413", "415", "422", "503"} <= set(post["responses"])
    assert [p["name"] for p in post["parameters"] if p["in"] == "header"] == ["Idempotency-Key"]
    cancel = doc["paths"]["/v1/jobs/{job_id}/cancel"]["post"]
    assert {"401", "404", "409", "503"} <= set(cancel["responses"])
    listing = doc["paths"]["/v1/jobs"]["get"]["parameters"]
    status = next(p for p in listing if p["name"] == "status")["schema"]
    assert None not in status["enum"] and isinstance(status["type"], str)


def test_a_number_too_long_for_python_is_a_400_that_speaks_to_the_caller(
    isolated: Isolated,
) -> None:
    """Python's own refusal advised sys.set_int_max_str_digits(): advice for the operator."""
    for member in ('"seed": ', '"metadata": {"n": '):
        closing = "" if member.startswith('"seed"') else "}"
        data = raw_json(member + "9" * 4301 + closing)
        problem = assert_problem(isolated, send(isolated, Bad(400, data=data)), Bad(400))
        assert "more than 4300 digits" in problem["detail"], problem
        assert "sys." not in problem["detail"]
