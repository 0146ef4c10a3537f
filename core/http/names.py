"""Host-name lookups held to a time limit: webhook hosts' (names other teams give us) and
RunComfy's (core/deadlines.py looks it up at connect time).

`socket.getaddrinfo` takes no time limit: it blocks its thread for as long as the system
resolver retries (glibc: 5 s a try, two tries, for each name server and search domain). A webhook
host whose name servers do not answer — a team's DNS outage, or a name made to hang — would hold
an API thread that long on every POST naming it, and a few such requests at once would hold every
thread of the API, for every team. c-ares (pycares) sends the queries itself, from its own thread
per process; a lookup waits at most its time limit, and one given up on leaves no thread behind
(c-ares drops the query at its own timeout). It reads the same `/etc/resolv.conf`, `/etc/hosts`
and `/etc/nsswitch.conf` as the system resolver, but not NSS modules (mDNS, LDAP), and it answers
`localhost` with both ::1 and 127.0.0.1 (RFC 6761), whatever `/etc/hosts` says.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import weakref
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

import pycares
import pycares.errno

log = logging.getLogger(__name__)

# The longest a lookup waits outside an exchange's own deadline (the API's check of a webhook
# URL). A name server that answers at all answers within milliseconds to a few hundred (a cold
# recursive lookup); one that has not answered in 2 s is, to the caller, one that does not.
LOOKUP_TIMEOUT_S = 2.0
# How long c-ares waits for one query's answer before it asks again (the next server, if there is
# one), and how many times it asks. Its default (2 s a try) would spend the whole limit above on
# the first try, so one lost UDP packet would fail the lookup; 0.5 s leaves room for three more.
# A lookup given up on lives in c-ares that long (~6 s, backoff included), then is dropped.
TRY_TIMEOUT_S = 0.5
TRIES = 4


def ip_literal(host: str) -> IPv4Address | IPv6Address | None:
    """Return host as an IP address if it is an IP literal (brackets allowed), else None: a
    host that needs no lookup."""
    try:
        return ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        return None


class LookupFailed(Exception):
    """A host name that did not resolve: the message says why (not found, or not in time)."""


class NameLookup:
    """Resolves host names to addresses, each lookup within a time limit.

    One c-ares channel per process, made on first use (a forked child makes its own: c-ares'
    thread does not survive a fork); c-ares caches answers for their TTL. Thread-safe.
    `servers` ("host:port", ...) replaces resolv.conf's name servers (tests use it).
    """

    def __init__(self, servers: tuple[str, ...] = ()) -> None:
        self.servers = servers
        self._lock = threading.Lock()
        self._channel: pycares.Channel | None = None
        self._forked_away: list[pycares.Channel] = []
        _EVERY_LOOKUP.add(self)

    def __reduce__(self) -> tuple[Any, ...]:
        return (NameLookup, (self.servers,))  # a channel is per process: the copy makes its own

    def addresses(self, host: str, port: int, timeout_s: float) -> list[str]:
        """Every IPv4 and IPv6 address host resolves to, as text, in c-ares' order (RFC 6724).

        Raises LookupFailed if it does not resolve, or not within `timeout_s`.
        """
        answered = threading.Event()
        answer: list[tuple[Any, int | None]] = []

        def on_answer(result: Any, error: int | None) -> None:  # on c-ares' thread
            answer.append((result, error))
            answered.set()

        if timeout_s <= 0:
            raise LookupFailed("did not resolve within 0 s")  # its exchange's time is up
        try:
            self._get_channel().getaddrinfo(host, port, type=socket.SOCK_STREAM, callback=on_answer)
        except (ValueError, UnicodeError, RuntimeError, pycares.AresError) as exc:
            raise LookupFailed(f"does not resolve ({exc})") from None
        if not answered.wait(timeout_s):
            # Worth an operator's eye: a team's name servers are down, or ours are.
            log.warning("host lookup timed out", extra={"host": host, "limit_s": timeout_s})
            raise LookupFailed(f"did not resolve within {timeout_s:.2g} s")
        result, error = answer[0]
        if error is not None:
            reason = pycares.errno.strerror(error)
            text = reason.decode(errors="replace") if isinstance(reason, bytes) else reason
            raise LookupFailed(f"does not resolve ({text})")
        addresses = [
            node.addr[0].decode("ascii")
            for node in result.nodes
            if node.family in (socket.AF_INET, socket.AF_INET6)
        ]
        if not addresses:
            raise LookupFailed("does not resolve (no IPv4 or IPv6 address)")
        return addresses

    def _get_channel(self) -> pycares.Channel:
        with self._lock:
            if self._channel is None:
                self._channel = pycares.Channel(
                    servers=list(self.servers) or None, timeout=TRY_TIMEOUT_S, tries=TRIES
                )
            return self._channel

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        if self._channel is not None:
            # Kept, never destroyed: destroying it would wait on the parent's c-ares thread.
            self._forked_away.append(self._channel)
            self._channel = None


_EVERY_LOOKUP: weakref.WeakSet[NameLookup] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for lookup in list(_EVERY_LOOKUP):
        lookup._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)

NAMES = NameLookup()
