"""Outbound-address policy for webhook delivery and input-image fetches: which addresses we may
connect to, and how.

A webhook URL (or an input image's URL) is given by another team, so it may point anywhere: at our metadata service, at
Redis on localhost, at a host whose DNS answer changes between our check and our connect. The
policy resolves the host, judges every address it resolves to, and the adapter then connects to
the address that was judged, so there is no second DNS lookup to rebind.
"""

from __future__ import annotations

import contextlib
import contextvars
import http.cookiejar
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias, cast
from urllib.parse import SplitResult, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from requests.utils import select_proxy
from urllib3.connectionpool import ConnectionPool, HTTPConnectionPool
from urllib3.response import HTTPResponse

from core.http.deadlines import (
    DEADLINES,
    DeadlineAdapter,
    HeldHTTPConnection,
    HeldHTTPConnectionPool,
    HeldHTTPSConnection,
    HeldHTTPSConnectionPool,
    connect_failure,
)
from core.http.names import LOOKUP_TIMEOUT_S, NAMES, LookupFailed, NameLookup, ip_literal

if TYPE_CHECKING:
    # Typing-only names from types-requests, for the hook that requests lets adapters override.
    from requests.adapters import _HostParams, _PoolKwargs

IPAddress: TypeAlias = IPv4Address | IPv6Address
IPNetwork: TypeAlias = IPv4Network | IPv6Network

ALLOWED_NETWORKS_SETTING = "WEBHOOK_ALLOWED_NETWORKS"
DEFAULT_PORTS = {"http": 80, "https": 443}
# A kept-alive connection is used again only this soon after its last answer. A receiver closes
# idle connections after its own keep-alive timeout (gunicorn 2 s, Node and Apache 5 s, nginx
# 75 s); sent on a connection it is closing at that moment, an attempt would fail. Within 1 s
# that race cannot happen with any of those; a burst to one receiver reuses connections within
# milliseconds.
REUSE_WITHIN_S = 1.0
# A receiver's answer up to this long is read to its end, so its connection can be kept.
MAX_ANSWER_READ_BYTES = 16 * 1024

# Most specific first: the first network that holds an address names the reason it is refused.
# Written out rather than taken from ipaddress's is_private/is_global, whose answers differ
# between Python patch releases (cpython#113171).
REFUSED_NETWORKS: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ip_network(cidr), reason)
    for cidr, reason in (
        ("169.254.169.254/32", "a cloud metadata address"),
        ("fd00:ec2::254/128", "a cloud metadata address"),
        ("0.0.0.0/8", "an unspecified ('this network') address"),
        ("10.0.0.0/8", "a private address"),
        ("100.64.0.0/10", "a carrier-grade NAT address"),
        ("127.0.0.0/8", "a loopback address"),
        ("169.254.0.0/16", "a link-local address"),
        ("172.16.0.0/12", "a private address"),
        ("192.0.0.0/24", "an IETF protocol-assignment address"),
        ("192.0.2.0/24", "a documentation address"),
        ("192.88.99.0/24", "a 6to4 relay address"),
        ("192.168.0.0/16", "a private address"),
        ("198.18.0.0/15", "a benchmarking address"),
        ("198.51.100.0/24", "a documentation address"),
        ("203.0.113.0/24", "a documentation address"),
        ("224.0.0.0/4", "a multicast address"),
        ("240.0.0.0/4", "a reserved address"),
        ("::/128", "an unspecified address"),
        ("::1/128", "a loopback address"),
        ("64:ff9b::/96", "a NAT64 address"),
        ("64:ff9b:1::/48", "a NAT64 address"),
        ("100::/64", "a discard-only address"),
        ("2001::/32", "a Teredo address"),
        ("2001::/23", "an IETF protocol-assignment address"),
        ("2001:db8::/32", "a documentation address"),
        ("2002::/16", "a 6to4 address"),
        ("3fff::/20", "a documentation address"),
        ("5f00::/16", "a segment-routing address"),
        ("fc00::/7", "a private (unique-local) address"),
        ("fe80::/10", "a link-local address"),
        ("fec0::/10", "a site-local address"),
        ("ff00::/8", "a multicast address"),
    )
)


