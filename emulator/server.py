"""The emulator's HTTP server: waitress, which keeps connections alive as RunComfy's does.

werkzeug's development server closes every connection after one answer (`Connection: close`),
so a gateway pointed at it paid a TCP connect for every call — work the real upstream, behind
its load balancers, does not ask of it — and the emulator a thread per connection. waitress
keeps HTTP/1.1 connections open, reads each request whole before the app sees it (a body
refused unread cannot spoil the next request on the connection), and sends every write at
once, so a trickled answer still arrives a byte at a time.
"""

from __future__ import annotations

import threading
from typing import Any

from waitress import create_server
from waitress.wasyncore import close_all

# Requests answered at once. A slow-answer fault holds a thread for its whole delay: enough for
# every worker thread of a test's or benchmark's gateway (64 each) to wait on one together.
SERVER_THREADS = 256
# Open connections at once: each gateway process pools up to 64 per host, and webhook-less
# tests open many short-lived ones besides.
CONNECTION_LIMIT = 4096
# An idle kept-alive connection is closed after this long (the gateway's pool then reconnects).
IDLE_CLOSE_S = 120


class EmulatorServer:
    """A WSGI app served on (host, port) in a background thread; `port` is the one bound."""

    def __init__(self, app: Any, host: str, port: int) -> None:
        self._connections: dict[int, Any] = {}  # the listening socket and each connection
        self._server = create_server(
            app,
            map=self._connections,
            host=host,
            port=port,
            threads=SERVER_THREADS,
            connection_limit=CONNECTION_LIMIT,
            channel_timeout=IDLE_CLOSE_S,
            # poll(), not select(): select cannot watch a descriptor numbered past 1023.
            asyncore_use_poll=True,
            ident="runcomfy-emulator",
        )
        self.port = int(self._server.effective_port)
        self._thread = threading.Thread(
            target=self._server.run, name="emulator-server", daemon=True
        )

    def start(self) -> EmulatorServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, let the answers being made finish (up to 5 s), close every
        connection, and wait for the serving thread to end."""
        self._server.close()
        self._server.task_dispatcher.shutdown(cancel_pending=True, timeout=5)
        close_all(self._connections, ignore_all=True)  # the serving loop ends once none is left
        self._thread.join(timeout=5)
