"""/v1/jobs: views validate, call JobCommands or JobStore, and answer — nothing more."""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Any

from flask import Response, current_app, request
from flask.views import MethodView
from flask_smorest import abort

from core.commands import CommandRefused, PriceUnknown, WebhookUrlRefused
from core.inputs import IMAGE_FIELDS, InputRefused, is_data_uri
from core.jobs import JOB_ID_PATTERN, Job
from core.limits import LimitRefused
from core.media import MediaStoreError
from core.store import IdempotencyMismatch
from service.auth import authenticate, current_client
from service.context import ctx
from service.media import answer_media_links
from service.parsing import StrictBlueprint, StrictJsonParser
from service.problems import limit_refused, problem, rate_limit_headers
from service.routes import documenter, refuse_stray_query
from service.schemas import (
    INPUT_FIELDS,
    DeliveriesSchema,
    JobCreateSchema,
    JobGetQuerySchema,
    JobListQuerySchema,
    JobPageSchema,
    JobSchema,
)
from service.uploads import media_unavailable

# A wait the process had no slot for is answered at once: the caller asks again after this.
NO_WAIT_SLOT_RETRY_AFTER_S = 1
IDEMPOTENCY_KEY_PATTERN = re.compile(r"[\x21-\x7e]{1,255}")
# A job's body may carry its pictures as data URIs (6 MiB each, 8 MiB as base64): room for two.
MAX_JOB_BODY_BYTES = 16 * 1024 * 1024
JOB_BODY_RULE = (
    "The request body is over its limit of 64 KiB; only a job whose image_url or "
    "mask_image_url is a data URI may send up to 16 MiB."
)


def carries_data_uri(body: Any) -> bool:
    """Whether a job's body uses a data URI: only then may it be over the app's 64 KiB."""
    return isinstance(body, dict) and any(is_data_uri(body.get(name)) for name in IMAGE_FIELDS)


class JobsBlueprint(StrictBlueprint):
    """The jobs routes: a body over 64 KiB only with a data URI in it."""

    ARGUMENTS_PARSER = StrictJsonParser(
        # A data URI's value starts so: no JSON writer escapes these ASCII characters.
        carries_data_uri,
        large_body_marker=b'"data:',
        large_body_rule=JOB_BODY_RULE,
    )


blp = JobsBlueprint(
    "jobs", __name__, url_prefix="/v1", description="Inpainting jobs of the calling client."
)


@blp.before_request
def _admit_request() -> None:
    """Every /v1/jobs request: the caller's key first (401); then no query on a route that
    takes none. A new job's body may be 16 MiB; the parser holds one without a data URI to
    64 KiB once it is read (only the parsed body tells)."""
    authenticate()
    if not (request.method == "GET" and request.endpoint in ("jobs.Jobs", "jobs.Job")):
        refuse_stray_query()
    if request.method == "POST" and request.endpoint == "jobs.Jobs":
        request.max_content_length = MAX_JOB_BODY_BYTES


IDEMPOTENCY_KEY_PARAMETER = {
    "in": "header",
    "name": "Idempotency-Key",
    "required": False,
    "schema": {
        "type": "string",
        "minLength": 1,
        "maxLength": 255,
        "pattern": f"^{IDEMPOTENCY_KEY_PATTERN.pattern}$",
    },
    "description": "1-255 printable ASCII characters, no space (else a 400). Same key and body "
    "within 24 h: the first job (200); another body: 409.",
}
JOB_ID_PARAMETER = {
    "in": "path",
    "name": "job_id",
    "required": True,
    "schema": {"type": "string", "pattern": f"^{JOB_ID_PATTERN.pattern}$"},
    "description": "A job id as POST /v1/jobs answered it; any other string is a 404.",
}
JOB_EXAMPLE = {
    "prompt": "a red sky at dusk",
    "image_url": "https://images.example.com/street.png",
    "mask_image_url": "https://images.example.com/street-sky-mask.png",
    "num_inference_steps": 20,
    "output_format": "webp",
    "metadata": {"order": "7"},
}
LOCATION_HEADER = {"description": "The job's path.", "schema": {"type": "string"}}
# From the accepted job to what can be done with it: `$response.body#/id` is its id.
JOB_LINKS = {
    name: {"operationId": operation, "parameters": {"job_id": "$response.body#/id"}}
    for name, operation in (
        ("GetJob", "getJob"),
        ("CancelJob", "cancelJob"),
        ("GetDeliveries", "getJobDeliveries"),
        ("RedeliverWebhook", "redeliverJobWebhook"),
    )
}


