"""/v1/uploads: a client's images, to use in jobs as `upload:upl_…` (PRODUCT §10)."""

from __future__ import annotations

import time
from http import HTTPStatus

from flask import Response, current_app, request
from flask.views import MethodView
from flask_smorest import abort

from core.media import MediaStoreError
from core.uploads import (
    CONTENT_TYPES,
    MAX_UPLOAD_BYTES,
    UPLOAD_ID_PATTERN,
    ImageRefused,
    Upload,
    inspect_image,
)
from service.auth import authenticate, current_client
from service.context import ctx
from service.parsing import StrictBlueprint
from service.problems import problem
from service.routes import documenter, refuse_stray_query
from service.schemas import UploadSchema

IMAGE_TYPES = tuple(CONTENT_TYPES.values())
# Room for a multipart body's boundaries and part headers around a 6 MiB image.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
MAX_UPLOAD_BODY_BYTES = MAX_UPLOAD_BYTES + MULTIPART_OVERHEAD_BYTES
MEDIA_RETRY_AFTER_S = "5"

blp = StrictBlueprint(
    "uploads", __name__, url_prefix="/v1", description="Images of the calling client."
)
documented = documenter(blp)


@blp.before_request
def _admit_request() -> None:
    """Every /v1/uploads request: the caller's key first (401), no query; an upload may be
    6 MiB, where every other body stops at the app's 64 KiB."""
    authenticate()
    refuse_stray_query()
    if request.method == "POST":
        request.max_content_length = MAX_UPLOAD_BODY_BYTES


UPLOAD_ID_PARAMETER = {
    "in": "path",
    "name": "upload_id",
    "required": True,
    "schema": {"type": "string", "pattern": f"^{UPLOAD_ID_PATTERN.pattern}$"},
    "description": "An upload id as POST /v1/uploads answered it; any other string is a 404.",
}
IMAGE_BYTES = {"type": "string", "format": "binary", "maxLength": MAX_UPLOAD_BYTES}
UPLOAD_REQUEST_BODY = {
    "required": True,
    "description": "A PNG, JPEG or WebP image, at most 6 MiB and 32 megapixels, checked by "
    "decoding it: either the raw bytes with their Content-Type, or multipart/form-data with one "
    "part named `file` (its Content-Type, if an image type, must match the bytes).",
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": IMAGE_BYTES},
                "required": ["file"],
                "additionalProperties": False,
            }
        },
        **{t: {"schema": {**IMAGE_BYTES, "contentMediaType": t}} for t in IMAGE_TYPES},
    },
}
LOCATION_HEADER = {"description": "The upload's path.", "schema": {"type": "string"}}


def refused(status: int, message: str) -> Response:
    """An upload refused: 413, 415, or 422 with the reason under `file`."""
    if status == 413:
        return problem(413, "Request Entity Too Large", message)  # the type every 413 has
    if status == 415:
        return problem(415, "Unsupported Media Type", message)
    return problem(
        422,
        "Unprocessable Entity",
        "The upload is not an image the gateway takes; see errors.",
        errors={"file": [message]},
    )


def _read_raw() -> tuple[bytes, str]:
    """The raw body and its declared type."""
    if request.content_length is not None and request.content_length > MAX_UPLOAD_BYTES:
        raise ImageRefused(413, f"The image is over {MAX_UPLOAD_BYTES // (1024 * 1024)} MiB.")
    data = request.stream.read(MAX_UPLOAD_BYTES + 1)  # one more: a longer chunked body shows
    return data, str(request.mimetype)


def _read_multipart() -> tuple[bytes, str | None]:
    """The one part named `file`, and the image type it declares (None: none, or octet-stream)."""
    if request.content_length is not None and request.content_length > MAX_UPLOAD_BODY_BYTES:
        raise ImageRefused(413, f"The image is over {MAX_UPLOAD_BYTES // (1024 * 1024)} MiB.")
    files, form = request.files, request.form
    stray = sorted((set(files) | set(form)) - {"file"}) + (["file"] if "file" in form else [])
    if stray:
        raise ImageRefused(422, f"Send one part named file and nothing else (got {stray}).")
    parts = files.getlist("file")
    if len(parts) != 1:
        raise ImageRefused(
            422,
            "Send the image as one multipart part named file."
            if not parts
            else f"Send one file, not {len(parts)}.",
        )
    declared = (parts[0].mimetype or "").lower()
    if declared not in (*IMAGE_TYPES, "", "application/octet-stream"):
        raise ImageRefused(415, f"The part's Content-Type {declared} is not PNG, JPEG or WebP.")
    data = parts[0].stream.read(MAX_UPLOAD_BYTES + 1)
    return data, declared if declared in IMAGE_TYPES else None


