"""Tests for core.http.deadlines: an exchange through an egress session ends by its deadline, however
a receiver drips its answer, and a connection that outlives its exchange is never cut off."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

import core.http.deadlines
from core.http import egress
from core.http.deadlines import DEADLINES, DeadlineAdapter, Exchange
from core.http.egress import EgressPolicy, egress_session, keep_connection_after_answer
from core.http.names import NameLookup
from tests.support.peers import dns_peer, raw_peer
from tests.test_egress import FakeDNS, answering, certificate, fake_dns  # noqa: F401  # fixtures

LOOPBACK_ALLOWED = EgressPolicy.from_cidrs("127.0.0.0/8")
READ_TIMEOUT_S = 5.0  # each wait for bytes (and the connect): longer than every deadline below
DRIP = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"


@contextlib.contextmanager
def dripping(
    *,
    tls: ssl.SSLContext | None = None,
    handshake: bool = False,
    every_s: float = 0.1,
    headers: bytes = b"",
) -> Iterator[str]:
    """A receiver that reads the request, sends `headers` at once, then DRIP a byte every
    `every_s`, over TLS if given — with handshake=True, its side of the TLS handshake is
    dripped the same way (and never ends before the client gives up). Yields its URL."""

    def drip(connection: socket.socket, data: bytes, stop: threading.Event) -> None:
        for byte in data:
            if stop.is_set():
                raise OSError("stopped")
            connection.sendall(bytes([byte]))
            time.sleep(every_s)

    def answer(raw: socket.socket, stop: threading.Event) -> None:
        if tls is not None and handshake:
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            server_side = tls.wrap_bio(incoming, outgoing, server_side=True)
            while True:  # ssl.SSLError (an OSError) once the client gives up
                with contextlib.suppress(ssl.SSLWantReadError):
                    server_side.do_handshake()
                drip(raw, outgoing.read(), stop)
                incoming.write(raw.recv(65536) or b"")
        with tls.wrap_socket(raw, server_side=True) if tls else contextlib.nullcontext(raw) as c:
            c.recv(65536)
            c.sendall(headers)
            drip(c, DRIP, stop)

    with raw_peer(answer) as port:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}/hook"


def post_within(session: requests.Session, url: str, seconds: float, **options: object) -> tuple[
    Exchange, float, BaseException | None
]:  # fmt: skip
    """POST as a delivery does, inside DEADLINES.within(seconds): the exchange, the seconds it
    took, and what it raised."""
    started = time.monotonic()
    raised: BaseException | None = None
    with DEADLINES.within(seconds) as exchange:
        try:
            with session.post(
                url, data=b"{}", stream=True, timeout=(READ_TIMEOUT_S, READ_TIMEOUT_S), **options
            ) as response:
                keep_connection_after_answer(response)
        except requests.RequestException as exc:
            raised = exc
    return exchange, time.monotonic() - started, raised


def test_an_answer_dripped_a_byte_at_a_time_is_cut_off_at_the_deadline() -> None:
    """Each byte comes well within the read timeout: only the deadline can end it (~4 s)."""
    with dripping() as url, egress_session(LOOPBACK_ALLOWED) as session:
        exchange, took_s, raised = post_within(session, url, 1.0)
    assert isinstance(raised, requests.ConnectionError)
    assert exchange.cut_off
    assert 1.0 <= took_s < 2.5


def test_a_body_read_after_http_client_let_go_of_the_connection_is_cut_off_too() -> None:
    """`Connection: close`: http.client hands the socket to the answer (the connection's sock
    is None) while the body is still coming."""
    headers = f"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: {len(DRIP)}\r\n\r\n"
    with (
        dripping(headers=headers.encode()) as url,
        egress_session(LOOPBACK_ALLOWED) as session,
        DEADLINES.within(1.0) as exchange,
    ):
        started = time.monotonic()
        with pytest.raises(requests.RequestException):
            session.post(url, data=b"{}", timeout=(READ_TIMEOUT_S, READ_TIMEOUT_S)).close()
        took_s = time.monotonic() - started
    assert exchange.cut_off
    assert 1.0 <= took_s < 2.5


def test_a_connection_made_after_the_deadline_sends_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Should a connection still be made after the deadline (here a lookup that overran its
    limit), it is given up before a byte is sent — a submit sent that late could be a second
    one, its step's lease having passed."""

    def overrunning_lookup(self: NameLookup, host: str, port: int, timeout_s: float) -> list[str]:
        time.sleep(0.6)
        return ["127.0.0.1"]

    received: list[bytes] = []

    def listen(connection: socket.socket, stop: threading.Event) -> None:
        connection.settimeout(1.0)
        with contextlib.suppress(TimeoutError):
            received.append(connection.recv(65536))
        connection.sendall(DRIP)

    monkeypatch.setattr(NameLookup, "addresses", overrunning_lookup)
    with raw_peer(listen) as port, requests.Session() as session:
        session.mount("http://", DeadlineAdapter())
        started = time.monotonic()
        with DEADLINES.within(0.3), pytest.raises(requests.Timeout):
            session.post(f"http://slow-name.test:{port}/v1/submit", data=b"{}", timeout=5)
        assert time.monotonic() - started < 1.2
        time.sleep(0.3)  # a request sent would have arrived by now
    assert received in ([], [b""])  # connected, maybe, but nothing sent