documented = documenter(blp)


def job_response(job: Job, status: int, headers: dict[str, str] | None = None) -> Response:
    """The job resource as it is: Job.to_resource() is its one source, JobSchema documents it.

    A Response passes flask-smorest's response decorator untouched — no schema dump, which
    would only copy the same dict again on the hottest route (a test holds the two equal).
    """
    return current_app.response_class(
        current_app.json.dumps(job.to_resource(answer_media_links())),
        status=status,
        headers=headers,
        mimetype="application/json",
    )


def job_location(job_id: str) -> str:
    """The job's path, as url_for("jobs.Job", job_id=…) builds it (a test holds the two equal).

    Not url_for itself: it builds a URL adapter on every call: ~3% of a POST's instructions.
    """
    return f"{request.script_root}{blp.url_prefix}/jobs/{job_id}"


def _own_job(job_id: str) -> Job:
    # Not a job id, no job: a path must never name a Redis key of another kind ("job_…:events").
    job = (
        ctx().store.get_for_client(current_client().id, job_id)
        if JOB_ID_PATTERN.fullmatch(job_id)
        else None
    )
    if job is None:
        abort(404, message=f"No job {job_id!r} for this client.")
    assert job is not None  # abort raised
    return job


@blp.route("/jobs")
class Jobs(MethodView):
    @documented(
        "createJob",
        HTTPStatus.BAD_REQUEST,
        HTTPStatus.CONFLICT,
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
        HTTPStatus.PAYMENT_REQUIRED,
        HTTPStatus.TOO_MANY_REQUESTS,
        parameters=[IDEMPOTENCY_KEY_PARAMETER],
        responses={  # int keys: flask-smorest's own (alt_response's 200) are ints, and merge
            status: {"links": JOB_LINKS, "headers": {"Location": LOCATION_HEADER}}
            for status in (202, 200)
        },
    )
    @blp.arguments(JobCreateSchema(), example=JOB_EXAMPLE)  # an instance: built once
    @blp.response(202, JobSchema)
    @blp.alt_response(200, schema=JobSchema, description="Idempotency-Key replay: the first job")
    def post(self, body: dict[str, Any]) -> Response:
        """Accept an inpainting job; the answer is the queued job.

        With `Idempotency-Key`, the same key and body within 24 h answer the first job (200);
        the same key with another body is a 409.
        """
        key = request.headers.get("Idempotency-Key")
        if key is not None and not IDEMPOTENCY_KEY_PATTERN.fullmatch(key):
            abort(400, message="Idempotency-Key must be 1-255 printable ASCII characters.")
        client = current_client()
        try:
            accepted = ctx().commands.accept(client, body, INPUT_FIELDS, key)
        except WebhookUrlRefused as exc:
            abort(422, errors={"json": {"webhook_url": [str(exc)]}})
        except InputRefused as exc:
            abort(422, errors={"json": {name: [why] for name, why in exc.errors.items()}})
        except (MediaStoreError, OSError) as exc:
            return media_unavailable(exc)
        except (IdempotencyMismatch, CommandRefused) as exc:
            abort(409, message=str(exc))
        except LimitRefused as exc:
            return limit_refused(exc.refusal)
        except PriceUnknown as exc:
            return problem(503, "Service Unavailable", str(exc), headers={"Retry-After": "5"})
        job = accepted.job
        headers = {"Location": job_location(job.id)}
        per_min = client.limits.rate_per_min
        if per_min and accepted.rate_remaining is not None:
            headers |= rate_limit_headers(per_min, accepted.rate_remaining, accepted.rate_reset_s)
        return job_response(job, 202 if accepted.is_new else 200, headers)

    @documented("listJobs")
    @blp.arguments(JobListQuerySchema(), location="query")
    @blp.response(200, JobPageSchema)
    def get(self, query: dict[str, Any]) -> dict[str, Any]:
        """The client's jobs, newest first; pass next_cursor back as cursor for more."""
        cursor = query.get("cursor")
        jobs, next_cursor = ctx().store.list_for_client(
            current_client().id,
            status=query.get("status"),
            limit=query["limit"],
            cursor=cursor,
        )
        links = answer_media_links()
        return {
            "jobs": [j.to_resource(links) for j in jobs],
            "next_cursor": next_cursor,
        }


