"""Tests for core.http.egress: which webhook destinations are refused, and where requests really go."""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Any

import pytest
import requests

from core.http import egress
from core.http.deadlines import DEADLINES
from core.http.egress import (
    EgressPolicy,
    RefusedDestination,
    egress_session,
    keep_connection_after_answer,
)
from core.http.interim import MAX_INTERIM_ANSWERS
from core.http.names import NAMES, NameLookup
from tests.support.peers import dns_peer, raw_peer

TIMEOUT_S = 5
PUBLIC_V4 = "93.184.216.34"
PUBLIC_V6 = "2606:4700::1111"
NO_ALLOWED_NETWORKS = EgressPolicy()
LOOPBACK_ALLOWED = EgressPolicy.from_cidrs("127.0.0.0/8, ::1/128")


class FakeDNS:
    """Answers host-name lookups for chosen names; every other name goes to the real lookup."""

    def __init__(self, real_lookup: Callable[[str, int, float], list[str]]) -> None:
        self.real_lookup = real_lookup
        self.answers: dict[str, list[tuple[str, ...]]] = {}
        self.lookups: list[str] = []

    def answer(self, host: str, *addresses: str) -> None:
        """Queue an answer for host; successive lookups get successive answers, the last repeats."""
        self.answers.setdefault(host, []).append(addresses)

    def __call__(self, host: str, port: int, timeout_s: float) -> list[str]:
        if host not in self.answers:
            return self.real_lookup(host, port, timeout_s)
        self.lookups.append(host)
        queued = self.answers[host]
        return list(queued.pop(0) if len(queued) > 1 else queued[0])


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> FakeDNS:
    """Answer every NameLookup's lookups from a FakeDNS."""
    dns = FakeDNS(NAMES.addresses)
    monkeypatch.setattr(NameLookup, "addresses", dns)
    return dns


# --- which addresses are refused -------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.254", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("100.127.255.254", "carrier-grade NAT"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.0.0.5", "private"),
        ("::ffff:169.254.169.254", "metadata"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("192.0.0.1", "IETF protocol-assignment"),
        ("198.18.0.1", "benchmarking"),
        ("192.0.2.1", "documentation"),
        ("2001:db8::1", "documentation"),
        ("192.88.99.1", "6to4"),
        ("2002:7f00:1::1", "6to4"),
        ("64:ff9b::7f00:1", "NAT64"),
        ("2001::1", "Teredo"),
        ("::127.0.0.1", "reserved"),
        ("fec0::1", "site-local"),
    ],
)
def test_non_public_addresses_are_refused(address: str, reason: str) -> None:
    assert reason in (NO_ALLOWED_NETWORKS.is_refused(ip_address(address)) or "")


@pytest.mark.parametrize(
    "address", [PUBLIC_V4, "8.8.8.8", "1.1.1.1", PUBLIC_V6, "2a00:1450:4001::1", "::ffff:8.8.8.8"]
)
def test_public_addresses_are_accepted(address: str) -> None:
    assert NO_ALLOWED_NETWORKS.is_refused(ip_address(address)) is None


def test_allowed_networks_let_loopback_through_and_nothing_else() -> None:
    assert LOOPBACK_ALLOWED.is_refused(ip_address("127.0.0.1")) is None
    assert LOOPBACK_ALLOWED.is_refused(ip_address("127.8.9.10")) is None
    assert LOOPBACK_ALLOWED.is_refused(ip_address("::ffff:127.0.0.1")) is None
    assert LOOPBACK_ALLOWED.is_refused(ip_address("::1")) is None
    assert LOOPBACK_ALLOWED.is_refused(ip_address("10.0.0.1")) == "a private address"
    assert LOOPBACK_ALLOWED.is_refused(ip_address("169.254.169.254")) == "a cloud metadata address"


# --- parsing WEBHOOK_ALLOWED_NETWORKS --------------------------------------------------------


def test_from_cidrs_parses_a_comma_separated_list() -> None:
    policy = EgressPolicy.from_cidrs(" 127.0.0.0/8,, 10.0.0.0/8 ,fd00::/8,192.168.1.7")
    assert [str(network) for network in policy.allowed_networks] == [
        "127.0.0.0/8",
        "10.0.0.0/8",
        "fd00::/8",
        "192.168.1.7/32",
    ]


def test_from_cidrs_accepts_a_list_and_empty_text() -> None:
    assert EgressPolicy.from_cidrs(["127.0.0.0/8"]) == EgressPolicy.from_cidrs("127.0.0.0/8")
    assert EgressPolicy.from_cidrs("").allowed_networks == ()


