"""Phase 5, delivery: what a webhook attempt to an https receiver costs the worker, with a new
connection each time (as before connections were kept) and with the connection kept.

The attempts go through the production egress session (address check, pinning, TLS with
certificate and SNI checked) exactly as `WebhookDelivery` sends them — streamed, held to a
deadline, a short answer read to its end so the connection is kept — to a local HTTPS receiver
that keeps connections alive and answers 204, as `inpaint-gateway listen` does, or 200 with a
short JSON body, as many web frameworks do by default. The receiver uses a
P-256 certificate made with openssl (a cheap handshake: an RSA-2048 one costs more). CPU is the
sending thread's own (`time.thread_time`), so the receiver's share is not in it.
"""

from __future__ import annotations

import functools
import shutil
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bench.common import Row, Sizes, fmt, per_call, say
from core.http.deadlines import DEADLINES
from core.http.egress import EgressPolicy, egress_session, keep_connection_after_answer

HOST = "127.0.0.1"  # a literal address: no resolver in the way (the certificate names it)


class _Answer(BaseHTTPRequestHandler):
    """/204: 204 without a body; /200: 200 with a short JSON body."""

    protocol_version = "HTTP/1.1"
    timeout = 5.0
    # The answer in one write, as production servers send a short one. Unbuffered, the body
    # would follow the headers in a second small segment, which Nagle holds until the client
    # acknowledges the first — and the client delays its ACK (40 ms here).
    wbufsize = 64 * 1024

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b'{"received":true}' if self.path == "/200" else b""
        self.send_response(200 if body else 204)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def run(sizes: Sizes, base: Path) -> list[Row]:
    openssl = shutil.which("openssl")
    if openssl is None:
        return [Row("delivery", "https webhook attempts", "skipped: openssl is not installed")]
    base.mkdir(parents=True, exist_ok=True)
    cert, key = base / "cert.pem", base / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-nodes", "-days", "1", "-newkey", "ec",
         "-pkeyopt", "ec_paramgen_curve:prime256v1", "-subj", "/CN=bench receiver",
         "-addext", f"subjectAltName=IP:{HOST}", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    server = ThreadingHTTPServer((HOST, 0), _Answer)
    server.daemon_threads = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    base_url = f"https://{HOST}:{server.server_address[1]}"
    body = b"x" * 3000  # about a job.succeeded event's size
    try:
        with egress_session(EgressPolicy.from_cidrs([f"{HOST}/32"])) as session:

            def attempt(answer: int, keep: bool) -> None:
                with DEADLINES.within(15.0), session.post(
                    f"{base_url}/{answer}", data=body, stream=True, timeout=(5, 15),
                    verify=str(cert), allow_redirects=False,
                ) as response:  # fmt: skip
                    assert response.status_code == answer, response.status_code
                    if keep:
                        keep_connection_after_answer(response)

            n = sizes.delivery_attempts
            say(f"delivery: {n} https attempts with a new connection each, then {n} kept (204), "
                f"then {n} kept (200 with a body)")  # fmt: skip
            # CPU of this thread only: the receiver's threads are in this process too.
            sending = functools.partial(per_call, n, cpu_clock=time.thread_time, warm_up=1)
            new_cpu, new_wall = sending(lambda: attempt(204, keep=False))
            kept_cpu, kept_wall = sending(lambda: attempt(204, keep=True))
            body_cpu, body_wall = sending(lambda: attempt(200, keep=True))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    return [
        Row("delivery", f"https webhook attempt, sender's CPU: new connection each / kept, "
            f"204 / kept, 200 with a short body ({n} each, P-256 certificate)",
            f"{fmt(new_cpu * 1000, 'ms', 2)} / {fmt(kept_cpu * 1000, 'ms', 2)} / "
            f"{fmt(body_cpu * 1000, 'ms', 2)}"),
        Row("delivery", "https webhook attempt, wall time: new connection each / kept, 204 / "
            "kept, 200 with a short body",
            f"{fmt(new_wall * 1000, 'ms', 2)} / {fmt(kept_wall * 1000, 'ms', 2)} / "
            f"{fmt(body_wall * 1000, 'ms', 2)}"),
    ]  # fmt: skip
