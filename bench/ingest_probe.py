"""A bench-only API app: the production app with parts of a POST taken out, to show its costs.

Never deployed. The ingest phase serves it from gunicorn with the production settings, after the
real app's rounds, and measures each step of a POST against /healthz in the same processes:
- `POST /probe/unvalidated`: the body parsed as plain JSON (defaults filled in, no schema) and
  accepted as a job, answered as the job resource — the job is not stored;
- `POST /v1/jobs`: the real route (webargs and the marshmallow schema) — the job is not stored.
The real app's `POST /v1/jobs` adds the one Redis write to the second: the three together say
where a POST's throughput goes.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from flask import Blueprint, Flask, Response, request
from marshmallow import missing

import service
from core.commands import JobCommands
from core.jobs import Job
from core.store import Created, IdempotencyClaim, JobStore
from core.usage import AcceptLimits
from core.wakeups import PendingWakeup
from service.auth import authenticate, current_client
from service.context import ServiceContext
from service.jobs import job_location, job_response
from service.schemas import INPUT_FIELDS, JobCreateSchema

UNVALIDATED_PATH = "/probe/unvalidated"


class UnstoredJobs(JobStore):
    """A JobStore whose create answers as if it had written the job, without a Redis call."""

    def create(
        self,
        job: Job,
        *,
        idempotency: IdempotencyClaim | None = None,
        wakeup: PendingWakeup | None = None,
        limits: AcceptLimits | None = None,
    ) -> Created:
        """Nothing is written and no wake-up is claimed."""
        return Created(job.id, is_new=True, wakeup_claimed=False)


def _defaults() -> dict[str, Any]:
    """What the schema fills in for an absent field."""
    filled = {}
    for name, field in JobCreateSchema().fields.items():
        if field.load_default is not missing:
            default = field.load_default
            filled[name] = default() if callable(default) else default
    return filled


def create_app() -> Flask:
    """`gunicorn -c python:service.gunicorn_conf "bench.ingest_probe:create_app()"`."""
    app = service.create_app()
    ctx: ServiceContext = app.extensions["inpaint_gateway"]
    unstored = UnstoredJobs(ctx.redis, retention_s=ctx.settings.job_retention_s)
    app.extensions["inpaint_gateway"] = replace(ctx, commands=replace(ctx.commands, store=unstored))
    defaults = _defaults()
    probe = Blueprint("probe", __name__)
    probe.before_request(authenticate)

    @probe.post(UNVALIDATED_PATH)
    def unvalidated() -> Response:
        body = defaults | json.loads(request.get_data())
        commands: JobCommands = app.extensions["inpaint_gateway"].commands
        job = commands.accept(current_client(), body, INPUT_FIELDS).job
        return job_response(job, 202, {"Location": job_location(job.id)})

    app.register_blueprint(probe)
    return app
