"""Liveness, readiness and metrics: no auth, for probes and Prometheus."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from core.account import AccountState
from core.jobs import iso
from service.context import ctx

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    """The process is alive."""
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    """Redis and the broker answer. RunComfy refusing the account (out of balance, token
    refused) is said too, but leaves the API ready: jobs are still accepted and wait."""
    checks: dict[str, str] = {}
    try:
        ctx().redis.ping()
        checks["redis"] = "ok"
        trouble = AccountState(ctx().redis).current()
        checks["runcomfy_account"] = (
            "ok" if trouble is None else f"{trouble.kind} since {iso(trouble.since)}"
        )
    except Exception as exc:
        checks["redis"] = f"unreachable: {type(exc).__name__}"
    try:
        with ctx().celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"unreachable: {type(exc).__name__}"
    ready = checks["redis"] == "ok" and checks["broker"] == "ok"
    return jsonify(status="ready" if ready else "not ready", checks=checks), 200 if ready else 503


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus text format; counters are global across all replicas."""
    return Response(generate_latest(ctx().metrics_registry), content_type=CONTENT_TYPE_LATEST)
