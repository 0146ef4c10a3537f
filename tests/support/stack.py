"""The real stack for integration tests: cli.stack.Stack with settings that make its timings
short, and what a stopped worker's dispatcher would do."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cli.stack import Stack
from workers.pipeline import JobPipeline

# Retries, leases and timeouts of seconds, not minutes: a test waits for them.
TEST_SETTINGS = {
    "WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
    "INPUT_ALLOWED_NETWORKS": "127.0.0.0/8",
    "WEBHOOK_RETRY_SCHEDULE": "0,0.5,1,1,1",
    "WEBHOOK_TIMEOUT_S": "3",
    "DISPATCH_INTERVAL_S": "0.2",
    "RUNCOMFY_TIMEOUT_S": "5",
    "STEP_LEASE_S": "15",
    "LOG_LEVEL": "INFO",
}


def start_stack(
    base: Path,
    *,
    workers: int = 1,
    env: dict[str, str] | None = None,
    emulator_args: tuple[str, ...] = ("--queue-s", "0.3", "--run-s", "0.5"),
    concurrency: int = 2,
) -> Stack:
    """redis-server (AOF), the emulator, Celery worker(s) `worker1`… and beat, each its own
    process, with TEST_SETTINGS and `env` over them; the caller stops it."""
    stack = Stack(base, settings_env=TEST_SETTINGS | (env or {}), name="test stack")
    try:
        stack.start_redis()
        stack.start_emulator(*emulator_args)
        for number in range(1, workers + 1):
            stack.start_worker(name=f"worker{number}", concurrency=concurrency)
        stack.start_beat()
    except BaseException:
        stack.stop()
        raise
    return stack


@contextmanager
def served_stack(base: Path, name: str, env: dict[str, str] | None = None) -> Iterator[Stack]:
    """redis-server, the emulator, gunicorn's API, then a worker and beat — started after the
    API, so they get its URL as their PUBLIC_BASE_URL (whole signed media URLs) — with
    TEST_SETTINGS and `env` over them, for tests that call the API over real HTTP; all stopped
    at the end."""
    stack = Stack(base, settings_env=TEST_SETTINGS | (env or {}), name=name)
    try:
        stack.start_redis()
        stack.start_emulator("--queue-s", "0.2", "--run-s", "0.3")
        stack.start_api()
        stack.start_worker(concurrency=2)
        stack.start_beat()
        stack.wait_for_worker(stack.worker)
        yield stack
    finally:
        stack.stop()


def admit(pipeline: JobPipeline) -> None:
    """Do what the (stopped) worker's dispatcher would: hand out free upstream slots."""
    pipeline.store.admission.admit(
        max_in_flight=pipeline.settings.runcomfy_max_in_flight, slot_ttl_s=600
    )
