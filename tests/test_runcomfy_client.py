"""RunComfyClient against the emulator over real HTTP: every answer shape mapped."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

import core.http.deadlines
from cli.stack import EMULATOR_TOKEN, Stack, free_port, wait_until
from core.http.names import NameLookup
from tests.support.peers import DnsPeer, dns_peer, raw_peer
from workers.runcomfy import (
    MAX_ANSWER_BYTES,
    MAX_ERROR_TEXT,
    MAX_STATUS_WORD,
    OUT_OF_BALANCE,
    TOKEN_REFUSED,
    AccountRefusedError,
    PermanentUpstreamError,
    RunComfyClient,
    TransientUpstreamError,
    UnknownRequestError,
    UnusableAnswerError,
    _cost,
    _images_of,
    _interpret,
    _readable_error,
    _status_of,
    shortened,
)

MODEL = "tongyi-mai/z-image/turbo/inpainting/lora"
pytestmark = pytest.mark.integration


@pytest.fixture
def client(stack: Stack) -> Iterator[RunComfyClient]:
    c = RunComfyClient(
        base_url=stack.emulator_url, token=EMULATOR_TOKEN, model_id=MODEL, timeout_s=5
    )
    yield c
    c.close()


@pytest.fixture
def faults(stack: Stack) -> Iterator[Any]:
    """Set global emulator faults for one test; always put them back."""

    def set_faults(**knobs: Any) -> None:
        assert stack.emulator("/_emulator/faults", method="POST", json=knobs).status_code == 200

    yield set_faults
    stack.emulator("/_emulator/reset", method="POST")


def inputs(stack: Stack, prompt: str) -> dict[str, Any]:
    return {
        "prompt": f"{prompt} {time.time_ns()}",
        "image_url": f"{stack.emulator_url}/samples/image.png",
        "mask_image_url": f"{stack.emulator_url}/samples/mask.png",
    }


def test_submit_then_follow_to_success(stack: Stack, client: RunComfyClient) -> None:
    submitted = client.submit(inputs(stack, "[emulator:queue=0.5] [emulator:run=0.3]"))
    first = client.status(submitted.request_id)
    assert first.is_queued and isinstance(first.queue_position, int)
    running = client.result(submitted.request_id)
    assert running.status in {"in_queue", "in_progress"} and running.images is None
    done = wait_until(lambda: (r := client.result(submitted.request_id)).is_finished and r)
    assert done.status == "succeeded" and done.images and done.images[0].startswith("http")


def test_failed_result_carries_a_readable_error(stack: Stack, client: RunComfyClient) -> None:
    for shape in ("string", "object", "list"):
        rid = client.submit(
            inputs(
                stack,
                f"[emulator:fail] [emulator:error={shape}] [emulator:queue=0] [emulator:run=0]",
            )
        ).request_id
        state = wait_until(lambda rid=rid: (r := client.result(rid)).is_finished and r)
        assert state.status == "failed" and state.error and "{" not in state.error[:1]


def test_http_200_with_error_code_is_permanent(stack: Stack, client: RunComfyClient) -> None:
    with pytest.raises(PermanentUpstreamError, match="400001"):
        client.submit(inputs(stack, "[emulator:submit-200-error]"))


def test_429_is_transient_and_certainly_not_processed(
    stack: Stack, client: RunComfyClient, faults: Any
) -> None:
    faults(retry_after_s=7)
    with pytest.raises(TransientUpstreamError) as caught:
        client.submit(inputs(stack, "[emulator:submit-429]"))
    assert caught.value.http_status == 429 and caught.value.retry_after_s == 7.0
    assert caught.value.maybe_processed is False
    assert caught.value.asks_to_retry_later  # Retry-After is when to call again


def test_429_without_retry_after(stack: Stack, client: RunComfyClient, faults: Any) -> None:
    faults(retry_after_s=None)
    with pytest.raises(TransientUpstreamError) as caught:
        client.submit(inputs(stack, "[emulator:submit-429]"))
    assert caught.value.retry_after_s is None


def test_5xx_on_submit_may_have_been_processed(stack: Stack, client: RunComfyClient) -> None:
    with pytest.raises(TransientUpstreamError) as caught:
        client.submit(inputs(stack, "[emulator:submit-500]"))
    assert caught.value.http_status == 500 and caught.value.maybe_processed is True
    assert not caught.value.asks_to_retry_later  # backoff; a Retry-After only its floor


def test_unknown_request_id(client: RunComfyClient) -> None:
    with pytest.raises(UnknownRequestError):
        client.status("no-such-request")


def test_a_bad_token_is_the_accounts_refusal_not_the_jobs(stack: Stack) -> None:
    bad = RunComfyClient(base_url=stack.emulator_url, token="wrong", model_id=MODEL, timeout_s=5)
    with pytest.raises(AccountRefusedError, match="401") as caught:
        bad.submit(inputs(stack, "x"))
    assert caught.value.kind == TOKEN_REFUSED and caught.value.code == 400004
    assert not isinstance(caught.value, PermanentUpstreamError)  # no job fails for it
    bad.close()


def test_out_of_balance_refuses_the_submit_for_the_account_and_looks_go_on(
    stack: Stack, client: RunComfyClient, faults: Any
) -> None:
    accepted = client.submit(inputs(stack, "[emulator:queue=30]")).request_id
    faults(account="out_of_balance")
    with pytest.raises(AccountRefusedError, match="402") as caught:
        client.submit(inputs(stack, "x"))
    assert (caught.value.kind, caught.value.http_status, caught.value.code) == (
        OUT_OF_BALANCE,
        402,
        400002,
    )
    assert client.status(accepted).is_queued
    assert client.cancel(accepted).cancelled


def test_a_refused_token_refuses_every_call_for_the_account(
    stack: Stack, client: RunComfyClient, faults: Any
) -> None:
    accepted = client.submit(inputs(stack, "[emulator:queue=30]")).request_id
    faults(account="token_refused")
    calls: list[Callable[[], Any]] = [
        lambda: client.submit(inputs(stack, "x")),
        lambda: client.status(accepted),
        lambda: client.result(accepted),
        lambda: client.cancel(accepted),
        client.list_price_usd,
    ]
    for call in calls:
        with pytest.raises(AccountRefusedError) as caught:
            call()
        assert caught.value.kind == TOKEN_REFUSED


@pytest.mark.parametrize(
    ("http_status", "body", "kind"),
    [
        (402, b"", OUT_OF_BALANCE),
        (402, b'{"error_code": 400002, "error_message": "insufficient balance"}', OUT_OF_BALANCE),
        (200, b'{"error_code": 400002, "error_message": "out of balance"}', OUT_OF_BALANCE),
        (401, b'{"error_code": 400004, "error_message": "token revoked"}', TOKEN_REFUSED),
        (401, b'{"error_code": 401001, "message": "unauthorized"}', TOKEN_REFUSED),
        (403, b'{"error_code": 400004, "error_message": "account inactive"}', TOKEN_REFUSED),
        (403, b"<html>Forbidden</html>", TOKEN_REFUSED),
        (200, b'{"error_code": "400004", "error_message": "token missing"}', TOKEN_REFUSED),
        (403, b'{"error_code": 403001, "error_message": "not your request"}', None),
        (400, b'{"error_code": 400001, "error_message": "no such model"}', None),
    ],
)
def test_answers_that_refuse_the_account_are_told_apart(
    http_status: int, body: bytes, kind: str | None
) -> None:
    with pytest.raises((AccountRefusedError, PermanentUpstreamError)) as caught:
        _interpret("POST", "/v1/models/m", http_status, {}, body)
    if kind is None:
        assert isinstance(caught.value, PermanentUpstreamError)
    else:
        assert isinstance(caught.value, AccountRefusedError) and caught.value.kind == kind


def test_a_finished_result_carries_runcomfys_cost(
    stack: Stack, client: RunComfyClient, faults: Any
) -> None:
    faults(base_price_usd=0.04)
    rid = client.submit(inputs(stack, "[emulator:queue=0] [emulator:run=0]")).request_id
    done = wait_until(lambda: (r := client.result(rid)).is_finished and r)
    assert done.status == "succeeded" and done.cost_usd == 0.04
    faults(include_cost=False)
    assert client.result(rid).cost_usd is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.0125, 0.0125),
        (0, 0.0),
        (3, 3.0),
        ("0.0125", None),
        (-0.01, None),
        (True, None),
        (None, None),
        (float("inf"), None),
        (10**400, None),
        ({"usd": 1}, None),
    ],
)
def test_a_cost_that_is_not_a_number_of_usd_is_ignored(value: Any, expected: float | None) -> None:
    assert _cost(value) == expected


def test_a_result_with_a_cost_not_a_number_is_read_without_it() -> None:
    body = b'{"request_id": "r", "status": "succeeded", "output": {"image": "https://x/1.png"}, "cost": "lots"}'

    def answer(connection: socket.socket, _stop: threading.Event) -> None:
        head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        connection.sendall(head.encode() + body)

    with raw_upstream(answer) as base_url:
        client = RunComfyClient(base_url=base_url, token="t", model_id=MODEL, timeout_s=5.0)
        state = client.result("r")
        client.close()
    assert state.images == ("https://x/1.png",) and state.cost_usd is None


def test_the_list_price_is_read_from_the_model_route(
    stack: Stack, client: RunComfyClient, faults: Any
) -> None:
    assert client.list_price_usd() == 0.0125
    faults(base_price_usd=0.02)
    assert client.list_price_usd() == 0.02


@pytest.mark.parametrize(
    "body",
    [
        b'{"model_id": "m", "price_unit": "output"}',
        b'{"model_id": "m", "base_price_usd": "0.01", "price_unit": "output"}',
        b'{"model_id": "m", "base_price_usd": 0.001, "price_unit": "second"}',
    ],
)
def test_a_list_price_that_is_not_per_image_in_usd_is_an_unusable_answer(body: bytes) -> None:
    def answer(connection: socket.socket, _stop: threading.Event) -> None:
        head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        connection.sendall(head.encode() + body)

    with raw_upstream(answer) as base_url:
        client = RunComfyClient(base_url=base_url, token="t", model_id=MODEL, timeout_s=5.0)
        with pytest.raises(UnusableAnswerError):
            client.list_price_usd()
        client.close()


def test_wrong_model_is_permanent(stack: Stack) -> None:
    bad = RunComfyClient(
        base_url=stack.emulator_url, token=EMULATOR_TOKEN, model_id="no/such/model", timeout_s=5
    )
    with pytest.raises(PermanentUpstreamError, match="400001"):
        bad.submit(inputs(stack, "x"))
    bad.close()


def test_a_status_word_not_known_is_reported_as_is_not_an_error(
    stack: Stack, client: RunComfyClient
) -> None:
    """Deciding what a word not known means is the pipeline's (it follows the request on): the
    client reports it, neither queued, running nor finished, without output or error."""
    rid = client.submit(inputs(stack, "[emulator:bad-status] [emulator:queue=0]")).request_id
    state = wait_until(lambda: (s := client.result(rid)).status == "exploded" and s)
    assert not state.is_known and not (state.is_queued or state.is_running or state.is_finished)
    assert state.images is None and state.error is None


@pytest.mark.parametrize(
    ("directive", "word", "queued"),
    [
        ("[emulator:queued-word=pending] [emulator:queue=30]", "pending", True),
        ("[emulator:queued-word=waiting] [emulator:queue=30]", "waiting", True),
        ("[emulator:running-word=starting] [emulator:queue=0] [emulator:run=30]", "starting", False),
        ("[emulator:running-word=processing] [emulator:queue=0] [emulator:run=30]", "processing", False),
    ],
)  # fmt: skip
def test_runcomfys_other_words_for_a_request_still_going_are_known(
    stack: Stack, client: RunComfyClient, directive: str, word: str, queued: bool
) -> None:
    rid = client.submit(inputs(stack, directive)).request_id
    for state in (client.status(rid), client.result(rid)):
        assert state.status == word and state.is_known
        assert (state.is_queued, state.is_running) == (queued, not queued)


def test_a_status_word_of_any_length_is_kept_short() -> None:
    word = _status_of({"status": " Thinking" + "-hard" * 2000})
    assert len(word) == MAX_STATUS_WORD and word.startswith("thinking-hard") and word[-1] == "…"


@pytest.mark.parametrize(
    ("text", "limit", "expected"),
    [
        ("the model ran out of memory", 100, "the model ran out of memory"),
        ("the model ran out of memory", 17, "the model ran…"),  # not "the model ran ou…"
        ("the model ran out of memory", 15, "the model ran…"),  # the cut falls on a space
        ("sampling failed: out of memory", 19, "sampling failed…"),  # no dangling colon
        ("https://storage.example.com/very/long/path", 20, "https://storage.exa…"),  # one word
    ],
)
def test_error_text_is_cut_after_a_whole_word_and_the_cut_marked(
    text: str, limit: int, expected: str
) -> None:
    assert shortened(text, limit) == expected
    assert len(shortened(text, limit)) <= limit


def test_a_long_upstream_error_is_cut_between_words() -> None:
    words = " ".join(f"word{n}" for n in range(200))  # 1,289 characters
    readable = _readable_error({"type": "model_error", "message": words})
    assert readable is not None and len(readable) <= MAX_ERROR_TEXT and readable.endswith("…")
    last = readable.removesuffix("…").split()[-1]
    assert re.fullmatch(r"word\d+", last) and last in words.split(), last


def test_slow_answer_times_out_as_transient(stack: Stack, faults: Any) -> None:
    faults(rate_slow=1.0, slow_s=2.0)
    impatient = RunComfyClient(
        base_url=stack.emulator_url, token=EMULATOR_TOKEN, model_id=MODEL, timeout_s=0.5
    )
    with pytest.raises(TransientUpstreamError, match="timed out") as caught:
        impatient.status("anything")
    assert caught.value.maybe_processed is True
    impatient.close()


def test_a_trickled_answer_is_cut_off_at_timeout_s_in_all(stack: Stack, faults: Any) -> None:
    """Each byte within the read timeout, the whole answer far past it: the call still ends at
    timeout_s, so a step never outlives its lease waiting on RunComfy."""
    faults(rate_trickle=1.0, trickle_s=6.0)
    impatient = RunComfyClient(
        base_url=stack.emulator_url, token=EMULATOR_TOKEN, model_id=MODEL, timeout_s=1.0
    )
    started = time.monotonic()
    with pytest.raises(TransientUpstreamError, match="1 s in all") as caught:
        impatient.status("anything")
    assert 1.0 <= time.monotonic() - started < 2.5
    assert caught.value.maybe_processed is True
    impatient.close()


@contextlib.contextmanager
def raw_upstream(answer: Callable[[socket.socket, threading.Event], None]) -> Iterator[str]:
    """A one-answer RunComfy stand-in: reads the request, then `answer(connection, stop)` writes
    whatever it likes. Yields its base URL."""

    def read_then_answer(connection: socket.socket, stop: threading.Event) -> None:
        connection.recv(65536)
        answer(connection, stop)

    with raw_peer(read_then_answer) as port:
        yield f"http://127.0.0.1:{port}"


def test_headers_trickled_after_the_status_are_cut_off_as_transient() -> None:
    """Cut off mid-headers, http.client takes the end of the connection for the end of the
    headers: the answer looks like a 200 with an empty body — a timeout, not a bad payload."""

    def trickle(connection: socket.socket, stop: threading.Event) -> None:
        connection.sendall(b"HTTP/1.1 200 OK\r\n")
        for byte in b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}":
            if stop.wait(0.2):
                return
            connection.sendall(bytes([byte]))

    with raw_upstream(trickle) as base_url:
        impatient = RunComfyClient(base_url=base_url, token="t", model_id=MODEL, timeout_s=1.0)
        with pytest.raises(TransientUpstreamError, match="1 s in all") as caught:
            impatient.submit({})
        assert caught.value.maybe_processed is True  # RunComfy may have taken the submit
        impatient.close()


@pytest.mark.parametrize(
    ("status", "error"),
    [(b"200 OK", PermanentUpstreamError), (b"503 Service Unavailable", TransientUpstreamError)],
)
def test_an_answer_longer_than_max_answer_bytes_is_not_read_further(
    status: bytes, error: type[Exception]
) -> None:
    """A 2xx that long is a bad answer; an error status is judged by its status alone."""
    size = MAX_ANSWER_BYTES * 4

    def flood(connection: socket.socket, stop: threading.Event) -> None:
        head = f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n"
        connection.sendall(b"HTTP/1.1 " + status + b"\r\n" + head.encode())
        for _ in range(size // 65536):
            connection.sendall(b" " * 65536)

    with raw_upstream(flood) as base_url:
        client = RunComfyClient(base_url=base_url, token="t", model_id=MODEL, timeout_s=5.0)
        with pytest.raises(error) as caught:
            client.status("anything")
        assert getattr(caught.value, "http_status", None) == int(status.split()[0])
        if error is PermanentUpstreamError:
            assert f"longer than {MAX_ANSWER_BYTES} bytes" in str(caught.value)
        client.close()


def test_json_nested_deeper_than_python_goes_is_a_bad_answer_not_a_crash() -> None:
    body = b"[" * 100_000

    def deep(connection: socket.socket, _stop: threading.Event) -> None:
        head = f"HTTP/1.1 503 Service Unavailable\r\nContent-Length: {len(body)}\r\n\r\n"
        connection.sendall(head.encode() + body)

    with raw_upstream(deep) as base_url:
        client = RunComfyClient(base_url=base_url, token="t", model_id=MODEL, timeout_s=5.0)
        with pytest.raises(TransientUpstreamError) as caught:
            client.status("anything")
        assert caught.value.http_status == 503
        client.close()


def test_a_failed_result_with_an_error_nested_deep_is_read_not_a_crash() -> None:
    """An error 600 lists deep (1.2 KB) and times of hundreds of digits: a failed run with a
    readable error. (Reading it recursed 600 deep, and the step crashed on every try until the
    job's deadline; a timestamp too big for a float did the same.)"""
    error = "[" * 600 + '"the model fell over"' + "]" * 600
    body = (
        '{"request_id": "r", "status": "failed", "error": ' + error + ","
        ' "created_at": ' + "9" * 400 + ', "finished_at": 1e999}'
    ).encode()

    def deep(connection: socket.socket, _stop: threading.Event) -> None:
        head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        connection.sendall(head.encode() + body)

    with raw_upstream(deep) as base_url:
        client = RunComfyClient(base_url=base_url, token="t", model_id=MODEL, timeout_s=5.0)
        state = client.result("r")
        client.close()
    assert state.status == "failed" and state.error and 0 < len(state.error) <= 500
    assert state.created_at is None and state.finished_at is None


class KeptAliveUpstream(BaseHTTPRequestHandler):
    """Answers every GET with a queued status over HTTP/1.1, connections kept; counts them."""

    protocol_version = "HTTP/1.1"
    connections = 0

    def setup(self) -> None:
        super().setup()
        type(self).connections += 1

    def do_GET(self) -> None:
        body = b'{"request_id": "r", "status": "in_queue", "queue_position": 1}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_calls_reuse_one_kept_alive_connection() -> None:
    handler = type("Handler", (KeptAliveUpstream,), {"connections": 0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    client = RunComfyClient(
        base_url=f"http://127.0.0.1:{server.server_address[1]}",
        token="t",
        model_id=MODEL,
        timeout_s=5.0,
    )
    try:
        for _ in range(3):
            assert client.status("r").queue_position == 1
        assert handler.connections == 1
    finally:
        client.close()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_connection_refused_is_transient_and_not_processed() -> None:
    nowhere = RunComfyClient(
        base_url=f"http://127.0.0.1:{free_port()}", token="t", model_id=MODEL, timeout_s=2
    )
    with pytest.raises(TransientUpstreamError) as caught:
        nowhere.submit({})
    assert caught.value.maybe_processed is False
    nowhere.close()


@pytest.fixture
def names_from(monkeypatch: pytest.MonkeyPatch) -> Callable[[DnsPeer], None]:
    """Have RunComfy's host looked up at a test name server (as resolv.conf's would be)."""

    def use(peer: DnsPeer) -> None:
        monkeypatch.setattr(core.http.deadlines, "NAMES", NameLookup(servers=(peer.address,)))

    return use


def emulator_by_name(stack: Stack, timeout_s: float = 5) -> RunComfyClient:
    port = stack.emulator_url.rsplit(":", 1)[1]
    return RunComfyClient(
        base_url=f"http://runcomfy.test:{port}",
        token=EMULATOR_TOKEN,
        model_id=MODEL,
        timeout_s=timeout_s,
    )


def test_runcomfy_by_name_is_looked_up_and_reached(
    stack: Stack, names_from: Callable[[DnsPeer], None]
) -> None:
    with dns_peer({"runcomfy.test": ["127.0.0.1"]}) as peer:
        names_from(peer)
        client = emulator_by_name(stack)
        with pytest.raises(UnknownRequestError):  # the emulator's own 404: it was reached
            client.status("no-such-request")
        client.close()
        assert "runcomfy.test" in (peer.asked or [])


def test_an_address_that_refuses_is_passed_over_for_the_next(
    stack: Stack, names_from: Callable[[DnsPeer], None]
) -> None:
    """127.0.0.3 refuses (the emulator listens on 127.0.0.1 only); the connection goes on to
    the name's next address, as the system resolver's caller (urllib3) would."""
    with dns_peer({"runcomfy.test": ["127.0.0.3", "127.0.0.1"]}) as peer:
        names_from(peer)
        order = NameLookup(servers=(peer.address,)).addresses("runcomfy.test", 80, 2.0)
        assert order[0] == "127.0.0.3"  # the refusing address is tried first
        client = emulator_by_name(stack)
        with pytest.raises(UnknownRequestError):
            client.status("no-such-request")
        client.close()


def test_an_address_that_does_not_answer_is_passed_over_for_the_next(
    stack: Stack, names_from: Callable[[DnsPeer], None]
) -> None:
    """127.0.0.3 takes no connection: a listener there never accepts, and once its backlog is
    full a connect gets no answer (as from an IPv6 route that drops packets). After the connect
    timeout (0.5 s), the next address."""
    port = int(stack.emulator_url.rsplit(":", 1)[1])
    with contextlib.ExitStack() as held:
        held.enter_context(socket.create_server(("127.0.0.3", port), backlog=0))
        for _ in range(4):  # fill the backlog
            filler = held.enter_context(socket.socket())
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.3", port))
        probe = held.enter_context(socket.socket())
        probe.settimeout(0.3)
        with pytest.raises(TimeoutError):  # the premise: no answer from 127.0.0.3
            probe.connect(("127.0.0.3", port))
        peer = held.enter_context(dns_peer({"runcomfy.test": ["127.0.0.3", "127.0.0.1"]}))
        names_from(peer)
        client = RunComfyClient(
            base_url=f"http://runcomfy.test:{port}",
            token=EMULATOR_TOKEN,
            model_id=MODEL,
            timeout_s=5,
            connect_timeout_s=0.5,
        )
        started = time.monotonic()
        with pytest.raises(UnknownRequestError):  # the emulator's own 404: it was reached
            client.status("no-such-request")
        assert 0.5 <= time.monotonic() - started < 2.0
        client.close()


def test_runcomfy_name_servers_that_never_answer_hold_a_call_only_its_time(
    stack: Stack, names_from: Callable[[DnsPeer], None]
) -> None:
    """socket.getaddrinfo would wait 10 s and more; the lookup gets the call's time (0.5 s), and
    the submit is known not to have been sent: retried as such, not an unknown outcome."""
    with dns_peer(silent=True) as peer:
        names_from(peer)
        client = emulator_by_name(stack, timeout_s=0.5)
        started = time.monotonic()
        with pytest.raises(TransientUpstreamError) as caught:
            client.submit({"prompt": "x"})
        assert time.monotonic() - started < 1.5
        client.close()
    assert caught.value.maybe_processed is False
    assert re.search(r"did not resolve within 0\.\d+ s", str(caught.value))


@pytest.mark.parametrize("records", [{}, {"runcomfy.test": ["127.0.0.3"]}])
def test_no_connection_made_means_the_submit_was_not_sent(
    stack: Stack, names_from: Callable[[DnsPeer], None], records: dict[str, list[str]]
) -> None:
    """A name that does not resolve, or whose only address refuses: not an unknown outcome."""
    with dns_peer(records) as peer:
        names_from(peer)
        client = emulator_by_name(stack)
        with pytest.raises(TransientUpstreamError) as caught:
            client.submit({"prompt": "x"})
        client.close()
    assert caught.value.maybe_processed is False
    assert re.search(r"does not resolve|Connection refused", str(caught.value))
    assert "HTTPConnection" not in str(caught.value)  # no connection repr in the job's error


@pytest.mark.parametrize(
    ("output", "expected"),
    [({"image": "https://a/1.png"}, ("https://a/1.png",)),
     ({"images": ["https://a/1.png", "https://a/2.png"]}, ("https://a/1.png", "https://a/2.png")),
     ({"images": "https://a/1.png"}, ("https://a/1.png",))],
)  # fmt: skip
def test_both_output_styles_become_a_list(
    output: dict[str, Any], expected: tuple[str, ...]
) -> None:
    assert _images_of({"output": output}) == expected


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"output": None},
        {"output": {}},
        {"output": {"images": []}},
        {"output": {"image": "file:///etc/passwd"}},
    ],
)
def test_missing_or_bad_output_is_permanent(body: dict[str, Any]) -> None:
    with pytest.raises(PermanentUpstreamError):
        _images_of(body)


