"""A total time limit on an HTTP exchange, which requests' timeouts are not.

requests' `timeout=(connect, read)` bounds each wait for bytes, not the exchange: a peer that
sends its answer a byte every few seconds holds the calling thread for as long as it likes.
Inside `DEADLINES.within(seconds)`, every connection of a session mounted with a
`DeadlineAdapter` that the thread uses (connecting, sending, reading) is held by one watcher
thread per process, which shuts its socket down when the time is up: the blocked read returns
at once and the request fails.
"""

from __future__ import annotations

import contextlib
import heapq
import http.client
import itertools
import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError

from core.http.interim import FinalAnswerResponse
from core.http.names import LOOKUP_TIMEOUT_S, NAMES, LookupFailed, ip_literal


class HeldConnection(Protocol):
    """A connection Deadlines can hold to an exchange (as `_HeldToDeadline` below makes one)."""

    sock: socket.socket | None
    last_sock: socket.socket | None
    held_by: Exchange | None

    def close(self) -> None: ...


@dataclass(eq=False)
class Exchange:
    """One exchange made inside `within`: its deadline, and whether it was cut off."""

    deadline: float
    connections: list[HeldConnection] = field(default_factory=list)
    ended: bool = False
    cut_off: bool = False


class Deadlines:
    """Cuts off exchanges that outlive their time: one watcher thread, started on first use."""

    # The watcher looks at most this often, taking everything due at once (an exchange ends
    # by its deadline to within this; waking for each one cost ~16 µs an exchange). A
    # connection's socket may not exist yet when the time is up (still connecting, or swapped
    # for its TLS socket): the watcher looks again this soon, until the exchange ends.
    LOOK_EVERY_S = 0.05

    def __init__(self) -> None:
        self._local = threading.local()
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # no watcher thread survives a fork

    def _reset(self) -> None:
        self._changed = threading.Condition()
        self._due: list[tuple[float, int, Exchange]] = []
        self._order = itertools.count()
        self._watcher: threading.Thread | None = None

    @contextmanager
    def within(self, seconds: float) -> Iterator[Exchange]:
        """Hold every connection this thread uses in the block to `seconds` in all (nested, the
        inner block's exchange holds what is used inside it, by the sooner of the two ends).

        A host name's lookup waits at most what is left (and LOOKUP_TIMEOUT_S): see
        `_HeldToDeadline._connect`. A connection made only after the deadline sends nothing.
        """
        outer: Exchange | None = getattr(self._local, "exchange", None)
        deadline = time.monotonic() + seconds
        exchange = Exchange(deadline=min(deadline, outer.deadline) if outer else deadline)
        self._local.exchange = exchange
        self._watch_until(exchange, exchange.deadline)
        try:
            yield exchange
        finally:
            self._local.exchange = outer
            with self._changed:  # the watcher drops it when it comes due
                exchange.ended = True
                exchange.connections.clear()

    def left_s(self) -> float | None:
        """Seconds left to this thread's exchange (None outside one)."""
        exchange: Exchange | None = getattr(self._local, "exchange", None)
        return None if exchange is None else exchange.deadline - time.monotonic()

    def hold(self, connection: HeldConnection) -> None:
        """Hold `connection` to this thread's exchange, if in one: called before it connects or
        sends, so every socket it has from then on is this exchange's."""
        exchange: Exchange | None = getattr(self._local, "exchange", None)
        with self._changed:
            connection.held_by = exchange
            if exchange is not None and connection not in exchange.connections:
                exchange.connections.append(connection)

    def let_go(self, connection: HeldConnection) -> None:
        """Free `connection` from its exchange as it goes back to its pool, closed first if the
        exchange was cut off: a connection in the pool is never cut off under its next user."""
        with self._changed:
            exchange, connection.held_by = connection.held_by, None
            if exchange is not None and exchange.cut_off:
                connection.close()

    def _watch_until(self, exchange: Exchange, at: float) -> None:
        with self._changed:
            heapq.heappush(self._due, (at, next(self._order), exchange))
            if self._watcher is None or not self._watcher.is_alive():
                self._watcher = threading.Thread(
                    target=self._watch, name="exchange-deadlines", daemon=True
                )
                self._watcher.start()
            elif self._due[0][2] is exchange:  # due before what the watcher sleeps until
                self._changed.notify()

    def _watch(self) -> None:
        while True:
            with self._changed:
                while not self._due or self._due[0][0] > time.monotonic():
                    self._changed.wait(
                        timeout=max(self._due[0][0] - time.monotonic(), self.LOOK_EVERY_S)
                        if self._due
                        else None
                    )
                _, _, exchange = heapq.heappop(self._due)
                # Under the lock: not while a connection is held by, or let go to, another.
                if exchange.ended:
                    continue
                exchange.cut_off = True
                for connection in exchange.connections:
                    if connection.held_by is exchange:
                        _shut_down(connection.sock or connection.last_sock)
                self._watch_until(exchange, time.monotonic() + self.LOOK_EVERY_S)


def _shut_down(sock: socket.socket | None) -> None:
    """End the socket's traffic both ways: a thread blocked reading it gets end-of-file now.

    socket.socket's own shutdown, also for a TLS socket: the TLS layer's would first drop its
    state under the thread still reading through it.
    """
    if not isinstance(sock, socket.socket):  # None, or a TLS-in-TLS transport (proxies only)
        return
    # OSError: closed already, or detached into the TLS socket of a handshake under way (which
    # its socket timeout bounds; the next look finds the TLS socket).
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


DEADLINES = Deadlines()


