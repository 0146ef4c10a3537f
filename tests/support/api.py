"""A registered client of the API, through Flask's test client (the app gunicorn serves)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from core.clients import NewClientCredentials


@dataclass
class ApiClient:
    """A registered client and a Flask test client that sends its key."""

    creds: NewClientCredentials
    http: Any

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.creds.api_key}"}

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.http.post(path, headers=self.headers() | kwargs.pop("headers", {}), **kwargs)

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.http.get(path, headers=self.headers() | kwargs.pop("headers", {}), **kwargs)

    def wait_for(
        self, job_id: str, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 30.0
    ) -> dict[str, Any]:
        """Poll our own API until the job satisfies `predicate`; fail with its last state."""
        deadline = time.monotonic() + timeout_s
        job: dict[str, Any] = {}
        while time.monotonic() < deadline:
            job = self.get(f"/v1/jobs/{job_id}").get_json()
            if predicate(job):
                return job
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} did not get there in {timeout_s} s; last: {job}")

    def wait_final(self, job_id: str, timeout_s: float = 30.0) -> dict[str, Any]:
        return self.wait_for(
            job_id,
            lambda j: j["status"] in {"succeeded", "failed", "cancelled", "expired"},
            timeout_s,
        )
