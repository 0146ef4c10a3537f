"""The OpenAPI document states the validator's rules, and its patterns are the validator's own."""

from __future__ import annotations

import ipaddress
import re
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.inputs import (
    DATA_URI_PATTERN,
    MAX_DATA_URI_CHARS,
    MAX_UPLOAD_REF_CHARS,
    UPLOAD_REF_PATTERN,
    data_uri_problem,
)
from core.store import decode_cursor, encode_cursor
from service.schemas import (
    CURSOR_PATTERN,
    HTTP_URL_PATTERN,
    MAX_METADATA_BYTES,
    MAX_URL_CHARS,
    JobCreateSchema,
)

URL = re.compile(HTTP_URL_PATTERN)
DATA_URI = re.compile(DATA_URI_PATTERN)


@pytest.fixture(scope="module")
def doc(app: Any) -> dict[str, Any]:
    document: dict[str, Any] = app.test_client().get("/openapi.json").get_json()
    return document


def test_every_body_rule_is_in_the_document(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    create = schemas["JobCreate"]
    assert create["additionalProperties"] is False
    assert schemas["Lora"]["additionalProperties"] is False
    assert set(create["required"]) == {"prompt", "image_url", "mask_image_url"}
    props = create["properties"]
    assert props["webhook_url"]["pattern"] == HTTP_URL_PATTERN
    assert props["webhook_url"]["maxLength"] == MAX_URL_CHARS
    for name in ("image_url", "mask_image_url"):
        # Three forms, each with its own rule; none stated for the field as a whole.
        assert "pattern" not in props[name] and "maxLength" not in props[name], name
        assert [(form["pattern"], form["maxLength"]) for form in props[name]["anyOf"]] == [
            (HTTP_URL_PATTERN, MAX_URL_CHARS),
            (DATA_URI_PATTERN, MAX_DATA_URI_CHARS),
            (UPLOAD_REF_PATTERN, MAX_UPLOAD_REF_CHARS),
        ], name
    assert props["prompt"]["minLength"] == 1 and props["prompt"]["maxLength"] == 8000
    assert "pattern" in props["prompt"]  # not blank
    for name in ("control_start", "control_end", "control_scale", "strength"):
        assert (props[name]["minimum"], props[name]["maximum"]) == (0, 1), name
    assert (props["num_inference_steps"]["minimum"], props["num_inference_steps"]["maximum"]) == (
        1,
        30,
    )
    assert props["loras"]["maxItems"] == 3
    assert set(props["image_size"]["enum"]) >= {"square_hd", "auto"}
    assert props["output_format"]["enum"] == ["jpeg", "png", "webp"]
    assert props["webhook_events"]["uniqueItems"] is True
    assert props["metadata"]["x-max-bytes"] == MAX_METADATA_BYTES
    assert "control_end" in props["control_start"]["description"]


def test_every_query_header_and_path_rule_is_in_the_document(doc: dict[str, Any]) -> None:
    listing = {p["name"]: p["schema"] for p in doc["paths"]["/v1/jobs"]["get"]["parameters"]}
    assert listing["cursor"]["pattern"] == CURSOR_PATTERN
    assert (listing["limit"]["minimum"], listing["limit"]["maximum"]) == (1, 100)
    assert "queued" in listing["status"]["enum"]
    post = doc["paths"]["/v1/jobs"]["post"]
    key = next(p for p in post["parameters"] if p["name"] == "Idempotency-Key")["schema"]
    assert key["pattern"].startswith("^") and key["pattern"].endswith("$")
    assert (key["minLength"], key["maxLength"]) == (1, 255)
    job_id = doc["paths"]["/v1/jobs/{job_id}"]["parameters"][0]
    assert job_id["in"] == "path" and job_id["schema"]["pattern"] == "^job_[0-9a-f]{24}$"


def test_the_media_route_documents_both_ways_in(doc: dict[str, Any]) -> None:
    path = doc["paths"]["/v1/media/{media_id}"]
    [media_id] = path["parameters"]
    assert media_id["in"] == "path" and media_id["schema"]["pattern"] == "^upl_[0-9a-f]{32}$"
    get = path["get"]
    query = {p["name"]: p for p in get["parameters"]}
    assert set(query) == {"exp", "sig"} and not any(p["required"] for p in query.values())
    assert query["exp"]["schema"]["pattern"] == "^[0-9]{1,12}$"
    assert query["sig"]["schema"]["pattern"] == "^[A-Za-z0-9_-]{43}$"
    assert get["security"] == [{}, {"bearer": []}]  # a signed URL needs no key
    assert {"200", "401", "403", "404"} <= set(get["responses"])
    assert set(get["responses"]["200"]["content"]) == {"image/png", "image/jpeg", "image/webp"}
    output = doc["components"]["schemas"]["Output"]["properties"]
    assert set(output) == {"images", "upstream_images", "stored", "media"}


def test_the_accepted_job_links_to_what_can_be_done_with_it(doc: dict[str, Any]) -> None:
    operations = {
        op["operationId"]
        for path in doc["paths"].values()
        for op in path.values()
        if isinstance(op, dict) and "operationId" in op
    }
    for status in ("202", "200"):
        links = doc["paths"]["/v1/jobs"]["post"]["responses"][status]["links"]
        assert {link["operationId"] for link in links.values()} == {
            "getJob",
            "cancelJob",
            "getJobDeliveries",
            "redeliverJobWebhook",
        }
        assert {link["operationId"] for link in links.values()} <= operations
        for link in links.values():
            assert link["parameters"] == {"job_id": "$response.body#/id"}


@pytest.mark.parametrize(
    "url",
    [
        "https://images.example.com/in.png",
        "HTTP://127.0.0.1:8080/a?b=c&d=%20#frag",
        "https://[2001:db8::1]/x",
        "https://[::ffff:192.0.2.1]:443/",
        "http://localhost",
        "https://a-b.c-d.example/x/y;z=1@k",
    ],
)
def test_a_well_formed_url_matches_and_is_taken(url: str) -> None:
    assert URL.fullmatch(url)
    assert (
        JobCreateSchema().validate({"prompt": "p", "image_url": url, "mask_image_url": url}) == {}
    )


@pytest.mark.parametrize(
    "url",
    [
        "ftp://images.example.com/in.png",
        "https://me:pw@images.example.com/in.png",
        "https://images.example.com:0/",
        "https://images.example.com:65536/",
        "https://images.example.com/a b",
        "https://images.example.com/in.png\n",
        "https://images.example.com/bild-ä.png",
        "https://0177.0.0.1/",
        "https://2130706433/",
        "https://256.1.1.1/",
        "https://[::1::2]/",
        "https://images.example.com/%zz",
        "https://images.example.com\\@evil.example/",
    ],
)
def test_a_malformed_url_neither_matches_nor_is_taken(url: str) -> None:
    assert not URL.fullmatch(url)
    errors = JobCreateSchema().validate({"prompt": "p", "image_url": url, "mask_image_url": url})
    assert set(errors) == {"image_url", "mask_image_url"}
    assert "me:pw" not in str(errors)


@settings(max_examples=300, deadline=None)
@given(st.ip_addresses(v=6))
def test_every_ipv6_address_is_a_url_host_in_each_of_its_forms(address: Any) -> None:
    for text in (address.compressed, address.exploded):
        assert URL.fullmatch(f"https://[{text}]/"), text


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="0123456789abcdef:.", min_size=2, max_size=45))
def test_a_bracketed_host_matches_exactly_when_it_is_an_ipv6_address(text: str) -> None:
    try:
        ipaddress.IPv6Address(text)
        valid = "." not in text or all(  # the pattern takes no leading zeros in an IPv4 tail
            len(part) == 1 or not part.startswith("0") for part in text.rsplit(":", 1)[1].split(".")
        )
    except ValueError:
        valid = False
    assert bool(URL.fullmatch(f"https://[{text}]/")) == valid, text