@pytest.mark.parametrize("bad_cidr", ["10.0.0.0/33", "not-a-network", "127.0.0.1/8", "::1/129"])
def test_from_cidrs_names_the_bad_entry(bad_cidr: str) -> None:
    with pytest.raises(ValueError, match=rf"WEBHOOK_ALLOWED_NETWORKS: '{bad_cidr}' is not a CIDR"):
        EgressPolicy.from_cidrs(f"127.0.0.0/8,{bad_cidr}")


# --- resolving -------------------------------------------------------------------------------


def test_resolve_returns_every_address_once_in_resolver_order(fake_dns: FakeDNS) -> None:
    fake_dns.answer("multi.test", PUBLIC_V6, PUBLIC_V4, PUBLIC_V6, f"::ffff:{PUBLIC_V4}")
    assert NO_ALLOWED_NETWORKS.resolve("multi.test", 443) == [
        IPv6Address(PUBLIC_V6),
        IPv4Address(PUBLIC_V4),
    ]


def test_resolve_takes_ip_literals_as_they_are(fake_dns: FakeDNS) -> None:
    assert NO_ALLOWED_NETWORKS.resolve("::1", 443) == [IPv6Address("::1")]
    assert NO_ALLOWED_NETWORKS.resolve("[::ffff:10.0.0.1]", 443) == [IPv4Address("10.0.0.1")]
    assert fake_dns.lookups == []


def test_pick_address_returns_the_first_address_after_checking_all(fake_dns: FakeDNS) -> None:
    fake_dns.answer("dual.test", PUBLIC_V6, PUBLIC_V4)
    assert NO_ALLOWED_NETWORKS.pick_address("dual.test", 443) == IPv6Address(PUBLIC_V6)


@pytest.mark.parametrize(
    "host",
    ["0177.0.0.1", "0012.0.0.1", "127.1", "0x7f.1", "2130706433", "0x7F000001", "1.2.3.04",
     "hooks.example.123", "hooks.example.0x1f.", "0x"],
)  # fmt: skip
def test_a_host_other_clients_read_as_an_ipv4_number_is_refused_unlooked_up(
    host: str, fake_dns: FakeDNS
) -> None:
    """glibc, curl and browsers read 0177.0.0.1 as 127.0.0.1 (octal); c-ares would ask a name
    server, which may answer with anything (177.0.0.1, say): neither is looked up."""
    fake_dns.answer(host, PUBLIC_V4)
    with pytest.raises(RefusedDestination, match="not an IPv4 address of four decimal numbers"):
        NO_ALLOWED_NETWORKS.check_url(f"https://{host}/hook")
    assert fake_dns.lookups == []


@pytest.mark.parametrize("host", ["123.example.com", "hooks1.example.com", "0x.example.com"])
def test_a_name_with_numbers_but_not_ending_in_one_is_looked_up(
    host: str, fake_dns: FakeDNS
) -> None:
    fake_dns.answer(host, PUBLIC_V4)
    NO_ALLOWED_NETWORKS.check_url(f"https://{host}/hook")
    assert fake_dns.lookups == [host]


def test_an_unresolvable_host_is_refused() -> None:
    with dns_peer() as peer:
        policy = EgressPolicy(names=NameLookup((peer.address,)))
        with pytest.raises(
            RefusedDestination, match=r"^webhook host nonexistent\.test does not resolve \(Domain"
        ):
            policy.check_url("https://nonexistent.test/hook")


def test_a_host_whose_name_servers_do_not_answer_is_refused_at_the_lookup_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(egress, "LOOKUP_TIMEOUT_S", 0.3)
    with dns_peer(silent=True) as peer:
        policy = EgressPolicy(names=NameLookup((peer.address,)))
        started = time.monotonic()
        with pytest.raises(
            RefusedDestination, match=r"^webhook host hangs\.test did not resolve within 0\.3 s$"
        ):
            policy.check_url("https://hangs.test/hook")
        assert time.monotonic() - started < 1.0


def test_a_lookup_in_an_exchange_waits_no_longer_than_the_exchange_has_left() -> None:
    """A delivery attempt's lookup counts toward its WEBHOOK_TIMEOUT_S, like its connect."""
    with dns_peer(silent=True) as peer:
        session = egress_session(EgressPolicy(names=NameLookup((peer.address,))))
        started = time.monotonic()
        with (
            DEADLINES.within(0.4),
            pytest.raises(
                RefusedDestination, match=r"hangs\.test did not resolve within 0\.[34]\d* s"
            ),
        ):
            session.post("https://hangs.test/hook", data=b"{}", timeout=5)
        assert time.monotonic() - started < 1.0


