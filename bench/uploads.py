"""Phase 6, uploads: MB/s and latency of `POST /v1/uploads` with 2 MiB PNGs.

gunicorn with the production settings on its own Redis and a file:// media store under the
phase's folder (what `make run` and compose use); no worker. Each upload is a different picture
(uploads are content-addressed: the same bytes again would be answered without being stored),
sent as a raw `image/png` body over kept connections from a few threads; each is decoded and
checked by the API and written to the media store before its 201.
"""

from __future__ import annotations

import io
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from PIL import Image

from bench.common import Row, Sizes, cpu_meter, fmt, judged, percentile, phase_stack, say
from core.clients import ClientStore

UPLOAD_BYTES_TARGET = 2 * 1024 * 1024
# Noise does not compress: a 1000 x 700 RGB picture of it is a PNG of about 2 MiB.
PICTURE_SIZE_PX = (1000, 700)


def noise_png(seed: int) -> bytes:
    """A PNG of random pixels, about UPLOAD_BYTES_TARGET bytes, different for each seed."""
    pixels = random.Random(seed).randbytes(PICTURE_SIZE_PX[0] * PICTURE_SIZE_PX[1] * 3)
    buffer = io.BytesIO()
    Image.frombytes("RGB", PICTURE_SIZE_PX, pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def run(sizes: Sizes, base: Path) -> list[Row]:
    n, threads = sizes.upload_count, sizes.upload_threads
    say(f"uploads: drawing {n} pictures of noise (~2 MiB PNG each)")
    pictures = [noise_png(seed) for seed in range(n)]
    with phase_stack("uploads", base, run_s=0) as stack:
        stack.start_api()
        client = stack.redis()
        creds = ClientStore(client).create("bench-uploads")
        client.close()
        headers = {"Authorization": f"Bearer {creds.api_key}", "Content-Type": "image/png"}
        sessions = [requests.Session() for _ in range(threads)]
        cpu = cpu_meter(stack)

        def upload(index: int) -> tuple[int, float]:
            session = sessions[index % threads]
            sent = time.perf_counter()
            answer = session.post(
                stack.api_url + "/v1/uploads", data=pictures[index], headers=headers, timeout=60
            )
            return answer.status_code, time.perf_counter() - sent

        say(f"uploads: POST {n} uploads from {threads} threads")
        cpu.start()
        started = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            answers = list(pool.map(upload, range(n)))
        elapsed = time.perf_counter() - started
        cpu.stop()
        for session in sessions:
            session.close()
    created = sum(1 for status, _ in answers if status == 201)
    latencies_ms = [took * 1000 for _, took in answers]
    megabytes = sum(len(p) for p in pictures) / 1e6
    return [
        Row("uploads", f"POST /v1/uploads, {n} different PNGs of {fmt(megabytes / n, 'MB', 2)} "
            f"each, {threads} threads: throughput", fmt(megabytes / elapsed, "MB/s", 1)),
        Row("uploads", "uploads/s", fmt(n / elapsed, "/s", 1)),
        Row("uploads", "latency p50 / p99 (send to 201)",
            f"{fmt(percentile(latencies_ms, 50), 'ms', 1)} / "
            f"{fmt(percentile(latencies_ms, 99), 'ms', 1)}"),
        Row("uploads", "answered 201 (stored) / uploads", f"{created} / {n}", "all",
            judged(created == n)),
        Row("uploads", "API CPU per upload (decode, check, hash, write)",
            fmt(cpu.used["api"] / n * 1000, "ms", 1)),
    ]  # fmt: skip