@blp.route("/jobs/<job_id>", endpoint="Job", parameters=[JOB_ID_PARAMETER])
class JobView(MethodView):
    @documented("getJob", HTTPStatus.NOT_FOUND)
    @blp.arguments(JobGetQuerySchema(), location="query")
    @blp.response(200, JobSchema)
    def get(self, query: dict[str, Any], job_id: str) -> Response:
        """One job; with `wait`, once it is final (or after `wait` seconds as it stands)."""
        job = _own_job(job_id)
        wait_s = query.get("wait")
        if wait_s is None or job.status.is_final:
            return job_response(job, 200)
        client_id = current_client().id
        waited, held = ctx().waits.wait_for_end(
            job.id, lambda: ctx().store.get_for_client(client_id, job_id), wait_s
        )
        if waited is None:  # removed meanwhile (retention)
            abort(404, message=f"No job {job_id!r} for this client.")
        assert waited is not None  # abort raised
        headers = None if held else {"Retry-After": str(NO_WAIT_SLOT_RETRY_AFTER_S)}
        return job_response(waited, 200, headers)


@blp.route("/jobs/<job_id>/cancel", parameters=[JOB_ID_PARAMETER])
class JobCancel(MethodView):
    @documented("cancelJob", HTTPStatus.NOT_FOUND, HTTPStatus.CONFLICT)
    @blp.response(202, JobSchema)
    def post(self, job_id: str) -> Response:
        """Cancel: at once if RunComfy does not have it yet, else asked of RunComfy."""
        try:
            job = ctx().commands.cancel(_own_job(job_id))
        except CommandRefused as exc:
            abort(409, message=str(exc))
        return job_response(job, 202)


@blp.route("/jobs/<job_id>/deliveries", parameters=[JOB_ID_PARAMETER])
class JobDeliveries(MethodView):
    @documented("getJobDeliveries", HTTPStatus.NOT_FOUND)
    @blp.response(200, DeliveriesSchema)
    def get(self, job_id: str) -> dict[str, Any]:
        """Every webhook delivery attempt for the job, oldest first."""
        job = _own_job(job_id)
        return {"deliveries": ctx().store.outbox.deliveries(job.id)}


@blp.route("/jobs/<job_id>/webhook/redeliver", parameters=[JOB_ID_PARAMETER])
class JobRedeliver(MethodView):
    @documented("redeliverJobWebhook", HTTPStatus.NOT_FOUND, HTTPStatus.CONFLICT)
    @blp.response(202, JobSchema)
    def post(self, job_id: str) -> Response:
        """Send the job's final event again (same webhook-id)."""
        job = _own_job(job_id)
        try:
            ctx().commands.redeliver(job)
        except CommandRefused as exc:
            abort(409, message=str(exc))
        return job_response(job, 202)
