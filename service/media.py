"""/v1/media/{id}: a job's stored output, by signed URL (no key) or the owner's bearer key.

A job resource names its stored outputs as `/v1/media/{id}?exp=…&sig=…` (core/media_urls.py),
signed afresh on every read, so they open in a browser or another service without a key until
`exp`. The same path without a query answers the owner's key alone (another client's: 404, as
for every resource). A signature that is wrong, tampered with or expired is a 403: the URL itself
is refused, whatever it names — a 404 there would tell a guesser which ids exist.
"""

from __future__ import annotations

import time
from http import HTTPStatus

from flask import Response, current_app, request
from flask.views import MethodView
from flask_smorest import abort

from core.media import MediaStoreError
from core.media_urls import MediaLinks, media_links, owner_of, signature_holds, signing_key
from core.uploads import CONTENT_TYPES, UPLOAD_ID_PATTERN, Upload
from service.auth import authenticate, current_client
from service.context import ctx
from service.parsing import StrictBlueprint
from service.problems import problem
from service.routes import refuse_stray_query
from service.uploads import media_unavailable

SIGNED_QUERY = ("exp", "sig")
SIGNATURE_PATTERN = "[A-Za-z0-9_-]{43}"  # 32 bytes of HMAC-SHA256, base64url without padding
# A signed URL may be cached by what fetched it, though never past its own expiry.
MAX_CACHE_S = 3600

blp = StrictBlueprint(
    "media",
    __name__,
    url_prefix="/v1",
    description="Stored job outputs: by signed URL without a key, or by the owner's key.",
)


def answer_media_links() -> MediaLinks:
    """How an API answer signs media URLs now: on PUBLIC_BASE_URL, else this request's root."""
    settings = ctx().settings
    base = settings.public_base_url or request.url_root
    return media_links(signing_key(ctx().redis), base, time.time(), settings.media_url_ttl_s)


def _is_signed() -> bool:
    return any(name in request.args for name in SIGNED_QUERY)


@blp.before_request
def _admit_request() -> None:
    """A signed URL needs no key (its signature is checked by the view); without its query
    the caller's key (401). Nothing else in the query."""
    if _is_signed():
        stray = sorted(set(request.args) - set(SIGNED_QUERY))
        if stray:
            abort(422, errors={"query": {name: ["Unknown field."] for name in stray}})
        return
    authenticate()
    refuse_stray_query()


MEDIA_ID_PARAMETER = {
    "in": "path",
    "name": "media_id",
    "required": True,
    "schema": {"type": "string", "pattern": f"^{UPLOAD_ID_PATTERN.pattern}$"},
    "description": "A media id, as a job's output.media[].id names it; any other string is a 404.",
}
SIGNED_PARAMETERS = [
    {
        "in": "query",
        "name": "exp",
        "required": False,
        "schema": {"type": "string", "pattern": "^[0-9]{1,12}$"},
        "description": "When the signed URL expires (epoch seconds). With `sig`, no key is "
        "needed; the pair as the job's output.images gave it.",
    },
    {
        "in": "query",
        "name": "sig",
        "required": False,
        "schema": {"type": "string", "pattern": f"^{SIGNATURE_PATTERN}$"},
        "description": "The URL's signature (HMAC-SHA256, base64url). Wrong, tampered with or "
        "expired: 403.",
    },
]
IMAGE_TYPES = tuple(CONTENT_TYPES.values())


def _signed_owner(media_id: str) -> str | Response:
    """The owner of `media_id` if the query's signature holds; else the 403 to answer."""
    exp, sig = request.args.get("exp", ""), request.args.get("sig", "")
    key = signing_key(ctx().redis)
    if not signature_holds(key, media_id, exp, sig, time.time()):
        return problem(
            403,
            "Forbidden",
            "The URL's signature is not valid or has expired; read the job again for a fresh "
            "URL, or send your API key without the query.",
        )
    owner = owner_of(ctx().redis, media_id) if UPLOAD_ID_PATTERN.fullmatch(media_id) else None
    if owner is None:
        abort(404, message=f"No media {media_id!r}, or it is no longer kept.")
    assert owner is not None  # abort raised
    return owner


@blp.route("/media/<media_id>", endpoint="Media", parameters=[MEDIA_ID_PARAMETER])
class MediaView(MethodView):
    @blp.doc(
        operationId="getMedia",
        security=[{}, {"bearer": []}],
        parameters=SIGNED_PARAMETERS,
        responses={
            200: {
                "description": "The image's bytes, with their type.",
                "content": {
                    t: {"schema": {"type": "string", "format": "binary"}} for t in IMAGE_TYPES
                },
            }
        },
    )
    @blp.alt_response(HTTPStatus.UNAUTHORIZED.value, response=HTTPStatus.UNAUTHORIZED.name)
    @blp.alt_response(HTTPStatus.FORBIDDEN.value, response=HTTPStatus.FORBIDDEN.name)
    @blp.alt_response(HTTPStatus.NOT_FOUND.value, response=HTTPStatus.NOT_FOUND.name)
    @blp.alt_response(
        HTTPStatus.UNPROCESSABLE_ENTITY.value, response=HTTPStatus.UNPROCESSABLE_ENTITY.name
    )
    @blp.alt_response(
        HTTPStatus.SERVICE_UNAVAILABLE.value, response=HTTPStatus.SERVICE_UNAVAILABLE.name
    )
    def get(self, media_id: str) -> Response:
        """A stored output's bytes: by signed URL without a key, or by the owner's key."""
        signed = _is_signed()
        if signed:
            owner = _signed_owner(media_id)
            if isinstance(owner, Response):
                return owner
        else:
            owner = current_client().id
        upload = ctx().uploads.get(owner, media_id)
        if upload is None:
            abort(404, message=f"No media {media_id!r} for this client.")
        assert upload is not None  # abort raised
        return _bytes_of(upload, signed)


def _bytes_of(upload: Upload, signed: bool) -> Response:
    try:
        data = ctx().uploads.content(upload)
    except (MediaStoreError, OSError) as exc:
        return media_unavailable(exc)
    if data is None:
        abort(404, message=f"The bytes of media {upload.id!r} are no longer kept.")
    max_age_s = MAX_CACHE_S
    if signed:
        max_age_s = max(0, min(MAX_CACHE_S, int(request.args["exp"]) - int(time.time())))
    return current_app.response_class(
        data,
        status=200,
        mimetype=upload.content_type,
        headers={
            "ETag": f'"{upload.sha256}"',
            "Cache-Control": f"private, max-age={max_age_s}",
            "X-Content-Type-Options": "nosniff",
        },
    )
