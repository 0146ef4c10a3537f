"""Liveness, readiness and metrics: no auth, for probes and Prometheus."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.context import ctx

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    """The process is alive."""
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    """Redis and the broker answer."""
    checks: dict[str, str] = {}
    try:
        ctx().redis.ping()
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = f"unreachable: {type(exc).__name__}"
    try:
        with ctx().celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"unreachable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return jsonify(status="ready" if ready else "not ready", checks=checks), 200 if ready else 503


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus text format; counters are global across all replicas."""
    return Response(generate_latest(ctx().metrics_registry), content_type=CONTENT_TYPE_LATEST)