class RefusedDestination(requests.exceptions.RequestException):
    """A webhook destination that the egress policy does not let us connect to."""

    def __init__(
        self, message: str, *, host: str | None = None, address: IPAddress | None = None
    ) -> None:
        super().__init__(message)
        self.host = host
        self.address = address


def unmap_ipv4(address: IPAddress) -> IPAddress:
    """Return the IPv4 address inside an IPv4-mapped IPv6 address (::ffff:a.b.c.d), else itself."""
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _ends_in_a_number(host: str) -> bool:
    """Whether a URL parser (WHATWG: browsers, curl) or glibc would read host as an IPv4 address:
    its last label is decimal digits or 0x-hex, as in 0177.0.0.1 (octal: 127.0.0.1), 0x7f.1 or
    2130706433. ip_address takes only the dotted-decimal form; a name server may answer such a
    "name" with an unrelated address."""
    last = host.rstrip(".").rpartition(".")[2].lower()
    if last.startswith("0x"):
        return all(char in "0123456789abcdef" for char in last[2:])
    return last.isdigit()


def _host_header(host: str, port: int | None, scheme: str) -> str:
    """Return the Host header value for host and port, as http.client would write it."""
    bracketed = f"[{host}]" if ":" in host else host
    if port is None or port == DEFAULT_PORTS.get(scheme):
        return bracketed
    return f"{bracketed}:{port}"


