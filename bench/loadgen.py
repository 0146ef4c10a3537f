"""HTTP load from separate processes: `wrk` for maximum throughput, and a Python generator.

The Python generator runs as `python -m bench.loadgen ...` in several processes, each with a few
threads holding one kept-alive connection apiece (KeepAliveExchange: a pre-encoded request, the
answer read by Content-Length — cheap, as the generator shares the cores). Two modes:

- closed loop (no --rate): every thread sends its next request as soon as the last one answered —
  the fallback for maximum throughput when wrk is not installed;
- paced (--rate R): requests are due on a fixed schedule (R per second over all processes) and
  each latency is measured from the request's *scheduled* send time, not from when a free thread
  got round to sending it. A server that stalls therefore shows up in the figures with the full
  wait every scheduled request suffered (no coordinated omission, as in wrk2); only the
  generator's own oversleep (woken late on a busy CPU) is taken out, and reported.

Each process prints one JSON object: latencies (ms) of 2xx answers, error count, time span.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from bench.common import percentile, say

WRK_INSTALL_HINT = "wrk is not installed (Debian/Ubuntu: apt-get install -y wrk)"


@dataclass
class LoadResult:
    """What one load run measured."""

    tool: str
    requests: int  # answered 2xx
    errors: int  # non-2xx answers and socket errors
    duration_s: float
    rps: float
    p50_ms: float
    p99_ms: float
    # Paced runs: latency counts from each request's scheduled send, waits for a busy connection
    # included, the generator's own oversleep (woken late on a busy CPU) taken out; these two
    # show what was taken out.
    raw_p99_ms: float = math.nan
    oversleep_p99_ms: float = math.nan


# --- wrk -------------------------------------------------------------------------------------


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def post_script(path: str, body: str, headers: dict[str, str]) -> str:
    """A wrk Lua script that POSTs `body` with `headers`."""
    lines = ['wrk.method = "POST"', f"wrk.body = {_lua_string(body)}"]
    lines += [f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}" for k, v in headers.items()]
    return "\n".join(lines) + "\n"


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_wrk(
    url: str, *, duration_s: float, threads: int, connections: int, script: Path | None = None
) -> LoadResult:
    """`wrk --latency` for `duration_s`; parses requests/s, p50 and p99."""
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration_s))}s",
            "--timeout", "10s", "--latency"]  # fmt: skip
    if script is not None:
        argv += ["-s", str(script)]
    argv.append(url)
    out = subprocess.run(
        argv, capture_output=True, text=True, timeout=duration_s + 60, check=True
    ).stdout
    return parse_wrk(out)


_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not match:
        raise ValueError(f"wrk latency {text!r} not understood")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse_wrk(out: str) -> LoadResult:
    """Figures from wrk's `--latency` report."""
    rps_line = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert rps_line is not None, out
    rps = float(rps_line.group(1))
    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    assert total is not None, out
    percentiles = dict(re.findall(r"^\s+(50|99)(?:\.0+)?%\s+(\S+)\s*$", out, re.MULTILINE))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = int(non_2xx.group(1)) if non_2xx else 0
    if socket:
        errors += sum(int(g) for g in socket.groups())
    requests = int(total.group(1))
    return LoadResult(
        tool="wrk",
        requests=requests - (int(non_2xx.group(1)) if non_2xx else 0),
        errors=errors,
        duration_s=_ms(total.group(2) + total.group(3)) / 1e3,
        rps=rps,
        p50_ms=_ms(percentiles["50"]),
        p99_ms=_ms(percentiles["99"]),
    )


# --- the Python generator: orchestration -----------------------------------------------------


def run_python(
    url: str,
    *,
    duration_s: float,
    connections: int,
    processes: int = 2,
    method: str = "GET",
    body: str | None = None,
    headers: dict[str, str] | None = None,
    rate: float | None = None,
) -> LoadResult:
    """Run the generator in `processes` processes; closed loop, or paced at `rate` per second."""
    start_at = time.time() + 2.0  # room for the processes to import and connect
    per_process = max(1, connections // processes)
    children: list[subprocess.Popen[str]] = []
    try:
        for index in range(processes):
            argv = [sys.executable, "-m", "bench.loadgen", "--url", url, "--method", method,
                    "--duration", str(duration_s), "--connections", str(per_process),
                    "--start-at", repr(start_at)]  # fmt: skip
            if body is not None:
                argv += ["--body", body]
            for name, value in (headers or {}).items():
                argv += ["--header", f"{name}: {value}"]
            if rate is not None:
                argv += ["--rate", repr(rate / processes), "--offset", repr(index / rate)]
            children.append(
                subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=Path.cwd())
            )
        reports = []
        for child in children:
            out, _ = child.communicate(timeout=duration_s + 60)
            if child.returncode != 0:
                raise RuntimeError(f"load generator exited with {child.returncode}")
            reports.append(json.loads(out))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    latencies = [ms for report in reports for ms in report["latencies_ms"]]
    raw = [ms for report in reports for ms in report["raw_ms"]]
    oversleeps = [ms for report in reports for ms in report["oversleeps_ms"]]
    errors = sum(report["errors"] for report in reports)
    span = max(r["last"] for r in reports) - min(r["first"] for r in reports) if latencies else 0
    return LoadResult(
        tool="python-paced" if rate else "python",
        requests=len(latencies),
        errors=errors,
        duration_s=span,
        rps=len(latencies) / span if span > 0 else math.nan,
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        raw_p99_ms=percentile(raw, 99) if raw else math.nan,
        oversleep_p99_ms=percentile(oversleeps, 99) if oversleeps else math.nan,
    )