def test_the_url_pattern_answers_a_hostile_url_at_its_length_limit_at_once() -> None:
    """Nested repetition invites catastrophic backtracking: the worst inputs found take far less
    than a millisecond-scale budget per call."""
    hostile = [
        "https://" + "a." * (MAX_URL_CHARS // 2 - 6) + "!",
        "https://" + "a-" * (MAX_URL_CHARS // 2 - 6) + ".1",
        "https://x.example/" + "%2" * (MAX_URL_CHARS // 2 - 12),
        "https://[" + "1:" * (MAX_URL_CHARS // 2 - 6) + "]",
    ]
    for url in hostile:
        started = time.perf_counter()
        assert not URL.fullmatch(url)
        assert time.perf_counter() - started < 0.05, url[:40]


@pytest.mark.parametrize(
    "stored",
    [
        (1733600000.1234567, "job_" + "a" * 24),
        (1000.0, "job_" + "0" * 24),
        (1e-05, "job_" + "f" * 24),
    ],
)
def test_a_cursor_keeps_its_position_and_matches_the_documented_pattern(
    stored: tuple[float, str],
) -> None:
    created_at, job_id = stored
    shown = encode_cursor(created_at, job_id)
    assert re.fullmatch(CURSOR_PATTERN, shown), shown
    assert decode_cursor(shown) == (created_at, job_id)


def test_pages_follow_next_cursor_to_every_job_newest_first(api_client: Any) -> None:
    body = {
        "prompt": "p",
        "image_url": "https://images.example.com/in.png",
        "mask_image_url": "https://images.example.com/mask.png",
    }
    made = [api_client.post("/v1/jobs", json=body).get_json()["id"] for _ in range(3)]
    seen: list[str] = []
    cursor = None
    for _ in range(3):
        query = "/v1/jobs?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = api_client.get(query)
        assert page.status_code == 200, page.get_data(as_text=True)
        seen += [job["id"] for job in page.get_json()["jobs"]]
        cursor = page.get_json()["next_cursor"]
        if cursor is None:
            break
        assert re.fullmatch(CURSOR_PATTERN, cursor), cursor
    assert seen == made[::-1]


def image_input_errors(value: str) -> dict[str, Any]:
    errors: dict[str, Any] = JobCreateSchema().validate(
        {"prompt": "p", "image_url": value, "mask_image_url": "upload:upl_" + "0" * 32}
    )
    return errors


def documented_image_input(doc: dict[str, Any], value: str) -> bool:
    """Whether `value` is an image_url as the document states it (anyOf its forms)."""
    forms = doc["components"]["schemas"]["JobCreate"]["properties"]["image_url"]["anyOf"]
    return any(
        len(value) <= form["maxLength"] and re.search(form["pattern"], value) is not None
        for form in forms
    )


_BASE64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(
        ["data:image/png;base64,", "data:image/webp;base64,", "data:image/gif;base64,"]
    ),
    st.text(alphabet=_BASE64_ALPHABET + "=-_ \n", max_size=14),
)
def test_the_data_uri_validator_takes_exactly_what_the_document_s_pattern_does(
    head: str, encoded: str
) -> None:
    value = head + encoded
    assert (data_uri_problem(value) is None) == bool(DATA_URI.fullmatch(value)), value


@pytest.mark.parametrize(
    "value",
    [
        "https://images.example.com/in.png",
        "data:image/png;base64,iVBORw0KGgo=",
        "data:image/jpeg;base64,",
        "upload:upl_" + "a1" * 16,
        "data:image/gif;base64,AAAA",
        "data:image/png;base64,AAA",
        "data:image/png;base64,A===",
        "DATA:image/png;base64,AAAA",
        "upload:upl_" + "A1" * 16,
        "upload:" + "a" * 36,
        "ftp://images.example.com/in.png",
        "https://me:pw@images.example.com/in.png",
        "https://images.example.com/" + "a" * MAX_URL_CHARS,
        "data:image/png;base64," + "A" * (MAX_DATA_URI_CHARS - 22),
        "data:image/jpeg;base64," + "A" * (MAX_DATA_URI_CHARS - 23),
        "data:image/jpeg;base64," + "A" * (MAX_DATA_URI_CHARS - 19),
    ],
)
def test_an_image_input_is_taken_exactly_when_the_document_allows_it(
    doc: dict[str, Any], value: str
) -> None:
    errors = image_input_errors(value)
    assert (errors == {}) == documented_image_input(doc, value), value[:60]
    assert "me:pw" not in str(errors) and "AAAAAAAA" not in str(errors)