@dataclass(frozen=True)
class EgressPolicy:
    """Where webhooks (or, with `what="image"`, input images) may go: public addresses, plus
    the networks an operator allows in `setting`."""

    allowed_networks: tuple[IPNetwork, ...] = ()
    names: NameLookup = field(default=NAMES, compare=False)
    what: str = "webhook"  # what is fetched or sent, as the refusals name it
    setting: str = ALLOWED_NETWORKS_SETTING
    # A webhook carries a signed body, so it goes over https unless to an allowed network. An
    # image fetch sends nothing secret, and SSRF is about the address (checked and pinned all
    # the same): plain http to a public host is fine for it.
    plain_http_to_public: bool = False

    @classmethod
    def from_cidrs(
        cls,
        cidrs: str | Iterable[str],
        *,
        what: str = "webhook",
        setting: str = ALLOWED_NETWORKS_SETTING,
        plain_http_to_public: bool = False,
    ) -> EgressPolicy:
        """Build a policy allowing the networks in a comma-separated CIDR list (or a list)."""
        items = cidrs.split(",") if isinstance(cidrs, str) else cidrs
        networks: list[IPNetwork] = []
        for item in (item.strip() for item in items):
            if not item:
                continue
            try:
                networks.append(ip_network(item))
            except ValueError as exc:
                raise ValueError(f"{setting}: {item!r} is not a CIDR network ({exc})") from exc
        return cls(
            allowed_networks=tuple(networks),
            what=what,
            setting=setting,
            plain_http_to_public=plain_http_to_public,
        )

    def in_allowed_networks(self, address: IPAddress) -> bool:
        """Tell whether address (judged as IPv4 if IPv4-mapped) is inside an allowed network."""
        address = unmap_ipv4(address)
        return any(address in network for network in self.allowed_networks)

    def is_refused(self, address: IPAddress) -> str | None:
        """Return why address is refused (e.g. "a private address"), or None if it is allowed."""
        if self.in_allowed_networks(address):
            return None
        address = unmap_ipv4(address)
        for network, reason in REFUSED_NETWORKS:
            if address in network:
                return reason
        # Safety net for special-purpose ranges the table above does not name.
        if address.is_reserved:
            return "a reserved address"
        if not address.is_global:
            return "a non-public address"
        return None

    def resolve(self, host: str, port: int) -> list[IPAddress]:
        """Return every address host resolves to, deduplicated, in resolver order.

        The lookup waits at most LOOKUP_TIMEOUT_S, and never past this thread's exchange's
        deadline (a delivery attempt's): a name whose servers do not answer holds no thread longer.
        """
        literal = ip_literal(host)
        if literal is not None:
            return [unmap_ipv4(literal)]
        if _ends_in_a_number(host):
            raise RefusedDestination(
                f"{self.what} host {host} ends in a number but is not an IPv4 address of four "
                "decimal numbers 0-255 (other forms a client may read as octal or hex)",
                host=host,
            )
        left_s = DEADLINES.left_s()
        timeout_s = LOOKUP_TIMEOUT_S if left_s is None else min(left_s, LOOKUP_TIMEOUT_S)
        try:
            answers = self.names.addresses(host, port, timeout_s)
        except LookupFailed as exc:
            raise RefusedDestination(f"{self.what} host {host} {exc}", host=host) from None
        addresses: list[IPAddress] = []
        for answer in answers:
            address = unmap_ipv4(ip_address(answer))
            if address not in addresses:
                addresses.append(address)
        return addresses

    def pick_address(self, host: str, port: int, *, scheme: str = "https") -> IPAddress:
        """Resolve host, check every address it resolves to, and return the first one."""
        return self.checked_addresses(host, port, scheme=scheme)[0]

    def checked_addresses(self, host: str, port: int, *, scheme: str = "https") -> list[IPAddress]:
        """Resolve host and check every address it resolves to; all of them, in order."""
        addresses = self.resolve(host, port)
        is_literal = ip_literal(host) is not None
        for address in addresses:
            reason = self.is_refused(address)
            if reason is not None:
                # Not the address itself: a client could map the internal network name by name.
                # It is on the exception (`address`) for the server's own logs.
                what = f"is {reason}" if is_literal else f"resolves to {reason}"
                raise RefusedDestination(
                    f"{self.what} host {host} {what}; allow it with {self.setting}",
                    host=host,
                    address=address,
                )
            if (
                scheme != "https"
                and not self.plain_http_to_public
                and not self.in_allowed_networks(address)
            ):
                where = "" if is_literal else " resolves to an address that"
                raise RefusedDestination(
                    f"{self.what} URL uses {scheme}, but host {host}{where} is outside "
                    f"{self.setting}; use https",
                    host=host,
                    address=address,
                )
        return addresses

    def check_url(self, url: str) -> None:
        """Raise ValueError for a malformed URL, RefusedDestination for a refused one."""
        parts = split_http_url(url, f"{self.what} URL")
        scheme = parts.scheme.lower()
        assert parts.hostname is not None  # split_http_url refused a URL without one
        self.pick_address(parts.hostname, parts.port or DEFAULT_PORTS[scheme], scheme=scheme)


def split_http_url(url: str, what: str) -> SplitResult:
    """`url` split, if it is a well-formed http(s) URL with a host, a valid port and no user name
    or password; else ValueError saying why (`what` names the URL in the message)."""
    # No message echoes the URL: a password in it (urlsplit ends the host part at the first
    # "/", "?" or "#", so one holding those passes for a path and is not caught as one) would
    # go back in the answer — and the caller knows what it sent.
    parts = urlsplit(url)
    if "@" in parts.netloc:
        raise ValueError(f"{what} must not contain a user name or password")
    # Whitespace is non-printable, but for " " (one C-level scan each, not a loop in Python)
    if not url.isprintable() or " " in url or "\\" in url:
        raise ValueError(f"{what} contains a space, a backslash or a control character")
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"{what} must use https (or http), not {scheme or 'no scheme'!r}")
    if not parts.hostname:
        raise ValueError(f"{what} has no host")
    try:
        port = parts.port  # urlsplit checks the port only when asked for it
    except ValueError:
        port = 0
    if port == 0:  # 0: no service listens there (the SSRF check would have judged 443)
        raise ValueError(f"{what} has an invalid port (it must be 1 to 65535)")
    return parts