# --- check_url -------------------------------------------------------------------------------


def test_https_to_a_public_host_is_accepted(fake_dns: FakeDNS) -> None:
    fake_dns.answer("hooks.example.com", PUBLIC_V4, PUBLIC_V6)
    NO_ALLOWED_NETWORKS.check_url("https://hooks.example.com/hook?x=1")
    NO_ALLOWED_NETWORKS.check_url("HTTPS://HOOKS.example.com:8443/hook")


def test_http_is_refused_outside_allowed_networks(fake_dns: FakeDNS) -> None:
    fake_dns.answer("hooks.example.com", PUBLIC_V4)
    with pytest.raises(RefusedDestination, match=r"uses http.*use https"):
        NO_ALLOWED_NETWORKS.check_url("http://hooks.example.com/hook")


def test_an_image_policy_takes_plain_http_to_a_public_host_but_not_a_private_one(
    fake_dns: FakeDNS,
) -> None:
    """An image fetch sends nothing secret: https is not required, the address check still is."""
    images = EgressPolicy.from_cidrs(
        "", what="image", setting="INPUT_ALLOWED_NETWORKS", plain_http_to_public=True
    )
    fake_dns.answer("images.example.com", PUBLIC_V4)
    fake_dns.answer("inside.example.com", "10.1.2.3")
    images.check_url("http://images.example.com/in.png")
    with pytest.raises(
        RefusedDestination,
        match=r"^image host inside\.example\.com resolves to a private address; allow it with "
        r"INPUT_ALLOWED_NETWORKS$",
    ):
        images.check_url("http://inside.example.com/in.png")


def test_http_to_an_allowed_loopback_address_is_accepted(fake_dns: FakeDNS) -> None:
    fake_dns.answer("receiver.local", "127.0.0.1")
    LOOPBACK_ALLOWED.check_url("http://127.0.0.1:8080/hook")
    LOOPBACK_ALLOWED.check_url("http://[::1]:8080/hook")
    LOOPBACK_ALLOWED.check_url("http://receiver.local:8080/hook")


def test_http_is_refused_when_only_some_addresses_are_allowed(fake_dns: FakeDNS) -> None:
    fake_dns.answer("half.test", "127.0.0.1", PUBLIC_V4)
    with pytest.raises(
        RefusedDestination, match=r"resolves to an address that.*use https"
    ) as refused:
        LOOPBACK_ALLOWED.check_url("http://half.test/hook")
    assert refused.value.address == IPv4Address(PUBLIC_V4)
    LOOPBACK_ALLOWED.check_url("https://half.test/hook")


def test_a_refusal_names_the_host_the_kind_of_address_and_the_setting(fake_dns: FakeDNS) -> None:
    """Not the address itself (a client could map the internal network name by name): that is
    on the exception, for the server's logs."""
    fake_dns.answer("example.internal", "10.0.0.5")
    with pytest.raises(RefusedDestination) as refused:
        NO_ALLOWED_NETWORKS.check_url("https://example.internal/hook")
    assert str(refused.value) == (
        "webhook host example.internal resolves to a private address; "
        "allow it with WEBHOOK_ALLOWED_NETWORKS"
    )
    assert refused.value.host == "example.internal"
    assert refused.value.address == IPv4Address("10.0.0.5")
    assert isinstance(refused.value, requests.RequestException)


def test_an_ip_literal_host_is_refused_by_its_own_address() -> None:
    with pytest.raises(RefusedDestination, match=r"^webhook host 169\.254\.169\.254 is a cloud"):
        NO_ALLOWED_NETWORKS.check_url("https://169.254.169.254/latest/meta-data/")
    with pytest.raises(RefusedDestination, match="a loopback address"):
        NO_ALLOWED_NETWORKS.check_url("https://[::ffff:127.0.0.1]/hook")


def test_a_host_with_one_private_address_among_public_ones_is_refused(fake_dns: FakeDNS) -> None:
    fake_dns.answer("mixed.test", PUBLIC_V4, PUBLIC_V6, "10.0.0.5")
    with pytest.raises(RefusedDestination, match=r"resolves to a private address") as refused:
        NO_ALLOWED_NETWORKS.check_url("https://mixed.test/hook")
    assert refused.value.address == IPv4Address("10.0.0.5")