def connect_failure(exc: BaseException) -> ConnectTimeoutError | None:
    """The connect error (refused, unreachable, no answer in time: urllib3's ConnectTimeoutError,
    NewConnectionError among them) that an exception from requests comes down to, if any — so
    no connection was made, and nothing was sent."""
    seen: object = exc
    for _ in range(8):  # the chain requests -> urllib3 -> socket is a few links long
        if isinstance(seen, ConnectTimeoutError):
            return seen
        if not isinstance(seen, BaseException):
            return None
        reason = getattr(seen, "reason", None)
        first_arg = seen.args[0] if seen.args else None
        seen = (
            seen.__cause__
            or reason
            or (first_arg if isinstance(first_arg, BaseException) else None)
        )
    return None


class _HeldToDeadline:
    """A connection held to the deadline of the exchange using it, from before it connects or
    sends; its answers read past any interim (1xx) ones."""

    response_class: type[http.client.HTTPResponse] = FinalAnswerResponse
    held_by: Exchange | None = None
    # An answer that ends with its connection (`Connection: close`) is read through the socket
    # after http.client has let go of it (sock None): kept here to be cut off all the same.
    last_sock: socket.socket | None = None
    sock: socket.socket | None
    timeout: Any  # urllib3's: the connect timeout while connecting
    host: str
    port: int
    _dns_host: str  # urllib3's: the name (or address) it connects to

    def connect(self) -> None:
        DEADLINES.hold(self)  # type: ignore[arg-type]  # with the connection class it mixes into
        super().connect()  # type: ignore[misc]
        self.last_sock = self.sock

    def _new_conn(self) -> socket.socket:
        """The TCP connection, the host's name looked up and connected within the time left;
        its timeout then bounds the TLS handshake by what is left after (CPython takes it for
        the whole handshake). The handshake's socket is not this connection's until it is done,
        so the deadline cannot cut it off."""
        sock = self._connect()
        left_s = DEADLINES.left_s()
        if left_s is not None and left_s <= 0:
            # Connected too late (the connect timeout is at least 1 ms): nothing is sent — a
            # request that late may be one its caller has given up on.
            sock.close()
            raise ConnectTimeoutError(self, f"Connection to {self.host} made after its deadline")
        if left_s is not None:
            sock.settimeout(min(sock.gettimeout() or left_s, left_s))
        return sock

    def _connect(self) -> socket.socket:
        """Connect to the addresses NAMES finds for the host within the time left, in order
        until one answers (one that refuses or does not answer in time is passed over, as
        urllib3 does): `socket.getaddrinfo`, which urllib3 would call, takes no time limit
        (glibc retries for 10 s and more when name servers do not answer). A host that is an
        address connects as it is (a webhook's connection is pinned to one)."""
        host = self._dns_host
        if ip_literal(host) is not None:
            return self._connect_to(host)
        left_s = DEADLINES.left_s()
        limit_s = LOOKUP_TIMEOUT_S if left_s is None else min(left_s, LOOKUP_TIMEOUT_S)
        try:
            addresses = NAMES.addresses(host, self.port, limit_s)
        except LookupFailed as exc:
            reason = socket.gaierror(socket.EAI_NONAME, str(exc))
            raise NameResolutionError(self.host, self, reason) from None  # type: ignore[arg-type]
        failure: ConnectTimeoutError | None = None
        for address in addresses:
            left_s = DEADLINES.left_s()
            if failure is not None and left_s is not None and left_s <= 0:
                break
            try:
                return self._connect_to(address)
            except ConnectTimeoutError as exc:  # refused, unreachable, no answer: the next one
                failure = exc  # (NewConnectionError, the others, is a ConnectTimeoutError)
        assert failure is not None  # addresses is never empty
        raise failure

    def _connect_to(self, address: str) -> socket.socket:
        """urllib3's TCP connect to `address`, its timeout cut to the time left."""
        left_s = DEADLINES.left_s()
        if left_s is not None and isinstance(self.timeout, int | float):
            self.timeout = max(min(self.timeout, left_s), 0.001)
        host, self._dns_host = self._dns_host, address
        try:
            return super()._new_conn()  # type: ignore[misc,no-any-return]
        finally:
            self._dns_host = host

    def request(self, *args: Any, **kwargs: Any) -> None:
        DEADLINES.hold(self)  # type: ignore[arg-type]
        super().request(*args, **kwargs)  # type: ignore[misc]


class _LetGoOnReturn:
    """A pool that frees each connection from its exchange as it comes back."""

    def _put_conn(self, conn: Any) -> None:
        if conn is not None:
            DEADLINES.let_go(conn)
        super()._put_conn(conn)  # type: ignore[misc]


class HeldHTTPConnection(_HeldToDeadline, HTTPConnection):
    pass


class HeldHTTPSConnection(_HeldToDeadline, HTTPSConnection):
    pass


class HeldHTTPConnectionPool(_LetGoOnReturn, HTTPConnectionPool):
    ConnectionCls = HeldHTTPConnection


class HeldHTTPSConnectionPool(_LetGoOnReturn, HTTPSConnectionPool):
    ConnectionCls = HeldHTTPSConnection


class DeadlineAdapter(HTTPAdapter):
    """A requests adapter whose connections are held to the deadline of `DEADLINES.within`."""

    pool_classes: ClassVar[Mapping[str, type[HTTPConnectionPool]]] = {
        "http": HeldHTTPConnectionPool,
        "https": HeldHTTPSConnectionPool,
    }

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(self.pool_classes)  # type: ignore[assignment]