class _ReusedWhileFresh:
    """A connection that counts as dropped once REUSE_WITHIN_S has passed since its last answer:
    the pool then opens a new one instead of sending on it."""

    answered_at: float | None = None

    def getresponse(self) -> HTTPResponse:
        response: HTTPResponse = super().getresponse()  # type: ignore[misc]
        self.answered_at = time.monotonic()
        return response

    @property
    def is_connected(self) -> bool:
        if self.answered_at is not None and time.monotonic() - self.answered_at > REUSE_WITHIN_S:
            return False
        connected: bool = super().is_connected  # type: ignore[misc]
        return connected


# mypy cannot match a mixin's getresponse against urllib3's (typed with an ignore of its own).
class _FreshHTTPConnection(_ReusedWhileFresh, HeldHTTPConnection):  # type: ignore[misc]
    pass


class _FreshHTTPSConnection(_ReusedWhileFresh, HeldHTTPSConnection):  # type: ignore[misc]
    pass


class _FreshHTTPConnectionPool(HeldHTTPConnectionPool):
    ConnectionCls = _FreshHTTPConnection


class _FreshHTTPSConnectionPool(HeldHTTPSConnectionPool):
    ConnectionCls = _FreshHTTPSConnection


# The checked address a PinnedAddressAdapter.send is trying, for the pool it gets to use.
_PINNED_ADDRESS: contextvars.ContextVar[IPAddress | None] = contextvars.ContextVar(
    "pinned_address", default=None
)


class PinnedAddressAdapter(DeadlineAdapter):
    """A requests adapter that checks every request's destination and connects to that address;
    its connections are held to their exchange's deadline, and kept ones reused only while
    fresh (REUSE_WITHIN_S)."""

    # Pickling an adapter keeps only __attrs__; the policy must survive it.
    __attrs__ = (*HTTPAdapter.__attrs__, "policy")
    pool_classes: ClassVar[Mapping[str, type[HTTPConnectionPool]]] = {
        "http": _FreshHTTPConnectionPool,
        "https": _FreshHTTPSConnectionPool,
    }

    def __init__(self, policy: EgressPolicy, **adapter_options: Any) -> None:
        self.policy = policy
        super().__init__(**adapter_options)

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> Any:
        """Send to the host's checked addresses in order, until a connection is made: one that
        refuses, is unreachable or does not answer in time is passed over while the exchange
        has time left (a dual-stack receiver whose IPv6 address is broken still gets its
        webhook). A request that reached an address is never sent to another."""
        parts = urlsplit(request.url or "")  # as requests takes the pool's host from it
        scheme = parts.scheme.lower()
        try:
            port = parts.port or DEFAULT_PORTS.get(scheme)
        except ValueError:
            port = None
        if parts.hostname is None or port is None:
            raise requests.exceptions.InvalidURL(f"not an http(s) URL with a host: {request.url}")
        addresses = self.policy.checked_addresses(parts.hostname, port, scheme=scheme)
        for n, address in enumerate(addresses):
            pinned = _PINNED_ADDRESS.set(address)
            try:
                return super().send(request, *args, **kwargs)
            except requests.ConnectionError as exc:
                left_s = DEADLINES.left_s()
                out_of_time = left_s is not None and left_s <= 0
                if n + 1 == len(addresses) or out_of_time or connect_failure(exc) is None:
                    raise
            finally:
                _PINNED_ADDRESS.reset(pinned)
        raise AssertionError("checked_addresses is never empty")

    def build_connection_pool_key_attributes(
        self,
        request: requests.PreparedRequest,
        verify: bool | str,
        cert: str | tuple[str, str] | None = None,
    ) -> tuple[_HostParams, _PoolKwargs]:
        """Swap the URL's host for its checked address; keep the host for Host, SNI and the cert."""
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(
            request, verify, cert
        )
        scheme: str = host_params["scheme"]
        host: str = host_params["host"]
        # The stubs say int, but requests passes None when the URL names no port.
        port = cast("int | None", host_params["port"])
        # The address send() is trying (checked there); checked here if called on its own.
        address = _PINNED_ADDRESS.get() or self.policy.pick_address(
            host, port or DEFAULT_PORTS[scheme], scheme=scheme
        )

        # Copy before writing: callers may share one headers dict between requests.
        request.headers = CaseInsensitiveDict(request.headers or {})
        request.headers["Host"] = _host_header(host, port, scheme)
        if scheme == "https":
            # The stubs' TypedDict lacks these HTTPS-pool options, which urllib3 accepts:
            # verify the certificate against, and send as SNI, the URL's host, not the address.
            tls_options = cast("dict[str, Any]", pool_kwargs)
            tls_options["assert_hostname"] = host
            tls_options["server_hostname"] = host
        host_params["host"] = str(address)
        return host_params, pool_kwargs

    def get_connection_with_tls_context(
        self,
        request: requests.PreparedRequest,
        verify: bool | str | None,
        proxies: Mapping[str, str] | None = None,
        cert: tuple[str, str] | str | None = None,
    ) -> ConnectionPool:
        """Refuse proxies (a proxy would resolve the host itself), then get the pinned pool."""
        if request.url and select_proxy(request.url, proxies):
            raise ValueError("PinnedAddressAdapter cannot send through a proxy")
        return super().get_connection_with_tls_context(request, verify, proxies, cert)

    def get_connection(self, url: Any, proxies: Mapping[str, str] | None = None) -> ConnectionPool:
        """Refuse the deprecated lookup, which would connect without the address check."""
        raise NotImplementedError("use get_connection_with_tls_context (requests >= 2.32.2)")


