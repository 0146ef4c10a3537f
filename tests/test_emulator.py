"""The RunComfy emulator over real HTTP: shapes, timeline, images, faults and directives."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image, ImageChops, ImageStat

from cli.stack import free_port
from emulator import EmulatorConfig, Faults, create_app
from emulator.directives import DirectiveError, parse_directives
from emulator.faults import OUTPUT_TTL_S
from emulator.images import SAMPLE_MASK_BOX, make_sample_image, make_sample_mask
from emulator.outputs import HeldInputs, InputFetchError
from emulator.server import EmulatorServer

TOKEN = "test-token"
MODEL_PATH = "/v1/models/tongyi-mai/z-image/turbo/inpainting/lora"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
QUICK = "[emulator:queue=0][emulator:run=0]"
TEST_FAULTS = Faults(queue_s=0.3, run_s=0.3)


@contextmanager
def running_emulator(config: EmulatorConfig) -> Iterator[str]:
    """Serve an emulator app on a free port in a background thread, as `python -m emulator`
    does; yield its base URL."""
    server = EmulatorServer(create_app(config), "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with running_emulator(EmulatorConfig(token=TOKEN, faults=TEST_FAULTS)) as url:
        yield url


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {TOKEN}"
    yield session
    session.close()


@pytest.fixture(autouse=True)
def reset_knobs(http: requests.Session, base_url: str) -> Iterator[None]:
    yield
    http.post(f"{base_url}/_emulator/reset", timeout=5).raise_for_status()


def sample_input(base_url: str, prompt: str, **fields: Any) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "image_url": f"{base_url}/samples/image.png",
        "mask_image_url": f"{base_url}/samples/mask.png",
        **fields,
    }


def submit(http: requests.Session, base_url: str, prompt: str, **fields: Any) -> requests.Response:
    return http.post(f"{base_url}{MODEL_PATH}", json=sample_input(base_url, prompt, **fields))


def submit_ok(http: requests.Session, base_url: str, prompt: str, **fields: Any) -> dict[str, Any]:
    response = submit(http, base_url, prompt, **fields)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def wait_for_result(http: requests.Session, result_url: str, timeout_s: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = http.get(result_url).json()
        if body["status"] not in ("in_queue", "in_progress"):
            return body
        time.sleep(0.03)
    raise AssertionError(f"no final result at {result_url} within {timeout_s} s")


def set_faults(http: requests.Session, base_url: str, **knobs: Any) -> None:
    http.post(f"{base_url}/_emulator/faults", json=knobs).raise_for_status()


def stats(http: requests.Session, base_url: str) -> Any:
    return http.get(f"{base_url}/_emulator/stats").json()


def decode_image(content: bytes) -> Image.Image:
    with Image.open(BytesIO(content)) as opened:
        return opened.convert("RGB")


def mean_abs_difference(
    first: Image.Image, second: Image.Image, box: tuple[int, int, int, int]
) -> float:
    difference = ImageChops.difference(first.crop(box), second.crop(box))
    return sum(ImageStat.Stat(difference).mean) / 3


def data_uri(content: bytes, content_type: str = "image/png") -> str:
    return f"data:{content_type};base64,{base64.b64encode(content).decode('ascii')}"


def encoded(image_bytes: bytes, pillow_format: str, **options: Any) -> bytes:
    buffer = BytesIO()
    with Image.open(BytesIO(image_bytes)) as opened:
        opened.save(buffer, format=pillow_format, **options)
    return buffer.getvalue()


def zero_png(width: int, height: int, *, bit_depth: int = 8, level: int = 9) -> bytes:
    """A valid all-black greyscale PNG written chunk by chunk, so that even a 400-megapixel one
    (a decompression bomb: tens of kilobytes compressed) never sits in memory decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    row = bytes(1 + (width * bit_depth + 7) // 8)  # filter byte 0, then the row's pixels
    compressor = zlib.compressobj(level)
    rows_per_block = max(1, (1 << 20) // len(row))
    compressed = []
    for start in range(0, height, rows_per_block):
        compressed.append(compressor.compress(row * min(rows_per_block, height - start)))
    compressed.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", b"".join(compressed))
        + chunk(b"IEND", b"")
    )


# --- auth, model id, input validation -------------------------------------------------


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token", "Bearer ", f"Basic {TOKEN}"])
def test_bad_or_missing_token_is_401_with_400004(base_url: str, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, path in (("POST", MODEL_PATH), ("GET", "/v1/requests/x/status")):
        response = requests.request(method, f"{base_url}{path}", headers=headers, json={})
        assert response.status_code == 401
        assert response.json() == {
            "error_code": 400004,
            "error_message": "token missing, revoked or account inactive",
        }


def test_without_configured_token_any_bearer_token_is_accepted() -> None:
    with running_emulator(EmulatorConfig(faults=TEST_FAULTS)) as url:
        accepted = requests.get(
            f"{url}/v1/requests/unknown/status", headers={"Authorization": "Bearer anything"}
        )
        refused = requests.get(f"{url}/v1/requests/unknown/status")
    assert accepted.status_code == 404
    assert refused.status_code == 401


def test_unknown_model_is_400001(http: requests.Session, base_url: str) -> None:
    response = http.post(
        f"{base_url}/v1/models/some/other-model", json=sample_input(base_url, "a cat")
    )
    assert response.status_code == 400
    assert response.json()["error_code"] == 400001


@pytest.mark.parametrize(
    ("fields", "bad_loc"),
    [
        ({"prompt": ""}, ["body", "prompt"]),
        ({"image_url": "ftp://example.com/a.png"}, ["body", "image_url"]),
        ({"num_inference_step": 20}, ["body", "num_inference_step"]),
        ({"num_inference_steps": 31}, ["body", "num_inference_steps"]),
        ({"strength": 1.5}, ["body", "strength"]),
        ({"image_size": "huge"}, ["body", "image_size"]),
        ({"output_format": "gif"}, ["body", "output_format"]),
        ({"seed": "7"}, ["body", "seed"]),
        ({"loras": [{"path": "a/b"}] * 4}, ["body", "loras"]),
        ({"loras": [{"path": "a/b", "scale": 4.5}]}, ["body", "loras", 0, "scale"]),
        ({"control_start": 0.9, "control_end": 0.5}, ["body", "control_start"]),
        ({"prompt": "x [emulator:explode]"}, ["body", "prompt"]),
    ],
)
def test_invalid_input_is_422001_with_detail(
    http: requests.Session, base_url: str, fields: dict[str, Any], bad_loc: list[Any]
) -> None:
    response = http.post(f"{base_url}{MODEL_PATH}", json={**sample_input(base_url, "ok"), **fields})
    assert response.status_code == 422
    body = response.json()
    assert body["error_code"] == 422001
    assert bad_loc in [problem["loc"] for problem in body["detail"]]


def test_missing_required_field_and_invalid_json(http: requests.Session, base_url: str) -> None:
    missing = http.post(f"{base_url}{MODEL_PATH}", json={"prompt": "a cat"})
    assert missing.status_code == 422
    assert {"image_url", "mask_image_url"} <= {p["loc"][-1] for p in missing.json()["detail"]}
    not_json = http.post(f"{base_url}{MODEL_PATH}", data=b"{not json")
    assert not_json.status_code == 400
    assert not_json.json()["error_code"] == 400000


def test_full_valid_input_is_accepted(http: requests.Session, base_url: str) -> None:
    accepted = submit_ok(
        http,
        base_url,
        "every field",
        control_start=0,
        control_end=0.6,
        control_scale=0.75,
        strength=1,
        loras=[{"path": "owner/repo", "scale": 1.2}, {"path": "https://x.test/l.safetensors"}],
        image_size="square",
        num_inference_steps=8,
        seed=42,
        output_format="png",
    )
    assert set(accepted) == {"request_id", "status_url", "result_url", "cancel_url"}


# --- timeline and output images ------------------------------------------------------


def test_request_queues_runs_and_succeeds_with_a_real_inpainted_image(
    http: requests.Session, base_url: str
) -> None:
    accepted = submit_ok(http, base_url, "a blue house [emulator:queue=0.9]")
    request_id = accepted["request_id"]
    assert accepted["status_url"] == f"{base_url}/v1/requests/{request_id}/status"
    assert accepted["cancel_url"] == f"{base_url}/v1/requests/{request_id}/cancel"
    early_result = http.get(accepted["result_url"]).json()
    assert early_result["status"] == "in_queue"
    assert early_result["finished_at"] is None
    assert "output" not in early_result

    seen: list[tuple[str, int | None]] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        body = http.get(accepted["status_url"]).json()
        assert body["request_id"] == request_id
        assert body["result_url"] == accepted["result_url"]
        seen.append((body["status"], body.get("queue_position")))
        if body["status"] == "completed":
            break
        time.sleep(0.02)
    statuses = [status for status, _ in seen]
    assert statuses[0] == "in_queue"
    assert "in_progress" in statuses
    assert statuses[-1] == "completed"
    assert statuses == sorted(statuses, key=["in_queue", "in_progress", "completed"].index)
    positions = [position for status, position in seen if status == "in_queue" and position]
    assert len(positions) == statuses.count("in_queue")
    assert positions == sorted(positions, reverse=True)
    assert positions[0] > positions[-1] == 1
    assert all(position is None for status, position in seen if status != "in_queue")

    result = http.get(accepted["result_url"]).json()
    assert result["status"] == "succeeded"
    assert result["created_at"].endswith("Z")
    assert result["finished_at"] > result["created_at"]
    [output_url] = result["output"]["images"]
    assert output_url.startswith(f"{base_url}/outputs/")
    output_response = requests.get(output_url)
    assert output_response.headers["Content-Type"] == "image/png"
    output = decode_image(output_response.content)
    source = decode_image(requests.get(f"{base_url}/samples/image.png").content)
    assert output.size == source.size
    left, top, right, bottom = SAMPLE_MASK_BOX
    inside_mask = (left + 10, top + 10, right - 10, bottom - 10)
    assert mean_abs_difference(output, source, inside_mask) > 60
    assert mean_abs_difference(output, source, (0, 0, 150, 200)) < 1


@pytest.mark.parametrize(
    ("image_size", "output_format", "expected_size", "content_type"),
    [
        ("landscape_16_9", "jpeg", (1024, 576), "image/jpeg"),
        ("portrait_4_3", "webp", (768, 1024), "image/webp"),
    ],
)
def test_output_follows_image_size_and_format(
    http: requests.Session,
    base_url: str,
    image_size: str,
    output_format: str,
    expected_size: tuple[int, int],
    content_type: str,
) -> None:
    accepted = submit_ok(http, base_url, QUICK, image_size=image_size, output_format=output_format)
    result = wait_for_result(http, accepted["result_url"])
    output_response = requests.get(result["output"]["images"][0])
    assert output_response.headers["Content-Type"] == content_type
    assert decode_image(output_response.content).size == expected_size


def test_identical_inputs_render_once_and_share_the_output(
    http: requests.Session, base_url: str
) -> None:
    first = submit_ok(http, base_url, f"same {QUICK}", seed=5)
    second = submit_ok(http, base_url, f"same {QUICK}", seed=5)
    other_seed = submit_ok(http, base_url, f"same {QUICK}", seed=6)
    urls = [
        wait_for_result(http, accepted["result_url"])["output"]["images"][0]
        for accepted in (first, second, other_seed)
    ]
    assert urls[0] == urls[1] != urls[2]


def test_output_styles_by_directive_and_alternating_knob(
    http: requests.Session, base_url: str
) -> None:
    single = wait_for_result(
        http, submit_ok(http, base_url, f"{QUICK}[emulator:image]")["result_url"]
    )
    assert isinstance(single["output"]["image"], str)
    assert "images" not in single["output"]
    listed = wait_for_result(
        http, submit_ok(http, base_url, f"{QUICK}[emulator:images]")["result_url"]
    )
    assert isinstance(listed["output"]["images"], list)

    set_faults(http, base_url, output_style="alternate")
    keys = [
        set(wait_for_result(http, submit_ok(http, base_url, QUICK)["result_url"])["output"])
        for _ in range(2)
    ]
    assert sorted(map(sorted, keys)) == [["image"], ["images"]]


# --- failures -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["string", "object", "list"])
def test_failed_result_in_each_error_shape(
    http: requests.Session, base_url: str, shape: str
) -> None:
    accepted = submit_ok(http, base_url, f"{QUICK}[emulator:fail][emulator:error={shape}]")
    assert http.get(accepted["status_url"]).json()["status"] == "completed"
    result = wait_for_result(http, accepted["result_url"])
    assert result["status"] == "failed"
    assert "output" not in result
    assert result["finished_at"] is not None
    error = result["error"]
    if shape == "string":
        assert error.startswith("generation failed: ")
    elif shape == "object":
        assert set(error) == {"type", "message"}
    else:
        assert isinstance(error, list)
        assert set(error[0]) == {"type", "message"}


def test_rate_fail_with_rotating_error_shapes(http: requests.Session, base_url: str) -> None:
    set_faults(http, base_url, rate_fail=1.0, error_shape="rotate")
    errors = [
        wait_for_result(http, submit_ok(http, base_url, QUICK)["result_url"])["error"]
        for _ in range(3)
    ]
    assert {type(error).__name__ for error in errors} == {"str", "dict", "list"}


def test_unfetchable_input_fails_with_a_readable_error(
    http: requests.Session, base_url: str
) -> None:
    accepted = submit_ok(
        http,
        base_url,
        f"{QUICK}[emulator:error=string]",
        image_url=f"{base_url}/samples/missing.png",
    )
    result = wait_for_result(http, accepted["result_url"])
    assert result["status"] == "failed"
    assert "could not fetch image_url: HTTP 404" in result["error"]


# --- data-URI inputs and output retention ----------------------------------------------


def test_data_uri_inputs_render_as_urls_do_and_their_sha256_is_recorded(
    http: requests.Session, base_url: str
) -> None:
    image_png = requests.get(f"{base_url}/samples/image.png").content
    mask_png = requests.get(f"{base_url}/samples/mask.png").content
    mask_webp = encoded(mask_png, "WEBP", lossless=True)
    prompt = f"data URIs {QUICK}"
    accepted = submit_ok(
        http,
        base_url,
        prompt,
        seed=11,
        image_url=data_uri(image_png),
        mask_image_url=data_uri(mask_webp, "image/webp"),
    )
    by_data = wait_for_result(http, accepted["result_url"])
    assert by_data["status"] == "succeeded", by_data
    output = decode_image(requests.get(by_data["output"]["images"][0]).content)
    source = decode_image(image_png)
    left, top, right, bottom = SAMPLE_MASK_BOX
    assert mean_abs_difference(output, source, (left + 10, top + 10, right - 10, bottom - 10)) > 60
    assert mean_abs_difference(output, source, (0, 0, 150, 200)) < 1
    by_url = wait_for_result(http, submit_ok(http, base_url, QUICK, seed=11)["result_url"])
    assert by_url["output"]["images"] != by_data["output"]["images"]  # rendered apart
    url_output = decode_image(requests.get(by_url["output"]["images"][0]).content)
    assert output.tobytes() == url_output.tobytes()

    received = http.get(f"{base_url}/_emulator/requests/{accepted['request_id']}").json()
    assert (received["request_id"], received["prompt"]) == (accepted["request_id"], prompt)
    assert received["inputs"] == {
        "image_url": {
            "kind": "data_uri",
            "content_type": "image/png",
            "bytes": len(image_png),
            "sha256": hashlib.sha256(image_png).hexdigest(),
            "width": 512,
            "height": 512,
        },
        "mask_image_url": {
            "kind": "data_uri",
            "content_type": "image/webp",
            "bytes": len(mask_webp),
            "sha256": hashlib.sha256(mask_webp).hexdigest(),
            "width": 512,
            "height": 512,
        },
    }


def test_the_control_api_reports_url_inputs_and_404s_an_unknown_request(
    http: requests.Session, base_url: str
) -> None:
    jpeg = encoded(make_sample_image(), "JPEG", quality=80)
    accepted = submit_ok(
        http, base_url, "[emulator:queue=30]", image_url=data_uri(jpeg, "image/jpeg")
    )
    received = http.get(f"{base_url}/_emulator/requests/{accepted['request_id']}").json()
    assert received["status"] == "in_queue"
    assert received["inputs"]["image_url"]["sha256"] == hashlib.sha256(jpeg).hexdigest()
    assert received["inputs"]["mask_image_url"] == {
        "kind": "url",
        "url": f"{base_url}/samples/mask.png",
    }
    unknown = http.get(f"{base_url}/_emulator/requests/no-such-id")
    assert (unknown.status_code, unknown.json()["error_code"]) == (404, 404001)


SAMPLE_PNG = make_sample_image()
BAD_DATA_URIS = {
    "not base64": ("image_url", lambda: "data:image/png;base64,iVBORw0K$$$", "not valid base64"),
    "base64 with a line break": (
        "mask_image_url",
        lambda: data_uri(SAMPLE_PNG)[:60] + "\n" + data_uri(SAMPLE_PNG)[60:],
        "not valid base64",
    ),
    "not marked base64": ("image_url", lambda: "data:image/png,abc", "must be data:image/"),
    "a type not accepted": (
        "image_url",
        lambda: data_uri(encoded(SAMPLE_PNG, "GIF"), "image/gif"),
        "'image/gif' is not one of",
    ),
    "declared jpeg, bytes png": (
        "mask_image_url",
        lambda: data_uri(make_sample_mask(), "image/jpeg"),
        "declared image/jpeg but the bytes are PNG",
    ),
    "not an image": ("image_url", lambda: data_uri(b"plain text, no picture"), "is not an image"),
    "truncated": (
        "image_url",
        lambda: data_uri(SAMPLE_PNG[: len(SAMPLE_PNG) // 2]),
        "not a decodable image",
    ),
    "over 6 MiB": (
        "image_url",
        lambda: data_uri(zero_png(2600, 2600, level=0)),
        "bytes; at most 6291456 (6 MiB)",
    ),
    "over 32 megapixels": (
        "mask_image_url",
        lambda: data_uri(zero_png(6000, 6000)),
        "6000x6000 = 36000000 pixels; at most 32000000",
    ),
    # 100 MP: Pillow warns (an error under pytest), production relies on the check above.
    "100 megapixels": (
        "image_url",
        lambda: data_uri(zero_png(10000, 10000, bit_depth=1)),
        "at most 32000000",
    ),
    "a decompression bomb": (
        "image_url",
        lambda: data_uri(zero_png(20000, 20000, bit_depth=1)),
        "decompression bomb",
    ),
}


@pytest.mark.parametrize("case", list(BAD_DATA_URIS))
def test_each_bad_data_uri_is_422001_with_a_readable_detail_and_creates_nothing(
    http: requests.Session, base_url: str, case: str
) -> None:
    field_name, build, expected_msg = BAD_DATA_URIS[case]
    prompt = f"bad data URI: {case}"
    response = submit(http, base_url, prompt, **{field_name: build()})
    assert response.status_code == 422, response.text
    body = response.json()
    assert (body["error_code"], body["error_message"]) == (422001, "invalid input")
    [problem] = body["detail"]
    assert problem["loc"] == ["body", field_name]
    assert problem["msg"].startswith("data URI ")
    assert expected_msg in problem["msg"]
    assert prompt not in stats(http, base_url)["submits_by_prompt"]


def test_a_body_over_64_mib_is_422001_and_creates_nothing(
    http: requests.Session, base_url: str
) -> None:
    prompt = "x" * (64 * 1024 * 1024)
    response = http.post(
        f"{base_url}{MODEL_PATH}",
        data=json.dumps(sample_input(base_url, prompt)),
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 422
    assert response.json()["detail"] == [
        {
            "loc": ["body"],
            "msg": "request body is over 67108864 bytes (64 MiB)",
            "type": "value_error",
        }
    ]
    assert stats(http, base_url)["submits"] == 0


def test_held_inputs_drop_the_least_recently_used_past_their_byte_budget() -> None:
    held = HeldInputs(max_bytes=10)
    first = held.hold(b"a" * 6)
    assert held.hold(b"a" * 6) == first  # the same bytes are held once
    second = held.hold(b"b" * 6)
    assert held.take(second, "mask_image_url") == b"b" * 6
    with pytest.raises(InputFetchError, match="image_url: the data URI's bytes are no longer held"):
        held.take(first, "image_url")


def test_an_output_answers_until_output_ttl_s_then_404(
    http: requests.Session, base_url: str
) -> None:
    assert http.get(f"{base_url}/_emulator/faults").json()["output_ttl_s"] == OUTPUT_TTL_S
    assert http.post(f"{base_url}/_emulator/faults", json={"output_ttl_s": -1}).status_code == 400
    set_faults(http, base_url, output_ttl_s=1.0)
    accepted = submit_ok(http, base_url, f"short-lived {QUICK}", seed=987)
    result = wait_for_result(http, accepted["result_url"])
    [output_url] = result["output"]["images"]
    fresh = requests.get(output_url)
    assert fresh.status_code == 200
    assert decode_image(fresh.content).size == (512, 512)
    time.sleep(1.2)
    deleted = requests.get(output_url)
    assert deleted.status_code == 404
    assert deleted.json() == {"error_code": 404002, "error_message": "output not found or expired"}
    assert http.get(accepted["result_url"]).json()["output"] == result["output"]


# --- cancel, unknown and expired ids --------------------------------------------------


def test_cancel_while_queued_cancels_for_good(http: requests.Session, base_url: str) -> None:
    accepted = submit_ok(http, base_url, "[emulator:queue=5]")
    response = http.post(accepted["cancel_url"])
    assert response.status_code == 202
    assert response.json() == {
        "request_id": accepted["request_id"],
        "status": "cancelled",
        "outcome": "cancelled",
    }
    assert http.get(accepted["status_url"]).json()["status"] == "cancelled"
    result = http.get(accepted["result_url"]).json()
    assert result["status"] == "cancelled"
    assert result["finished_at"] is not None
    assert "output" not in result


def test_cancel_once_running_is_not_cancellable_and_the_run_completes(
    http: requests.Session, base_url: str
) -> None:
    accepted = submit_ok(http, base_url, "[emulator:queue=0][emulator:run=1]")
    response = http.post(accepted["cancel_url"])
    assert response.status_code == 202
    assert response.json()["outcome"] == "not_cancellable"
    assert response.json()["status"] == "in_progress"
    assert wait_for_result(http, accepted["result_url"])["status"] == "succeeded"
    after_end = http.post(accepted["cancel_url"]).json()
    assert (after_end["outcome"], after_end["status"]) == ("not_cancellable", "completed")


def test_unknown_and_expired_ids_are_404001(http: requests.Session, base_url: str) -> None:
    expected = {"error_code": 404001, "error_message": "request not found or expired"}
    for method, suffix in (("GET", "status"), ("GET", "result"), ("POST", "cancel")):
        response = http.request(method, f"{base_url}/v1/requests/no-such-id/{suffix}")
        assert response.status_code == 404
        assert response.json() == expected
    accepted = submit_ok(http, base_url, QUICK)
    set_faults(http, base_url, request_ttl_s=0.1)
    time.sleep(0.15)
    expired = http.get(accepted["status_url"])
    assert expired.status_code == 404
    assert expired.json() == expected


# --- global faults ------------------------------------------------------------------


def test_429_with_and_without_retry_after_creates_nothing(
    http: requests.Session, base_url: str
) -> None:
    set_faults(http, base_url, rate_429=1.0, retry_after_s=3)
    limited = submit(http, base_url, "rate limited")
    assert limited.status_code == 429
    assert limited.headers["Retry-After"] == "3"
    assert limited.json() == {"error_code": 429001, "error_message": "too many requests"}
    set_faults(http, base_url, retry_after_s=None)
    limited = http.get(f"{base_url}/v1/requests/any/status")
    assert limited.status_code == 429
    assert "Retry-After" not in limited.headers
    assert "rate limited" not in stats(http, base_url)["submits_by_prompt"]


def test_5xx_on_every_call_creates_nothing(http: requests.Session, base_url: str) -> None:
    set_faults(http, base_url, rate_5xx=1.0)
    for _ in range(4):
        response = submit(http, base_url, "server down")
        assert response.status_code in (500, 502, 503)
        assert response.json() == {"error_code": 500001, "error_message": "internal error"}
    assert "server down" not in stats(http, base_url)["submits_by_prompt"]


def test_5xx_after_accept_creates_the_request_anyway(http: requests.Session, base_url: str) -> None:
    set_faults(http, base_url, rate_5xx_after_accept=1.0)
    response = submit(http, base_url, "ambiguous submit")
    assert response.status_code >= 500
    current = stats(http, base_url)
    assert current["submits_by_prompt"]["ambiguous submit"] == 1
    assert current["submits"] >= 1


def test_200_with_error_code_is_an_error(http: requests.Session, base_url: str) -> None:
    set_faults(http, base_url, rate_200_error=1.0)
    response = submit(http, base_url, "looks fine")
    assert response.status_code == 200
    assert response.json()["error_code"] == 500001
    assert "request_id" not in response.json()


def test_slow_answers(http: requests.Session, base_url: str) -> None:
    set_faults(http, base_url, rate_slow=1.0, slow_s=0.3)
    started = time.monotonic()
    response = http.get(f"{base_url}/v1/requests/any/status")
    assert response.status_code == 404
    assert time.monotonic() - started >= 0.3


def test_trickled_answers(http: requests.Session, base_url: str) -> None:
    """The whole answer, its body a byte at a time: reads never wait long, the answer does."""
    set_faults(http, base_url, rate_trickle=1.0, trickle_s=2.0)
    started = time.monotonic()
    with http.get(f"{base_url}/v1/requests/any/status", stream=True, timeout=5) as response:
        assert response.status_code == 404
        headers_s = time.monotonic() - started
        body = response.raw.read()
    assert headers_s < 1.0  # the headers at once (a slow answer holds them back)
    assert time.monotonic() - started >= 1.5  # the body over (most of) trickle_s
    assert json.loads(body)["error_code"] == 404001


def test_seeded_faults_are_reproducible(http: requests.Session, base_url: str) -> None:
    def status_codes() -> list[int]:
        set_faults(http, base_url, seed=7, rate_429=0.5)
        return [http.get(f"{base_url}/v1/requests/x/status").status_code for _ in range(12)]

    first = status_codes()
    assert set(first) == {404, 429}
    assert status_codes() == first


# --- per-request directives -----------------------------------------------------------


@pytest.mark.parametrize(
    ("directive", "http_status", "error_code"),
    [
        ("submit-200-error", 200, 400001),
        ("submit-500", 500, 500001),
        ("submit-429", 429, 429001),
        ("submit-503", 503, 500001),
    ],
)
def test_submit_directives_answer_without_creating_a_request(
    http: requests.Session, base_url: str, directive: str, http_status: int, error_code: int
) -> None:
    prompt = f"refused [emulator:{directive}]"
    response = submit(http, base_url, prompt)
    assert response.status_code == http_status
    assert response.json()["error_code"] == error_code
    assert prompt not in stats(http, base_url)["submits_by_prompt"]
    if http_status in (429, 503):  # with the retry_after_s knob, as a load balancer sends it
        assert response.headers["Retry-After"] == "1"


def test_bad_status_directive_reports_an_unknown_status(
    http: requests.Session, base_url: str
) -> None:
    accepted = submit_ok(http, base_url, f"{QUICK}[emulator:bad-status]")
    assert http.get(accepted["status_url"]).json()["status"] == "exploded"
    assert http.get(accepted["result_url"]).json()["status"] == "exploded"


@pytest.mark.parametrize(
    ("directive", "queued", "running"),
    [
        ("[emulator:queued-word=pending]", "pending", "in_progress"),
        ("[emulator:queued-word=waiting][emulator:running-word=starting]", "waiting", "starting"),
        ("[emulator:running-word=processing]", "in_queue", "processing"),
        ("[emulator:queued-word=mulling][emulator:running-word=thinking]", "mulling", "thinking"),
    ],
)
def test_status_word_directives_answer_other_words_until_the_real_end(
    http: requests.Session, base_url: str, directive: str, queued: str, running: str
) -> None:
    accepted = submit_ok(http, base_url, f"{directive}[emulator:queue=1][emulator:run=1]")
    assert http.get(accepted["status_url"]).json()["status"] == queued
    assert http.get(accepted["result_url"]).json()["status"] == queued
    time.sleep(1.1)
    assert http.get(accepted["status_url"]).json()["status"] == running
    assert http.get(accepted["result_url"]).json()["status"] == running
    time.sleep(1.0)
    assert wait_for_result(http, accepted["result_url"])["status"] == "succeeded"


def test_status_word_knobs_switch_the_words_of_every_new_request(
    http: requests.Session, base_url: str
) -> None:
    set_faults(http, base_url, queued_word="pending", running_word="thinking")
    accepted = submit_ok(http, base_url, "[emulator:queue=0.4][emulator:run=30]")
    assert http.get(accepted["status_url"]).json()["status"] == "pending"
    time.sleep(0.5)
    assert http.get(accepted["result_url"]).json()["status"] == "thinking"
    refused = http.post(f"{base_url}/_emulator/faults", json={"running_word": "Not A Word!"})
    assert refused.status_code == 400 and "running_word" in refused.json()["error_message"]


def test_a_bad_status_word_directive_is_refused_as_invalid_input(
    http: requests.Session, base_url: str
) -> None:
    response = submit(http, base_url, "[emulator:running-word=]")
    assert response.status_code == 422
    assert "running-word" in response.json()["detail"][0]["msg"]


def test_no_status_directive_leaves_the_status_out_of_every_answer(
    http: requests.Session, base_url: str
) -> None:
    accepted = submit_ok(http, base_url, f"{QUICK}[emulator:no-status]")
    assert "status" not in http.get(accepted["status_url"]).json()
    result = http.get(accepted["result_url"]).json()
    assert "status" not in result and result["request_id"] == accepted["request_id"]


def test_no_output_directive_succeeds_without_output(http: requests.Session, base_url: str) -> None:
    result = wait_for_result(
        http, submit_ok(http, base_url, f"{QUICK}[emulator:no-output]")["result_url"]
    )
    assert result["status"] == "succeeded"
    assert "output" not in result


def test_output_host_directive_names_another_host_for_the_output(
    http: requests.Session, base_url: str
) -> None:
    accepted = submit_ok(http, base_url, f"{QUICK}[emulator:output-host=evil.example:8443]")
    [url] = wait_for_result(http, accepted["result_url"])["output"]["images"]
    assert url.startswith("http://evil.example:8443/outputs/")
    own = f"{base_url}/outputs/{url.rsplit('/', 1)[1]}"
    assert http.get(own).status_code == 200  # rendered all the same: only its URL differs
    refused = submit(http, base_url, "[emulator:output-host=a/b]")
    assert refused.status_code == 422 and "output-host" in refused.json()["detail"][0]["msg"]


def test_output_gone_directive_names_an_output_that_answers_404(
    http: requests.Session, base_url: str
) -> None:
    accepted = submit_ok(http, base_url, f"{QUICK}[emulator:output-gone]")
    result = wait_for_result(http, accepted["result_url"])
    [url] = result["output"]["images"]
    assert result["status"] == "succeeded" and "/outputs/gone/" in url
    assert http.get(url).status_code == 404


def test_poll_500_directive_fails_the_first_polls(http: requests.Session, base_url: str) -> None:
    accepted = submit_ok(http, base_url, f"{QUICK}[emulator:poll-500=2]")
    assert http.get(accepted["status_url"]).status_code == 500
    assert http.get(accepted["result_url"]).status_code == 500
    assert http.get(accepted["result_url"]).json()["status"] == "succeeded"


def test_poll_429_directive_answers_429_with_the_retry_after_knob_first(
    http: requests.Session, base_url: str
) -> None:
    accepted = submit_ok(http, base_url, f"{QUICK}[emulator:poll-429=2][emulator:poll-500=1]")
    first = http.get(accepted["status_url"])
    assert (first.status_code, first.headers["Retry-After"]) == (429, "1")
    assert first.json()["error_code"] == 429001
    assert http.get(accepted["result_url"]).status_code == 429
    assert http.get(accepted["result_url"]).status_code == 500
    assert http.get(accepted["result_url"]).json()["status"] == "succeeded"


# --- price, cost and the account ------------------------------------------------------


def test_the_model_route_answers_the_list_price_per_output(
    http: requests.Session, base_url: str
) -> None:
    answer = http.get(f"{base_url}{MODEL_PATH}")
    assert answer.status_code == 200
    body = answer.json()
    assert body["model_id"] == "tongyi-mai/z-image/turbo/inpainting/lora"
    assert (body["base_price_usd"], body["price_unit"]) == (0.0125, "output")
    assert body["pricing_note"]
    set_faults(http, base_url, base_price_usd=0.02)
    assert http.get(f"{base_url}{MODEL_PATH}").json()["base_price_usd"] == 0.02
    assert http.get(f"{base_url}/v1/models/some/other").json()["error_code"] == 400001
    refused = requests.get(f"{base_url}{MODEL_PATH}", headers={"Authorization": "Bearer nope"})
    assert refused.status_code == 401 and refused.json()["error_code"] == 400004
    assert stats(http, base_url)["calls"]["price"] == 4


def test_a_result_carries_its_cost_only_when_asked(http: requests.Session, base_url: str) -> None:
    set_faults(http, base_url, base_price_usd=0.03)
    accepted = submit_ok(http, base_url, f"costed {QUICK}")
    set_faults(http, base_url, base_price_usd=0.5)  # the price when accepted is what is billed
    plain = wait_for_result(http, accepted["result_url"])
    assert plain["status"] == "succeeded" and "cost" not in plain
    costed = http.get(accepted["result_url"], params={"include_cost": "true"}).json()
    assert costed["cost"] == 0.03 and costed["output"] == plain["output"]
    set_faults(http, base_url, include_cost=False)
    assert "cost" not in http.get(accepted["result_url"], params={"include_cost": "true"}).json()


def test_a_run_not_finished_has_no_cost_yet_and_failures_and_cancels_cost_nothing(
    http: requests.Session, base_url: str
) -> None:
    going = submit_ok(http, base_url, "going [emulator:queue=30]")
    assert "cost" not in http.get(going["result_url"], params={"include_cost": "true"}).json()
    assert http.post(going["cancel_url"]).json()["outcome"] == "cancelled"
    cancelled = http.get(going["result_url"], params={"include_cost": "true"}).json()
    assert (cancelled["status"], cancelled["cost"]) == ("cancelled", 0.0)
    failed = submit_ok(http, base_url, f"failing {QUICK}[emulator:fail]")
    wait_for_result(http, failed["result_url"])
    ended = http.get(failed["result_url"], params={"include_cost": "true"}).json()
    assert (ended["status"], ended["cost"]) == ("failed", 0.0)


def test_out_of_balance_refuses_submits_while_accepted_requests_go_on(
    http: requests.Session, base_url: str
) -> None:
    accepted = submit_ok(http, base_url, "paid before [emulator:queue=0.2][emulator:run=0.2]")
    set_faults(http, base_url, account="out_of_balance")
    refused = submit(http, base_url, "refused for the balance")
    assert refused.status_code == 402
    assert refused.json()["error_code"] == 400002 and refused.json()["error_message"]
    assert "refused for the balance" not in stats(http, base_url)["submits_by_prompt"]
    assert http.get(accepted["status_url"]).status_code == 200
    assert wait_for_result(http, accepted["result_url"])["status"] == "succeeded"
    assert http.get(f"{base_url}{MODEL_PATH}").status_code == 200
    set_faults(http, base_url, account="ok")
    assert submit(http, base_url, "after the top-up").status_code == 200


def test_token_refused_refuses_every_call_until_switched_back(
    http: requests.Session, base_url: str
) -> None:
    accepted = submit_ok(http, base_url, f"before the token went {QUICK}")
    set_faults(http, base_url, account="token_refused")
    for method, url in (
        ("POST", f"{base_url}{MODEL_PATH}"),
        ("GET", accepted["status_url"]),
        ("GET", accepted["result_url"]),
        ("POST", accepted["cancel_url"]),
        ("GET", f"{base_url}{MODEL_PATH}"),
    ):
        answer = http.request(method, url, json=sample_input(base_url, "x"))
        assert answer.status_code == 401, (method, url)
        assert answer.json()["error_code"] == 400004
    set_faults(http, base_url, account="ok")
    assert wait_for_result(http, accepted["result_url"])["status"] == "succeeded"


@pytest.mark.parametrize(
    "knobs",
    [{"account": "broke"}, {"include_cost": 1}, {"base_price_usd": -1}, {"base_price_usd": "1"}],
)
def test_bad_price_and_account_knobs_are_refused(
    http: requests.Session, base_url: str, knobs: dict[str, Any]
) -> None:
    assert http.post(f"{base_url}/_emulator/faults", json=knobs).status_code == 400


# --- control API and command line -----------------------------------------------------


def test_control_endpoints(http: requests.Session, base_url: str) -> None:
    knobs = http.get(f"{base_url}/_emulator/faults").json()
    assert (knobs["queue_s"], knobs["run_s"], knobs["output_style"]) == (0.3, 0.3, "images")
    merged = http.post(f"{base_url}/_emulator/faults", json={"rate_fail": 0.25}).json()
    assert (merged["rate_fail"], merged["queue_s"]) == (0.25, 0.3)
    assert http.post(f"{base_url}/_emulator/faults", json={"rate_4299": 1}).status_code == 400
    assert http.post(f"{base_url}/_emulator/faults", json={"rate_429": 2}).status_code == 400

    submit_ok(http, base_url, f"counted {QUICK}")
    current = stats(http, base_url)
    assert current["submits_by_prompt"][f"counted {QUICK}"] == 1
    assert current["calls"]["submit"] >= 1
    assert current["responses"]["200"] >= 1
    assert sum(current["requests"].values()) >= 1

    restored = http.post(f"{base_url}/_emulator/reset").json()
    assert restored["rate_fail"] == 0.0
    cleared = stats(http, base_url)
    assert cleared["submits"] == 0
    assert cleared["calls"] == {"submit": 0, "status": 0, "result": 0, "cancel": 0, "price": 0}
    assert sum(cleared["requests"].values()) >= 1


def test_command_line_serves_and_stops_on_sigterm() -> None:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "emulator",
        "--port",
        str(port),
        "--token",
        TOKEN,
        "--public-url",
        "http://emulator.test:9000/",
        "--output-ttl-s",
        "60",
        "--quiet",
    ]
    environment = {**os.environ, "EMULATOR_FAULTS": '{"queue_s": 0.2, "rate_fail": 0.5}'}
    with subprocess.Popen(
        command,
        cwd=PROJECT_ROOT,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as process:
        try:
            assert process.stdout is not None
            assert (
                process.stdout.readline().strip()
                == f"emulator listening on http://127.0.0.1:{port}"
            )
            base_url = f"http://127.0.0.1:{port}"
            knobs = requests.get(f"{base_url}/_emulator/faults").json()
            assert (knobs["queue_s"], knobs["rate_fail"], knobs["output_ttl_s"]) == (0.2, 0.5, 60)
            accepted = requests.post(
                f"{base_url}{MODEL_PATH}",
                json=sample_input(base_url, "cli"),
                headers={"Authorization": f"Bearer {TOKEN}"},
            ).json()
            assert accepted["status_url"].startswith("http://emulator.test:9000/v1/requests/")
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=5) == 0


def test_run_spread_makes_each_run_last_its_own_time(http: requests.Session, base_url: str) -> None:
    """`[emulator:run-spread=S]`: a run of `run` plus a random 0 to S seconds, each request its
    own draw — run times that vary, as RunComfy's do."""
    spread = "[emulator:queue=0][emulator:run=0.1][emulator:run-spread=0.8]"
    accepted = [submit_ok(http, base_url, f"spread {i} {spread}") for i in range(8)]
    lasted = []
    for each in accepted:
        body = wait_for_result(http, each["result_url"])
        assert body["status"] == "succeeded", body
        created = datetime.fromisoformat(body["created_at"].replace("Z", "+00:00"))
        finished = datetime.fromisoformat(body["finished_at"].replace("Z", "+00:00"))
        lasted.append((finished - created).total_seconds())
    assert all(0.1 <= s <= 0.9 + 0.05 for s in lasted), lasted
    assert max(lasted) - min(lasted) >= 0.2, lasted  # eight draws of 0-0.8 s: not all alike


def test_run_spread_needs_seconds() -> None:
    assert parse_directives("[emulator:run-spread=1.5]").run_spread_s == 1.5
    with pytest.raises(DirectiveError):
        parse_directives("[emulator:run-spread=-1]")
    with pytest.raises(DirectiveError):
        parse_directives("[emulator:run-spread]")
