"""A webhook receiver that verifies Standard Webhooks signatures: `inpaint-gateway listen`.

Teams use it to try their integration; the test suite uses it as the real receiver.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

MAX_BODY_BYTES = 1024 * 1024
# Connections are kept alive between requests, as real receivers do, and closed after this long
# idle (Node's and Apache's default).
IDLE_CLOSE_S = 5.0


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog of 5 overflows when a gateway delivers a burst at once;
    # a real receiver (nginx: 511) would not refuse those connections, so neither does ours.
    request_queue_size = 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._open: set[socket.socket] = set()  # connections being served, kept alive or not
        self._open_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A sender that goes away mid-request (a gateway timing out) is no error of ours."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def close_connections(self) -> None:
        """End the kept-alive connections too: a stopped receiver answers nothing more."""
        with self._open_lock:
            open_now = list(self._open)
        for connection in open_now:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


@dataclass(frozen=True)
class ReceivedEvent:
    """One verified delivery."""

    webhook_id: str
    timestamp: str
    payload: dict[str, Any]
    received_at: float


@dataclass(frozen=True)
class RefusedDelivery:
    """One delivery answered with an error: its signature did not verify, or its body was
    unacceptable."""

    webhook_id: str | None
    status: int
    reason: str


@dataclass
class WebhookReceiver:
    """An HTTP server on (host, port) that verifies every POST with `secret`."""

    secret: str
    host: str = "127.0.0.1"
    port: int = 0
    on_event: Callable[[ReceivedEvent], None] | None = None
    on_refusal: Callable[[RefusedDelivery], None] | None = None
    # Test hook: answer this status (and don't record) instead of 204; None = normal.
    forced_status: int | None = None
    events: list[ReceivedEvent] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._verifier = Webhook(self.secret)
        self._lock = threading.Lock()
        self._server = _Server((self.host, self.port), self._handler_class())
        self.port = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Where to point webhook_url."""
        return f"http://{self.host}:{self.port}/webhook"

    def start(self) -> WebhookReceiver:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted."""
        self._server.serve_forever()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def received(self) -> list[ReceivedEvent]:
        """A copy of the verified events so far."""
        with self._lock:
            return list(self.events)

    def _accept(self, body: bytes, headers: dict[str, str]) -> int:
        if self.forced_status is not None:
            return self.forced_status
        try:
            payload = self._verifier.verify(body.decode(), headers)
        except (WebhookVerificationError, ValueError, UnicodeDecodeError) as exc:
            with self._lock:
                self.rejected.append(str(exc))
            self._refused(headers.get("webhook-id"), 401, f"bad signature: {exc}")
            return 401

        event = ReceivedEvent(
            headers["webhook-id"], headers["webhook-timestamp"], payload, time.time()
        )
        with self._lock:
            self.events.append(event)
        if self.on_event is not None:
            self.on_event(event)
        return 204

    def _refused(self, webhook_id: str | None, status: int, reason: str) -> None:
        if self.on_refusal is not None:
            self.on_refusal(RefusedDelivery(webhook_id, status, reason))

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = IDLE_CLOSE_S

            def do_POST(self) -> None:
                length = self.headers.get("Content-Length", "")
                if "Transfer-Encoding" in self.headers or not length.isdigit():
                    self._refuse(411, "no Content-Length")  # a webhook comes with its length
                    return
                if int(length) > MAX_BODY_BYTES:
                    self._refuse(413, f"body over {MAX_BODY_BYTES} bytes")
                    return
                body = self.rfile.read(int(length))
                headers = {k.lower(): v for k, v in self.headers.items()}
                status = receiver._accept(body, headers)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _refuse(self, status: int, reason: str) -> None:
                """Answer and close: the body is left unread, so this connection cannot go on."""
                receiver._refused(self.headers.get("webhook-id"), status, reason)
                self.close_connection = True
                self.send_response(status)
                self.send_header("Connection", "close")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass  # events are printed by on_event; no access log noise

        return Handler


def print_event(event: ReceivedEvent) -> None:
    """How `inpaint-gateway listen` shows an event."""
    data = event.payload.get("data", {})
    line = {
        "verified": True,
        "webhook_id": event.webhook_id,
        "type": event.payload.get("type"),
        "job_id": data.get("id"),
        "status": data.get("status"),
        "output": data.get("output"),
        "error": data.get("error"),
    }
    print(json.dumps(line), flush=True)


def print_refusal(refused: RefusedDelivery) -> None:
    """How `inpaint-gateway listen` shows a delivery it refused: on stderr, so that stdout stays
    the verified events alone, one JSON line each."""
    print(
        f"refused delivery {refused.webhook_id or '(no webhook-id)'}: answered {refused.status}, "
        f"{refused.reason}",
        file=sys.stderr,
        flush=True,
    )