def test_an_ipv4_mapped_answer_is_judged_as_ipv4(fake_dns: FakeDNS) -> None:
    fake_dns.answer("mapped.test", "::ffff:192.168.0.10")
    with pytest.raises(RefusedDestination, match=r"resolves to a private") as refused:
        NO_ALLOWED_NETWORKS.check_url("https://mapped.test/hook")
    assert refused.value.address == IPv4Address("192.168.0.10")


@pytest.mark.parametrize(
    "url",
    [
        "https://user:secret@hooks.example.com/hook",
        "https://user@hooks.example.com/hook",
        "https://@hooks.example.com/hook",
        "ftp://hooks.example.com/hook",
        "file:///etc/passwd",
        "javascript:alert(1)",
        "gopher://127.0.0.1:6379/_FLUSHALL",
        "hooks.example.com/hook",
        "https:///hook",
        "https://",
        "https://:443/hook",
        "https://hooks.example.com:99999/hook",
        "https://hooks.example.com:0/hook",
        "https://hooks.example.com\\@127.0.0.1/hook",
        "https://hooks.example.com /hook",
        "https://hooks.example.com/\r\nX-Injected: 1",
    ],
)
def test_malformed_urls_raise_value_error(url: str, fake_dns: FakeDNS) -> None:
    fake_dns.answer("hooks.example.com", PUBLIC_V4)
    with pytest.raises(ValueError):
        NO_ALLOWED_NETWORKS.check_url(url)
    assert fake_dns.lookups == []


# --- real HTTP through egress_session --------------------------------------------------------


@dataclass
class Receiver:
    """A webhook receiver on a real socket that records what reaches it."""

    url: str
    port: int
    seen: list[tuple[str, str | None]] = field(default_factory=list)
    server_names: list[str | None] = field(default_factory=list)
    cookies: list[str | None] = field(default_factory=list)  # each request's Cookie header


class RecordingHandler(BaseHTTPRequestHandler):
    """Records (path, Host header) and the Cookie header; /redirect answers 302, /cookie sets a
    cookie for its whole domain, everything else 200."""

    def do_GET(self) -> None:
        self.server.seen.append((self.path, self.headers.get("Host")))  # type: ignore[attr-defined]
        self.server.cookies.append(self.headers.get("Cookie"))  # type: ignore[attr-defined]
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
        else:
            self.send_response(200)
        if self.path == "/cookie":
            self.send_header("Set-Cookie", "planted=by-one-receiver; Path=/")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output quiet."""


class IPv6HTTPServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer on an IPv6 socket."""

    address_family = socket.AF_INET6


def _serve(server: ThreadingHTTPServer, receiver: Receiver) -> Iterator[Receiver]:
    """Serve in a thread while the test runs; shut down and close everything afterwards."""
    server.seen = receiver.seen  # type: ignore[attr-defined]
    server.cookies = receiver.cookies  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(TIMEOUT_S)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A plain-HTTP receiver on 127.0.0.1 and a free port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), RecordingHandler)
    port = server.server_address[1]
    yield from _serve(server, Receiver(url=f"http://127.0.0.1:{port}", port=port))