def max_throughput(
    url: str,
    *,
    duration_s: float,
    threads: int,
    connections: int,
    body: str | None = None,
    headers: dict[str, str] | None = None,
    script_dir: Path,
) -> LoadResult:
    """Closed-loop maximum: wrk if installed, else the Python generator."""
    if wrk_available():
        script = None
        if body is not None:
            script = script_dir / "post.lua"
            script.write_text(post_script(urlsplit(url).path, body, headers or {}))
        return run_wrk(
            url, duration_s=duration_s, threads=threads, connections=connections, script=script
        )
    say(f"{WRK_INSTALL_HINT}; falling back to the Python load generator (slower client)")
    return run_python(
        url,
        duration_s=duration_s,
        connections=connections,
        method="POST" if body is not None else "GET",
        body=body,
        headers=headers,
    )


# --- the Python generator: one process -------------------------------------------------------

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)


class KeepAliveExchange:
    """One pre-encoded HTTP/1.1 request, sent again and again over one kept-alive socket.

    The generator shares the cores with the server it measures, so it spends as little as it
    can per request (http.client costs several times more): responses are read by their
    Content-Length, which the API always sends.
    """

    def __init__(self, host: str, port: int, request: bytes, timeout_s: float = 30) -> None:
        self.address, self.request, self.timeout_s = (host, port), request, timeout_s
        self._sock: socket.socket | None = None
        self._pending = b""

    def connect(self) -> None:
        self.close()
        self._sock = socket.create_connection(self.address, timeout=self.timeout_s)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock, self._pending = None, b""

    def exchange(self) -> int:
        """Send the request, read the whole response; its HTTP status."""
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        self._sock.sendall(self.request)
        data = self._pending
        while (end := data.find(b"\r\n\r\n")) < 0:
            data += self._recv()
        head, rest = data[: end + 2], data[end + 4 :]
        length = _CONTENT_LENGTH.search(head)
        if length is None:
            raise ConnectionError(f"response without Content-Length: {head[:200]!r}")
        size = int(length.group(1))
        while len(rest) < size:
            rest += self._recv()
        self._pending = rest[size:]
        return int(head[9:12])

    def _recv(self) -> bytes:
        assert self._sock is not None
        chunk = self._sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        return chunk


def _encode_request(method: str, url: str, headers: dict[str, str], body: bytes | None) -> bytes:
    parts = urlsplit(url)
    lines = [f"{method} {parts.path or '/'} HTTP/1.1", f"Host: {parts.netloc}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def _generate(args: argparse.Namespace) -> dict[str, object]:
    parts = urlsplit(args.url)
    headers = dict(h.split(": ", 1) for h in args.header)
    if args.body is not None:
        headers.setdefault("Content-Type", "application/json")
    body = args.body.encode() if args.body is not None else None
    request = _encode_request(args.method, args.url, headers, body)
    end = args.start_at + args.duration
    slots = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []
    raw: list[float] = []  # paced: from the scheduled send, the generator's own lag included
    oversleeps: list[float] = []
    errors = 0
    first, last = math.inf, 0.0

    def worker() -> None:
        nonlocal errors, first, last
        conn = KeepAliveExchange(parts.hostname or "127.0.0.1", parts.port or 80, request)
        conn.connect()
        mine: list[float] = []
        my_raw: list[float] = []
        my_oversleeps: list[float] = []
        my_errors = 0
        my_first, my_last = math.inf, 0.0
        while True:
            if args.rate:
                due = args.start_at + args.offset + next(slots) / args.rate
                if due >= end:
                    break
            else:
                due = time.time()
                if due >= end:
                    break
            free_at = time.time()  # later than `due`: this connection was busy (the server's)
            while (wait := due - time.time()) > 0:
                time.sleep(wait)
            sent = time.time()
            # Woken late from a sleep that should have ended at `due`: the generator's own lag
            # (not scheduled on a busy CPU), not the server's; taken out of the latency.
            oversleep = max(0.0, sent - max(due, free_at))
            try:
                status = conn.exchange()
                done = time.time()
                if 200 <= status < 300:
                    mine.append((done - due - oversleep) * 1e3)
                    my_raw.append((done - due) * 1e3)
                    my_oversleeps.append(oversleep * 1e3)
                    my_first, my_last = min(my_first, due), max(my_last, done)
                else:
                    my_errors += 1
            except (OSError, ValueError):
                my_errors += 1
                conn.close()  # the next exchange connects again
        conn.close()
        with lock:
            latencies.extend(mine)
            raw.extend(my_raw)
            oversleeps.extend(my_oversleeps)
            errors += my_errors
            first, last = min(first, my_first), max(last, my_last)

    if args.rate is None:  # closed loop: everyone starts at start_at
        while (wait := args.start_at - time.time()) > 0:
            time.sleep(wait)
    threads = [threading.Thread(target=worker) for _ in range(args.connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {
        "latencies_ms": latencies,
        "raw_ms": raw,
        "oversleeps_ms": oversleeps,
        "errors": errors,
        "first": first if latencies else 0.0,
        "last": last,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    parser.add_argument("--url", required=True)
    parser.add_argument("--method", default="GET")
    parser.add_argument("--body")
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--start-at", type=float, default=0.0)
    parser.add_argument("--rate", type=float, help="requests/s of this process (paced mode)")
    parser.add_argument("--offset", type=float, default=0.0, help="seconds added to the schedule")
    args = parser.parse_args(argv)
    args.start_at = args.start_at or time.time()
    with contextlib.redirect_stdout(sys.stderr):
        report = _generate(args)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
