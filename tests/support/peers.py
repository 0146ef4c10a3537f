"""Peers on 127.0.0.1 for answers no real server would send: a raw TCP peer and a name server."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


@contextlib.contextmanager
def raw_peer(
    answer: Callable[[socket.socket, threading.Event], None], *, connections: int = 1
) -> Iterator[int]:
    """A TCP peer on 127.0.0.1 for answers no HTTP server would send (dripped, cut short,
    flooded): each accepted connection, up to `connections`, goes to `answer(connection, stop)`
    on a thread of its own, and is closed after. `stop` is set when the block ends; an OSError
    in `answer` (the client went away) ends it quietly. Yields the port."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def serve(connection: socket.socket) -> None:
        with connection, contextlib.suppress(OSError):
            answer(connection, stop)

    def accept() -> None:
        while not stop.is_set() and len(threads) < connections:
            with contextlib.suppress(TimeoutError):
                connection, _ = listener.accept()
                connection.settimeout(None)
                threads.append(threading.Thread(target=serve, args=(connection,), daemon=True))
                threads[-1].start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        acceptor.join(timeout=10)
        listener.close()
        for thread in threads:
            thread.join(timeout=10)


@dataclass
class DnsPeer:
    """A name server on 127.0.0.1 (UDP) for c-ares to ask: it answers A and AAAA queries from
    `records`, NXDOMAIN for other names, after `delay_s`; with `silent`, it never answers; with
    `lose_first`, the first query for each name is lost (as a UDP packet can be)."""

    address: str
    records: dict[str, list[str]]
    delay_s: float = 0.0
    silent: bool = False
    lose_first: bool = False
    asked: list[str] | None = None

    def answer(self, query: bytes) -> bytes | None:
        """The reply to one query (RFC 1035 §4.1), or None to stay silent."""
        end = 12
        while query[end]:
            end += query[end] + 1
        labels, at = [], 12
        while query[at]:
            labels.append(query[at + 1 : at + 1 + query[at]].decode("ascii"))
            at += query[at] + 1
        name = ".".join(labels).lower()
        qtype = int.from_bytes(query[end + 1 : end + 3], "big")
        question = query[12 : end + 5]
        assert self.asked is not None
        self.asked.append(name)
        if self.silent or (self.lose_first and self.asked.count(name) == 1):
            return None
        if name not in self.records:
            return query[:2] + b"\x81\x83" + b"\x00\x01\x00\x00\x00\x00\x00\x00" + question
        family = {1: socket.AF_INET, 28: socket.AF_INET6}.get(qtype)
        rdatas = [
            socket.inet_pton(family, address)
            for address in self.records[name]
            if family is not None and (":" in address) == (family == socket.AF_INET6)
        ]
        answers = b"".join(
            b"\xc0\x0c"  # the name: a pointer to the question's
            + qtype.to_bytes(2, "big")
            + b"\x00\x01"  # class IN
            + (60).to_bytes(4, "big")  # TTL
            + len(rdata).to_bytes(2, "big")
            + rdata
            for rdata in rdatas
        )
        header = query[:2] + b"\x81\x80" + b"\x00\x01" + len(rdatas).to_bytes(2, "big")
        return header + b"\x00\x00\x00\x00" + question + answers


@contextlib.contextmanager
def dns_peer(records: dict[str, list[str]] | None = None, **options: Any) -> Iterator[DnsPeer]:
    """Run a DnsPeer (options: delay_s, silent, lose_first) until the block ends; its `address` is what
    NameLookup(servers=…) takes."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(0.1)
    peer = DnsPeer(f"127.0.0.1:{udp.getsockname()[1]}", records or {}, asked=[], **options)
    stop = threading.Event()
    failures: list[Exception] = []

    def reply_later(reply: bytes, to: Any) -> None:
        if not stop.wait(peer.delay_s):
            with contextlib.suppress(OSError):
                udp.sendto(reply, to)

    def serve() -> None:
        while not stop.is_set():
            try:
                query, sender = udp.recvfrom(4096)
            except TimeoutError:
                continue
            try:
                reply = peer.answer(query)
            except Exception as exc:  # raised again when the block ends: a broken peer fails loudly
                failures.append(exc)
                continue
            if reply is not None:
                threading.Thread(target=reply_later, args=(reply, sender), daemon=True).start()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        yield peer
    finally:
        stop.set()
        server.join(timeout=10)
        udp.close()
    if failures:
        raise failures[0]