def _own_upload(upload_id: str) -> Upload:
    upload = ctx().uploads.get(current_client().id, upload_id)
    if upload is None:
        abort(404, message=f"No upload {upload_id!r} for this client.")
    assert upload is not None  # abort raised
    return upload


def media_unavailable(error: Exception) -> Response:
    """The media store is unreachable: 503, nothing recorded, retry later."""
    current_app.logger.warning("media store unavailable", extra={"error": type(error).__name__})
    return problem(
        503,
        "Service Unavailable",
        "The media store is briefly unavailable; retry.",
        headers={"Retry-After": MEDIA_RETRY_AFTER_S},
    )


def upload_response(upload: Upload, status: int) -> Response:
    """The upload resource, with its path."""
    return current_app.response_class(
        current_app.json.dumps(upload.to_resource()),
        status=status,
        headers={"Location": f"{request.script_root}{blp.url_prefix}/uploads/{upload.id}"},
        mimetype="application/json",
    )


@blp.route("/uploads")
class Uploads(MethodView):
    @documented(
        "createUpload",
        HTTPStatus.BAD_REQUEST,
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
        responses={status: {"headers": {"Location": LOCATION_HEADER}} for status in (201, 200)},
    )
    @blp.doc(requestBody=UPLOAD_REQUEST_BODY)
    @blp.response(201, UploadSchema)
    @blp.alt_response(200, schema=UploadSchema, description="The same bytes again: the same upload")
    def post(self) -> Response:
        """Upload an image; the answer is the upload, its `ref` to use in a job.

        The same bytes from the same client are the same upload: 200, kept another
        UPLOAD_RETENTION_S from now.
        """
        encoding = request.headers.get("Content-Encoding")
        if encoding and encoding.lower() != "identity":
            return refused(415, "Send the body uncompressed (no Content-Encoding).")
        try:
            if request.mimetype == "multipart/form-data":
                data, declared = _read_multipart()
            elif request.mimetype in IMAGE_TYPES:
                data, declared = _read_raw()
            else:
                return refused(
                    415,
                    "Send the image as its raw bytes with Content-Type image/png, image/jpeg "
                    "or image/webp, or as multipart/form-data with one part named file.",
                )
            facts = inspect_image(data, declared)
        except ImageRefused as exc:
            return refused(exc.status, str(exc))
        try:
            upload, created = ctx().uploads.save(current_client().id, data, facts, time.time())
        except (MediaStoreError, OSError) as exc:
            return media_unavailable(exc)
        return upload_response(upload, 201 if created else 200)


@blp.route("/uploads/<upload_id>", endpoint="Upload", parameters=[UPLOAD_ID_PARAMETER])
class UploadView(MethodView):
    @documented("getUpload", HTTPStatus.NOT_FOUND)
    @blp.response(200, UploadSchema)
    def get(self, upload_id: str) -> Response:
        """One upload's metadata."""
        return upload_response(_own_upload(upload_id), 200)


@blp.route("/uploads/<upload_id>/content", parameters=[UPLOAD_ID_PARAMETER])
class UploadContent(MethodView):
    @documented(
        "getUploadContent",
        HTTPStatus.NOT_FOUND,
        responses={
            200: {
                "description": "The image's bytes, with their type.",
                "content": {
                    t: {"schema": {"type": "string", "format": "binary"}} for t in IMAGE_TYPES
                },
            }
        },
    )
    def get(self, upload_id: str) -> Response:
        """One upload's bytes."""
        upload = _own_upload(upload_id)
        try:
            data = ctx().uploads.content(upload)
        except (MediaStoreError, OSError) as exc:
            return media_unavailable(exc)
        if data is None:
            abort(404, message=f"The bytes of upload {upload_id!r} are no longer kept.")
        return current_app.response_class(
            data,
            status=200,
            mimetype=upload.content_type,
            headers={
                "ETag": f'"{upload.sha256}"',
                "Cache-Control": "private, max-age=3600",
                "X-Content-Type-Options": "nosniff",
            },
        )
