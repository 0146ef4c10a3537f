"""Tests for core.http.names: host-name lookups that never wait longer than their time limit."""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from core.http.names import NAMES, LookupFailed, NameLookup
from tests.support.peers import dns_peer


def test_a_name_resolves_to_its_ipv4_and_ipv6_addresses() -> None:
    with dns_peer({"hooks.test": ["198.51.100.7", "2001:db8::7"]}) as peer:
        lookup = NameLookup(servers=(peer.address,))
        assert sorted(lookup.addresses("hooks.test", 443, 2.0)) == ["198.51.100.7", "2001:db8::7"]
        assert "hooks.test" in (peer.asked or [])


def test_an_unknown_name_does_not_resolve_and_says_why() -> None:
    with dns_peer() as peer, pytest.raises(LookupFailed, match=r"^does not resolve \(Domain"):
        NameLookup(servers=(peer.address,)).addresses("missing.test", 443, 2.0)


def test_names_in_the_hosts_file_resolve_without_a_name_server() -> None:
    with dns_peer(silent=True) as peer:
        assert "127.0.0.1" in NameLookup(servers=(peer.address,)).addresses("localhost", 80, 2.0)
        assert peer.asked == []


def test_an_answer_slower_than_usual_but_in_time_is_taken() -> None:
    with dns_peer({"slow.test": ["198.51.100.8"]}, delay_s=0.3) as peer:
        assert NameLookup(servers=(peer.address,)).addresses("slow.test", 443, 2.0) == [
            "198.51.100.8"
        ]


def test_a_lost_query_is_asked_again_in_time() -> None:
    """One UDP packet lost must not fail a lookup: c-ares asks again well within the limit."""
    with dns_peer({"lossy.test": ["198.51.100.15"]}, lose_first=True) as peer:
        started = time.monotonic()
        assert NameLookup((peer.address,)).addresses("lossy.test", 443, 2.0) == ["198.51.100.15"]
        assert time.monotonic() - started < 1.5
        assert (peer.asked or []).count("lossy.test") >= 2


def test_a_name_server_that_never_answers_holds_a_lookup_only_its_time_limit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with dns_peer(silent=True) as peer, caplog.at_level(logging.WARNING, logger="core.http.names"):
        lookup = NameLookup(servers=(peer.address,))
        started = time.monotonic()
        with pytest.raises(LookupFailed, match=r"^did not resolve within 0\.3 s$"):
            lookup.addresses("hangs.test", 443, 0.3)
        assert 0.29 <= time.monotonic() - started < 1.0
        assert peer.asked and peer.asked[0] == "hangs.test"
    assert [(r.getMessage(), getattr(r, "host", None)) for r in caplog.records] == [
        ("host lookup timed out", "hangs.test")
    ]


def test_lookups_given_up_on_leave_no_thread_behind_and_do_not_wait_for_each_other() -> None:
    with dns_peer(silent=True) as peer:
        lookup = NameLookup(servers=(peer.address,))
        with pytest.raises(LookupFailed):  # the channel and its c-ares thread exist from here
            lookup.addresses("first.test", 443, 0.1)
        threads_before = threading.active_count()

        def look(n: int) -> float:
            started = time.monotonic()
            with pytest.raises(LookupFailed, match="did not resolve within"):
                lookup.addresses(f"hang-{n}.test", 443, 0.5)
            return time.monotonic() - started

        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=20) as pool:
            waits = list(pool.map(look, range(20)))
        # 20 lookups at once take about one time limit, not twenty of them.
        assert max(waits) < 1.5 and time.monotonic() - started < 2.0
        assert threading.active_count() == threads_before


def test_a_lookup_with_no_time_left_asks_nobody() -> None:
    with dns_peer({"late.test": ["198.51.100.16"]}) as peer:
        with pytest.raises(LookupFailed, match=r"^did not resolve within 0 s$"):
            NameLookup((peer.address,)).addresses("late.test", 443, -0.1)
        time.sleep(0.2)
        assert peer.asked == []


def test_a_late_answer_after_giving_up_is_harmless() -> None:
    with dns_peer({"late.test": ["198.51.100.9"], "next.test": ["198.51.100.10"]}) as peer:
        lookup = NameLookup(servers=(peer.address,))
        peer.delay_s = 0.4
        with pytest.raises(LookupFailed, match="did not resolve within"):
            lookup.addresses("late.test", 443, 0.1)
        time.sleep(0.5)  # the answer arrives now, to a lookup that is gone
        peer.delay_s = 0.0
        assert lookup.addresses("next.test", 443, 2.0) == ["198.51.100.10"]


@pytest.mark.parametrize(
    "host",
    ["a..b.test", "x" * 300 + ".test", ".", "bad\x00name.test", "\udcff.test"],
)
def test_a_name_c_ares_cannot_ask_for_does_not_resolve(host: str) -> None:
    with dns_peer() as peer, pytest.raises(LookupFailed, match=r"^does not resolve"):
        NameLookup(servers=(peer.address,)).addresses(host, 443, 1.0)


def test_name_servers_c_ares_cannot_use_make_lookups_fail_not_crash() -> None:
    with pytest.raises(LookupFailed, match=r"^does not resolve \("):
        NameLookup(("not-an-address",)).addresses("hooks.test", 443, 1.0)


def test_an_internationalized_name_is_asked_for_in_its_ascii_form() -> None:
    with dns_peer({"xn--bcher-kva.test": ["198.51.100.11"]}) as peer:
        assert NameLookup(servers=(peer.address,)).addresses("bücher.test", 443, 2.0) == [
            "198.51.100.11"
        ]


def test_a_copy_keeps_its_name_servers_and_makes_its_own_channel() -> None:
    with dns_peer({"copy.test": ["198.51.100.12"]}) as peer:
        lookup = NameLookup(servers=(peer.address,))
        lookup.addresses("copy.test", 443, 2.0)
        copy = pickle.loads(pickle.dumps(lookup))
        assert copy.servers == lookup.servers and copy is not lookup
        assert copy.addresses("copy.test", 443, 2.0) == ["198.51.100.12"]
    assert pickle.loads(pickle.dumps(NAMES)).servers == ()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork() in a process with threads
def test_a_forked_child_resolves_with_a_channel_of_its_own() -> None:
    """c-ares' thread stays in the parent; a child using the parent's channel would hang."""
    with dns_peer({"fork.test": ["198.51.100.13"], "child.test": ["198.51.100.14"]}) as peer:
        lookup = NameLookup(servers=(peer.address,))
        assert lookup.addresses("fork.test", 443, 2.0) == ["198.51.100.13"]  # channel made
        child = os.fork()
        if child == 0:  # pragma: no cover - the child reports by its exit status only
            ok = False
            try:
                # Not fork.test: c-ares would answer it from its cache, with no thread needed.
                ok = lookup.addresses("child.test", 443, 2.0) == ["198.51.100.14"]
            finally:
                os._exit(0 if ok else 1)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