@pytest.mark.parametrize(
    ("error", "expected"),
    [("boom", "boom"), ({"type": "oom", "message": "out of memory"}, "oom: out of memory"),
     ([{"type": "a", "message": "b"}, "c"], "a: b; c"), (None, None), ("x" * 900, "x" * 499 + "…"),
     ([{"loc": ["body", "seed"], "msg": "not an integer", "type": "type_error"}],
      "body.seed: type_error: not an integer")],
)  # fmt: skip
def test_error_shapes_are_readable(error: Any, expected: str | None) -> None:
    assert _readable_error(error) == expected


def test_a_submit_answer_after_interim_answers_is_read_as_the_answer() -> None:
    """An Early Hints (103) from a proxy in RunComfy's place was taken for the answer: "HTTP
    103", a refusal — the job failed while the run it paid for went on, untracked."""
    body = b'{"request_id": "req-after-hints"}'

    def hints_then_answer(connection: socket.socket, stop: threading.Event) -> None:
        connection.sendall(
            b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preconnect\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )

    with raw_upstream(hints_then_answer) as base_url:
        client = RunComfyClient(base_url=base_url, token="t", model_id=MODEL, timeout_s=5.0)
        assert client.submit({}).request_id == "req-after-hints"
        client.close()


def test_a_submit_refused_as_invalid_says_which_field_and_why(client: RunComfyClient) -> None:
    """The emulator answers 422 as RunComfy does: "invalid input" and a `detail` list of
    {loc, msg, type}. Only "invalid input" reached the job's error: not which field, nor why."""
    with pytest.raises(PermanentUpstreamError) as refused:
        client.submit({"prompt": "a sky", "image_url": 7, "mask_image_url": "https://x/m.png"})
    message = refused.value.message
    assert "HTTP 422: invalid input: body.image_url" in message, message
    assert refused.value.code == 422001


@pytest.mark.parametrize("http_status", [200, 400])
def test_an_unknown_request_code_is_an_unknown_request_whatever_the_status(
    http_status: int,
) -> None:
    """404001 ("request id unknown or expired") in an HTTP 200 or 400 answer, as some RunComfy
    APIs send it: the request is lost (upstream_request_lost), not "an answer we cannot use"."""
    body = b'{"error_code": 404001, "error_message": "request not found or expired"}'

    def lost(connection: socket.socket, stop: threading.Event) -> None:
        connection.sendall(
            f"HTTP/1.1 {http_status} X\r\nContent-Type: application/json\r\n".encode()
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )

    with raw_upstream(lost) as base_url:
        client = RunComfyClient(base_url=base_url, token="t", model_id=MODEL, timeout_s=5.0)
        with pytest.raises(UnknownRequestError, match="request not found"):
            client.status("req-gone")
        client.close()