@pytest.fixture
def ipv6_receiver() -> Iterator[Receiver]:
    """A plain-HTTP receiver on [::1] and a free port."""
    try:
        server = IPv6HTTPServer(("::1", 0), RecordingHandler)
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    port = server.server_address[1]
    yield from _serve(server, Receiver(url=f"http://[::1]:{port}", port=port))


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for rebind.test (cert.pem, key.pem), made with openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    key_options = "-nodes -days 1 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1"
    names = "-subj /CN=rebind.test -addext subjectAltName=DNS:rebind.test"
    outputs = ["-keyout", str(key), "-out", str(cert)]
    subprocess.run(
        [openssl, "req", "-x509", *key_options.split(), *names.split(), *outputs],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture
def tls_receiver(certificate: tuple[Path, Path]) -> Iterator[Receiver]:
    """An HTTPS receiver on 127.0.0.1 presenting the rebind.test certificate."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), RecordingHandler)
    port = server.server_address[1]
    receiver = Receiver(url=f"https://127.0.0.1:{port}", port=port)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    context.sni_callback = lambda _socket, server_name, _context: receiver.server_names.append(
        server_name
    )
    server.socket = context.wrap_socket(server.socket, server_side=True)
    yield from _serve(server, receiver)


def test_a_get_to_an_allowed_address_reaches_the_receiver(receiver: Receiver) -> None:
    with (
        egress_session(LOOPBACK_ALLOWED) as session,
        session.get(f"{receiver.url}/hook", allow_redirects=False, timeout=TIMEOUT_S) as response,
    ):
        assert response.status_code == 200
        assert response.content == b"ok"
    assert receiver.seen == [("/hook", f"127.0.0.1:{receiver.port}")]


def test_a_receivers_cookie_is_not_kept_for_the_next_webhook(receiver: Receiver) -> None:
    """The session is shared by every delivery of a worker: a Set-Cookie from one receiver
    would ride on the next webhooks (another team's, with a domain cookie) and the jar grow."""
    with egress_session(LOOPBACK_ALLOWED) as session:
        for path in ("/cookie", "/hook"):
            session.get(f"{receiver.url}{path}", allow_redirects=False, timeout=TIMEOUT_S).close()
        assert len(session.cookies) == 0
    assert receiver.cookies == [None, None]


def test_an_address_that_refuses_is_passed_over_for_the_next_checked_one(
    receiver: Receiver, fake_dns: FakeDNS
) -> None:
    """The receiver's host resolves to two addresses and the first refuses (a dual-stack host
    whose IPv6 address is broken, say): the webhook goes to the next in the same attempt — it
    was sent to the first one only, and failed every attempt until exhausted."""
    fake_dns.answer("dual.test", "127.0.0.3", "127.0.0.1")  # nothing listens on 127.0.0.3
    url = f"http://dual.test:{receiver.port}/hook"
    with (
        egress_session(LOOPBACK_ALLOWED) as session,
        session.get(url, allow_redirects=False, timeout=TIMEOUT_S) as response,
    ):
        assert response.status_code == 200
    assert receiver.seen == [("/hook", f"dual.test:{receiver.port}")]
    assert fake_dns.lookups == ["dual.test"]  # checked once, both addresses


def test_a_refused_address_is_never_connected_to(receiver: Receiver) -> None:
    with (
        egress_session(NO_ALLOWED_NETWORKS) as session,
        pytest.raises(RefusedDestination, match=r"webhook host 127\.0\.0\.1 is a loopback"),
    ):
        session.get(f"{receiver.url}/hook", allow_redirects=False, timeout=TIMEOUT_S)
    assert receiver.seen == []


def test_the_connection_goes_to_the_checked_address_without_a_second_lookup(
    receiver: Receiver, fake_dns: FakeDNS
) -> None:
    fake_dns.answer("rebind.test", "127.0.0.1")
    fake_dns.answer("rebind.test", "169.254.169.254")  # what a rebinding attacker answers next
    url = f"http://rebind.test:{receiver.port}/hook"
    with egress_session(LOOPBACK_ALLOWED) as session:
        with session.get(url, allow_redirects=False, timeout=TIMEOUT_S) as response:
            assert response.status_code == 200
        assert fake_dns.lookups == ["rebind.test"]
        assert receiver.seen == [("/hook", f"rebind.test:{receiver.port}")]

        # Every request is checked again: the next answer is refused, although a pooled
        # connection to the first address is still open.
        with pytest.raises(RefusedDestination, match=r"resolves to a cloud") as refused:
            session.get(url, allow_redirects=False, timeout=TIMEOUT_S)
        assert refused.value.address == IPv4Address("169.254.169.254")
    assert len(receiver.seen) == 1


def test_a_host_with_one_refused_address_is_never_connected_to(
    receiver: Receiver, fake_dns: FakeDNS
) -> None:
    fake_dns.answer("mixed.test", "127.0.0.1", "10.0.0.5")
    with egress_session(LOOPBACK_ALLOWED) as session, pytest.raises(RefusedDestination):
        session.get(f"http://mixed.test:{receiver.port}/", allow_redirects=False, timeout=TIMEOUT_S)
    assert receiver.seen == []


def test_a_caller_host_header_is_replaced_by_the_urls_host(
    receiver: Receiver, fake_dns: FakeDNS
) -> None:
    fake_dns.answer("rebind.test", "127.0.0.1")
    shared_headers = {"Host": "metadata.google.internal"}
    with (
        egress_session(LOOPBACK_ALLOWED) as session,
        session.get(
            f"http://rebind.test:{receiver.port}/hook",
            headers=shared_headers,
            allow_redirects=False,
            timeout=TIMEOUT_S,
        ),
    ):
        pass
    assert receiver.seen == [("/hook", f"rebind.test:{receiver.port}")]
    assert shared_headers == {"Host": "metadata.google.internal"}


def test_an_ipv6_literal_url_reaches_the_receiver(ipv6_receiver: Receiver) -> None:
    with (
        egress_session(LOOPBACK_ALLOWED) as session,
        session.get(f"{ipv6_receiver.url}/v6", allow_redirects=False, timeout=TIMEOUT_S) as reply,
    ):
        assert reply.status_code == 200
    assert ipv6_receiver.seen == [("/v6", f"[::1]:{ipv6_receiver.port}")]


def test_a_redirect_is_returned_not_followed(receiver: Receiver) -> None:
    with (
        egress_session(LOOPBACK_ALLOWED) as session,
        session.get(f"{receiver.url}/redirect", allow_redirects=False, timeout=TIMEOUT_S) as reply,
    ):
        assert reply.status_code == 302
        assert reply.headers["Location"] == "http://169.254.169.254/latest/meta-data/"
    assert [path for path, _host in receiver.seen] == ["/redirect"]


def test_the_session_does_not_follow_redirects_even_if_asked(receiver: Receiver) -> None:
    with (
        egress_session(LOOPBACK_ALLOWED) as session,
        session.get(f"{receiver.url}/redirect", timeout=TIMEOUT_S) as reply,
    ):
        assert reply.status_code == 302
        assert reply.history == []
    assert [path for path, _host in receiver.seen] == ["/redirect"]


def test_the_session_ignores_proxy_settings_from_the_environment(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "")
    with (
        egress_session(LOOPBACK_ALLOWED) as session,
        session.get(f"{receiver.url}/hook", allow_redirects=False, timeout=TIMEOUT_S) as reply,
    ):
        assert reply.status_code == 200


def test_an_explicit_proxy_is_refused(receiver: Receiver) -> None:
    proxies = {"http": "http://127.0.0.1:9"}
    with egress_session(LOOPBACK_ALLOWED) as session, pytest.raises(ValueError, match="proxy"):
        session.get(receiver.url, proxies=proxies, allow_redirects=False, timeout=TIMEOUT_S)
    assert receiver.seen == []


def test_https_checks_the_certificate_and_sends_sni_for_the_urls_host(
    tls_receiver: Receiver, certificate: tuple[Path, Path], fake_dns: FakeDNS
) -> None:
    fake_dns.answer("rebind.test", "127.0.0.1")
    cert, _key = certificate
    with (
        egress_session(LOOPBACK_ALLOWED) as session,
        session.get(
            f"https://rebind.test:{tls_receiver.port}/tls",
            allow_redirects=False,
            timeout=TIMEOUT_S,
            verify=str(cert),
        ) as reply,
    ):
        assert reply.status_code == 200
    assert tls_receiver.seen == [("/tls", f"rebind.test:{tls_receiver.port}")]
    assert tls_receiver.server_names == ["rebind.test"]


def test_https_refuses_a_certificate_for_another_host(
    tls_receiver: Receiver, certificate: tuple[Path, Path], fake_dns: FakeDNS
) -> None:
    fake_dns.answer("other.test", "127.0.0.1")
    cert, _key = certificate
    with egress_session(LOOPBACK_ALLOWED) as session, pytest.raises(requests.exceptions.SSLError):
        session.get(
            f"https://other.test:{tls_receiver.port}/tls",
            allow_redirects=False,
            timeout=TIMEOUT_S,
            verify=str(cert),
        )
    assert tls_receiver.seen == []


class KeepAliveHandler(RecordingHandler):
    """HTTP/1.1 with keep-alive; counts the connections accepted."""

    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        with self.server.lock:  # type: ignore[attr-defined]
            self.server.connections += 1  # type: ignore[attr-defined]


def test_as_many_connections_as_deliveries_at_once_are_kept_for_reuse(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A dispatch makes a batch of attempts at once, often to one receiver: beyond the pool size
    # every connection would be opened for one request and thrown away. (Reuse is not bounded in
    # time here: the rounds are further apart than REUSE_WITHIN_S on a slow machine.)
    monkeypatch.setattr(egress, "REUSE_WITHIN_S", 60.0)
    server = ThreadingHTTPServer(("127.0.0.1", 0), KeepAliveHandler)
    server.lock, server.connections = threading.Lock(), 0  # type: ignore[attr-defined]
    port = server.server_address[1]
    at_once = 20
    with contextlib.ExitStack() as stack:
        receiver = stack.enter_context(
            contextlib.contextmanager(_serve)(server, Receiver(f"http://127.0.0.1:{port}", port))
        )
        session = stack.enter_context(
            egress_session(LOOPBACK_ALLOWED, connections_per_host=at_once)
        )
        barrier = threading.Barrier(at_once)

        def get(_: int) -> int:
            barrier.wait(TIMEOUT_S)  # all at once, as a dispatch batch
            with session.get(f"{receiver.url}/hook", timeout=TIMEOUT_S) as response:
                return response.status_code

        with ThreadPoolExecutor(at_once) as pool:
            for _ in range(3):
                assert list(pool.map(get, range(at_once))) == [200] * at_once
    assert len(receiver.seen) == 3 * at_once
    assert server.connections <= at_once  # type: ignore[attr-defined]


class AnswerHandler(KeepAliveHandler):
    """POST /empty: 204, no body; /body: 200 with a short one; /long: 200 with one longer than
    MAX_ANSWER_READ_BYTES; /chunked: 200 with a short chunked one; /until-close: 200 with a
    body that ends when the connection does (no length); /close-after: 200 with a length and
    Connection: close, its body 3 s late. HTTP/1.1, kept alive where it can be."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"3\r\ntha\r\n3\r\nnks\r\n0\r\n\r\n")
            return
        if self.path in ("/until-close", "/close-after"):
            self.send_response(200)
            self.send_header("Connection", "close")
            late = self.path == "/close-after"  # a length, but the connection ends with it
            if late:
                self.send_header("Content-Length", "6")
            self.end_headers()
            self.wfile.write(b"" if late else b"thanks")
            self.wfile.flush()
            time.sleep(3.0)  # the body ends (or comes) only later: a reader would wait
            self.wfile.write(b"thanks" if late else b"")
            self.close_connection = True
            return
        body = {"/empty": b"", "/long": b"x" * (egress.MAX_ANSWER_READ_BYTES + 1)}.get(
            self.path, b"thanks"
        )
        self.send_response(204 if not body else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextlib.contextmanager
def answering(idle_close_s: float | None = None) -> Iterator[tuple[ThreadingHTTPServer, str]]:
    """An AnswerHandler server (closing a connection idle for idle_close_s), and its base URL."""
    handler = type("Handler", (AnswerHandler,), {"timeout": idle_close_s})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.lock, server.connections = threading.Lock(), 0  # type: ignore[attr-defined]
    port = server.server_address[1]
    with contextlib.contextmanager(_serve)(server, Receiver(f"http://127.0.0.1:{port}", port)):
        yield server, f"http://127.0.0.1:{port}"


def post_as_delivery_does(session: requests.Session, url: str, deadline_s: float = 5.0) -> int:
    """Streamed and held to a deadline; a short answer read so its connection is kept."""
    with (
        DEADLINES.within(deadline_s),
        session.post(url, data=b"{}", stream=True, timeout=TIMEOUT_S) as response,
    ):
        keep_connection_after_answer(response)
        return response.status_code


@pytest.mark.parametrize(
    ("path", "connections"),
    [("/empty", 1), ("/body", 1), ("/chunked", 1), ("/long", 4), ("/until-close", 4)],
)
def test_a_short_answer_leaves_the_connection_for_the_next(
    path: str, connections: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(egress, "REUSE_WITHIN_S", 60.0)  # however slow this machine is
    with answering() as (server, base), egress_session(LOOPBACK_ALLOWED) as session:
        for _ in range(4):
            assert post_as_delivery_does(session, base + path) in (200, 204)
        assert kept_connections(session, base) == (1 if connections == 1 else 0)
    assert server.connections == connections  # type: ignore[attr-defined]


def test_a_connection_idle_for_longer_than_reuse_within_s_is_not_used_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A receiver may be closing it just then; a new one is opened instead."""
    monkeypatch.setattr(egress, "REUSE_WITHIN_S", 0.2)
    with answering() as (server, base), egress_session(LOOPBACK_ALLOWED) as session:
        assert post_as_delivery_does(session, base + "/empty") == 204
        assert post_as_delivery_does(session, base + "/empty") == 204
        assert server.connections == 1  # type: ignore[attr-defined]
        time.sleep(0.4)
        assert post_as_delivery_does(session, base + "/empty") == 204
        assert server.connections == 2  # type: ignore[attr-defined]


def test_a_connection_the_receiver_has_closed_is_not_used_again() -> None:
    with (
        answering(idle_close_s=0.2) as (server, base),
        egress_session(LOOPBACK_ALLOWED) as session,
    ):
        assert post_as_delivery_does(session, base + "/empty") == 204
        time.sleep(0.5)  # the receiver closes its idle connection, within REUSE_WITHIN_S
        assert post_as_delivery_does(session, base + "/empty") == 204
        assert server.connections == 2  # type: ignore[attr-defined]


@pytest.mark.parametrize("path", ["/until-close", "/close-after"])
def test_an_answer_whose_connection_ends_with_it_is_not_waited_for(path: str) -> None:
    """Nothing to keep: not read, whether it ends only when the receiver closes or has a length."""
    with answering() as (_server, base), egress_session(LOOPBACK_ALLOWED) as session:
        started = time.monotonic()
        assert post_as_delivery_does(session, base + path) == 200
        assert time.monotonic() - started < 2.0  # not the receiver's 3 s before it closes


def kept_connections(session: requests.Session, url: str) -> int:
    """How many open connections the session's pools keep for reuse."""
    poolmanager = session.get_adapter(url).poolmanager
    # keys(): urllib3's RecentlyUsedContainer refuses plain iteration.
    pools = [poolmanager.pools[key] for key in poolmanager.pools.keys()]  # noqa: SIM118
    return sum(
        1
        for pool in pools
        for connection in list(pool.pool.queue)
        if connection and connection.sock
    )


@pytest.mark.parametrize(
    ("head", "took_s"),
    [
        (b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n", (0.0, 0.7)),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", (1.0, 2.5)),
    ],
    ids=["204: no body to read", "200: read until the deadline"],
)
def test_a_body_dripped_in_chunks_is_not_waited_for_nor_its_connection_kept(
    head: bytes, took_s: tuple[float, float]
) -> None:
    """A 204 has no body whatever its headers say: not read at all. A 200's short chunked body
    is read — here dripped, so until the attempt's deadline, not the 6 s of the drip."""
    dripping = threading.Event()

    def drip(connection: socket.socket, stop: threading.Event) -> None:
        connection.recv(65536)
        connection.sendall(head)
        dripping.set()
        for _ in range(20):  # 6 s of one byte at a time, if anyone reads it
            if stop.is_set():
                return
            connection.sendall(b"1\r\nx\r\n")
            time.sleep(0.3)

    with raw_peer(drip) as port, egress_session(LOOPBACK_ALLOWED) as session:
        url = f"http://127.0.0.1:{port}/hook"
        started = time.monotonic()
        assert post_as_delivery_does(session, url, deadline_s=1.0) == int(head.split()[1])
        assert took_s[0] <= time.monotonic() - started < took_s[1]
        assert kept_connections(session, url) == 0
    assert dripping.is_set()


def test_interim_answers_are_read_past_to_the_final_one_on_a_kept_connection() -> None:
    """A receiver (or its proxy) may send 102 Processing or 103 Early Hints before its answer:
    http.client took the first for the answer — every delivery "HTTP 103", sent again until
    exhausted — and left the real answer on the kept connection for the next attempt."""
    interim = b"HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
    answers = [
        interim + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        interim + b"HTTP/1.1 500 Oops\r\nContent-Length: 2\r\n\r\nno",
        b"HTTP/1.1 204 No Content\r\n\r\n",
    ]

    def answer_each(connection: socket.socket, stop: threading.Event) -> None:
        reader = connection.makefile("rb")
        for answer in answers:
            while reader.readline() not in (b"\r\n", b""):  # the request's head
                pass
            reader.read(2)  # its body, b"{}"
            connection.sendall(answer)

    with raw_peer(answer_each) as port, egress_session(LOOPBACK_ALLOWED) as session:
        url = f"http://127.0.0.1:{port}/hook"
        assert [post_as_delivery_does(session, url) for _ in answers] == [200, 500, 204]


def test_a_flood_of_interim_answers_is_an_error_not_a_wait() -> None:
    def flood(connection: socket.socket, stop: threading.Event) -> None:
        connection.recv(65536)
        connection.sendall(b"HTTP/1.1 103 Early Hints\r\n\r\n" * (MAX_INTERIM_ANSWERS + 1))
        stop.wait(5)

    with raw_peer(flood) as port, egress_session(LOOPBACK_ALLOWED) as session:
        started = time.monotonic()
        with pytest.raises(requests.ConnectionError, match="interim"):
            post_as_delivery_does(session, f"http://127.0.0.1:{port}/hook")
        assert time.monotonic() - started < 2.0
