"""Counters of what callers did to the emulator, for tests and benchmarks to check."""

from __future__ import annotations

import threading
from collections import Counter


class CallStats:
    """Counts of /v1 calls, answers by HTTP status, and created requests by prompt."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: Counter[str] = Counter()
        self._responses: Counter[str] = Counter()
        self._submits_by_prompt: Counter[str] = Counter()

    def record_call(self, kind: str) -> None:
        """Count one call of `kind` (submit, status, result, cancel, price)."""
        with self._lock:
            self._calls[kind] += 1

    def record_response(self, status_code: int) -> None:
        """Count one /v1 answer by its HTTP status."""
        with self._lock:
            self._responses[str(status_code)] += 1

    def record_submit(self, prompt: str) -> None:
        """Count one request actually created (a paid generation upstream)."""
        with self._lock:
            self._submits_by_prompt[prompt] += 1

    def reset(self) -> None:
        """Forget every count."""
        with self._lock:
            self._calls.clear()
            self._responses.clear()
            self._submits_by_prompt.clear()

    def snapshot(self) -> dict[str, object]:
        """Return the counts as a JSON-ready dict."""
        with self._lock:
            return {
                "submits": sum(self._submits_by_prompt.values()),
                "submits_by_prompt": dict(self._submits_by_prompt),
                "calls": {
                    kind: self._calls[kind]
                    for kind in ("submit", "status", "result", "cancel", "price")
                },
                "responses": dict(self._responses),
            }