def test_a_host_lookup_gets_only_the_time_left(monkeypatch: pytest.MonkeyPatch) -> None:
    """The name server answers after 1 s; the exchange has 0.3 s: the lookup gives up then, and
    no connection is made (socket.getaddrinfo would have waited for the answer)."""
    with dns_peer({"late.test": ["127.0.0.1"]}, delay_s=1.0) as peer:
        monkeypatch.setattr(core.http.deadlines, "NAMES", NameLookup(servers=(peer.address,)))
        with requests.Session() as session:
            session.mount("http://", DeadlineAdapter())
            started = time.monotonic()
            with (
                DEADLINES.within(0.3),
                pytest.raises(requests.ConnectionError, match=r"did not resolve within 0\.\d+ s"),
            ):
                session.get("http://late.test:9/", timeout=5)
            assert 0.25 <= time.monotonic() - started < 0.8


@pytest.fixture
def client_tls(certificate: tuple[Path, Path]) -> tuple[ssl.SSLContext, str]:  # noqa: F811
    """The receiver's TLS context, and the CA file a client trusts it with."""
    cert, key = certificate
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context, str(cert)


@pytest.mark.parametrize("handshake", [False, True], ids=["answer dripped", "handshake dripped"])
def test_over_tls_the_deadline_holds_in_the_handshake_and_after_it(
    client_tls: tuple[ssl.SSLContext, str],
    handshake: bool,
    fake_dns: FakeDNS,  # noqa: F811
) -> None:
    context, ca_file = client_tls
    fake_dns.answer("rebind.test", "127.0.0.1")  # the certificate's name, on loopback
    with (
        dripping(tls=context, handshake=handshake) as url,
        egress_session(LOOPBACK_ALLOWED) as session,
    ):
        url = url.replace("127.0.0.1", "rebind.test")
        exchange, took_s, raised = post_within(session, url, 1.0, verify=ca_file)
    # Cut off, or (in the handshake) timed out by the socket: either way, by the deadline.
    assert isinstance(raised, requests.ConnectionError | requests.Timeout)
    assert exchange.cut_off or isinstance(raised, requests.Timeout)
    assert 0.9 <= took_s < 2.5


def test_an_exchange_that_ends_in_time_is_not_cut_off_nor_is_its_kept_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The connection goes back to the pool and is used by the next exchange after the first's
    deadline has passed: nothing cuts it under the second."""
    monkeypatch.setattr(egress, "REUSE_WITHIN_S", 60.0)
    with answering() as (server, base), egress_session(LOOPBACK_ALLOWED) as session:
        first, _, raised = post_within(session, base + "/empty", 1.0)
        assert raised is None and not first.cut_off
        with (
            DEADLINES.within(5.0) as second,
            session.post(base + "/empty", data=b"{}", stream=True, timeout=5) as response,
        ):
            time.sleep(1.2)  # past the first exchange's deadline, on its connection
            keep_connection_after_answer(response)
            assert response.status_code == 204
        assert not second.cut_off
        assert server.connections == 1  # type: ignore[attr-defined]


@dataclass(eq=False)
class PairConnection:
    """A connection stand-in over a socket pair, as Deadlines sees one."""

    sock: socket.socket
    peer: socket.socket
    held_by: Exchange | None = None
    last_sock: socket.socket | None = None
    closed: bool = False

    def close(self) -> None:
        self.closed = True

    def works(self) -> bool:
        """Whether a byte sent from the peer still arrives."""
        self.sock.settimeout(1.0)
        try:
            self.peer.sendall(b"x")
            return self.sock.recv(1) == b"x"
        except OSError:
            return False


@pytest.fixture
def pair() -> Iterator[PairConnection]:
    sock, peer = socket.socketpair()
    with sock, peer:
        yield PairConnection(sock, peer)


def test_a_connection_another_exchange_holds_now_is_not_cut_off_by_the_first(
    pair: PairConnection,
) -> None:
    held_again = threading.Event()
    first_over = threading.Event()

    def second_exchange() -> None:
        with DEADLINES.within(10.0):
            DEADLINES.hold(pair)
            held_again.set()
            first_over.wait(5)

    with DEADLINES.within(1.0) as first:
        DEADLINES.hold(pair)
        other = threading.Thread(target=second_exchange)
        other.start()
        assert held_again.wait(5)
        time.sleep(max(0.0, first.deadline - time.monotonic()) + 0.5)
        assert first.cut_off
        assert pair.works()  # the first's deadline passed; the socket is the second's now
    first_over.set()
    other.join(5)


def test_a_connection_is_cut_off_while_its_exchange_holds_it(pair: PairConnection) -> None:
    with DEADLINES.within(0.2) as exchange:
        DEADLINES.hold(pair)
        assert pair.works()
        time.sleep(1.0)
        assert exchange.cut_off
        assert not pair.works()


def test_a_connection_let_go_by_a_cut_off_exchange_is_closed_not_reused(
    pair: PairConnection,
) -> None:
    with DEADLINES.within(0.1) as exchange:
        DEADLINES.hold(pair)
        time.sleep(1.0)
        DEADLINES.let_go(pair)
    assert exchange.cut_off and pair.closed and pair.held_by is None


def test_a_connection_let_go_in_time_is_left_open(pair: PairConnection) -> None:
    with DEADLINES.within(5.0):
        DEADLINES.hold(pair)
        DEADLINES.let_go(pair)
    assert not pair.closed and pair.held_by is None
    time.sleep(0.1)
    assert pair.works()


def test_outside_an_exchange_nothing_is_held(pair: PairConnection) -> None:
    with DEADLINES.within(5.0) as earlier:
        DEADLINES.hold(pair)
    assert pair.held_by is earlier
    DEADLINES.hold(pair)  # a later use outside any exchange
    assert pair.held_by is None


def test_a_nested_exchange_gives_the_outer_one_back(pair: PairConnection) -> None:
    with DEADLINES.within(5.0) as outer:
        with DEADLINES.within(60.0) as inner:
            DEADLINES.hold(pair)
            assert pair.held_by is inner
            assert inner.deadline == outer.deadline  # never past the outer one
        DEADLINES.hold(pair)
        assert pair.held_by is outer