class NoRedirectSession(requests.Session):
    """A Session that never follows a redirect: a 3xx answer is returned as the response."""

    def get_redirect_target(self, resp: requests.Response) -> None:
        """Report no redirect target, so requests neither follows nor prepares one."""
        # Not max_redirects = 0: with it, requests raises TooManyRedirects on any 3xx even
        # under allow_redirects=False, as it still prepares response.next.
        return None


def keep_connection_after_answer(response: requests.Response) -> None:
    """Read a short answer to its end, so its connection goes back to the pool for the next
    attempt; a long one, or one that ends only when the receiver closes, is closed unread.

    A delivery streams the answer (`stream=True`) and needs only its status: left unread, the
    connection would be closed with the response — every attempt a new TCP (and TLS)
    handshake. Call it inside `DEADLINES.within` (as a delivery does): a receiver sending its
    body slowly is cut off there, not waited for.
    """
    raw = response.raw
    encoding = response.headers.get("Transfer-Encoding")
    if raw.version < 11 or "close" in response.headers.get("Connection", "").lower():
        return  # the receiver ends the connection (as http.client reads it): nothing to keep
    if response.status_code in (204, 304) and encoding is not None:
        return  # no body by definition, yet http.client would read the chunks it announces
    remaining = raw.length_remaining  # None: chunked, or read until the receiver closes
    # Only what http.client reads as chunks (exactly "chunked") ends without a length.
    chunked = encoding is not None and encoding.lower() == "chunked"
    if (remaining is None and not chunked) or (remaining or 0) > MAX_ANSWER_READ_BYTES:
        return
    # Once read to its end, urllib3 gives the connection back to its pool; a body longer than
    # this (chunked) is left unfinished, and its connection closed with the response.
    with contextlib.suppress(urllib3.exceptions.HTTPError, OSError):
        raw.read(MAX_ANSWER_READ_BYTES + 1, decode_content=False)


def egress_session(policy: EgressPolicy, *, connections_per_host: int = 10) -> requests.Session:
    """Return a Session that delivers only to addresses policy allows, ignoring env proxies.

    It keeps up to `connections_per_host` connections to each address for reuse: as many as
    deliveries made at once, or every one beyond is a new connection thrown away after use.
    """
    session = NoRedirectSession()
    session.trust_env = False
    # No cookies kept: one receiver's Set-Cookie (say for .herokuapp.com) would otherwise ride on
    # other teams' webhooks, and the jar grow for the worker's life.
    session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    adapter = PinnedAddressAdapter(policy, pool_maxsize=connections_per_host)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
