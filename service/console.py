"""/console: the web pages a team uses with its API key — jobs, one job, usage (PRODUCT §11).

Server-rendered (Jinja2) and without JavaScript: every action is a form, CSRF-checked. The
session (service/console_session.py) holds the client id and its key's hash; every request checks
that hash still opens a live client, so a revoked or rotated-out key signs the browser out.
Pictures the gateway keeps (uploads, stored outputs) are served here to the signed-in owner; a
URL input is shown as a link, never loaded by the console (the CSP allows images from the app
alone: a third-party URL would learn who looks at the job, and when).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from flask import (
    Blueprint,
    Flask,
    Response,
    current_app,
    flash,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_wtf.csrf import CSRFError, CSRFProtect
from werkzeug.exceptions import HTTPException, NotFound
from werkzeug.wrappers.response import Response as BaseResponse

from core.clients import Client, hash_api_key
from core.commands import CommandRefused
from core.jobs import JOB_ID_PATTERN, Job, Status, iso
from core.keys import PREFIX
from core.media import MediaStoreError
from core.shared_secrets import shared_secret
from core.uploads import UPLOAD_ID_PATTERN
from core.usage import UsageBook, usage_span
from service.console_session import CONSOLE_PATH, ConsoleSessionInterface
from service.context import ctx

CSRF_SECRET_KEY = PREFIX + "console:csrf-key"
JOBS_PER_PAGE = 20
MAX_JOBS_PER_PAGE = 100
PROMPT_EXCERPT_CHARS = 80
UPLOAD_REF_PREFIX = "upload:"
PICTURE_FIELDS = ("image_url", "mask_image_url")
# Images from the app alone, styles from its own stylesheet, no script at all, forms only to it.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
PICTURE_MAX_AGE_S = 300
OPEN_ENDPOINTS = frozenset({"console.sign_in", "console.static"})

bp = Blueprint(
    "console",
    __name__,
    url_prefix=CONSOLE_PATH,
    template_folder="templates",
    static_folder="static/console",
    static_url_path="/static",
)
csrf = CSRFProtect()


def init_console(app: Flask) -> None:
    """Sessions for /console, CSRF checked by the console's own views, and its blueprint."""
    ctx_redis = app.extensions["inpaint_gateway"].redis
    app.session_interface = ConsoleSessionInterface(ctx_redis)
    # Checked where the console asks (below): the API's routes take bearer keys, not forms.
    app.config.setdefault("WTF_CSRF_CHECK_DEFAULT", False)
    # A token holds as long as its session: a page left open an hour still posts.
    app.config.setdefault("WTF_CSRF_TIME_LIMIT", None)
    csrf.init_app(app)
    app.register_blueprint(bp)


# --- what the pages show, as plain functions ------------------------------------------------


@dataclass(frozen=True)
class Picture:
    """One picture of a job: served by the console (`upload_id`) or only linked (`url`)."""

    label: str
    upload_id: str | None = None
    url: str | None = None


def input_picture(label: str, value: Any) -> Picture | None:
    """An input image: an upload ref is ours to serve; anything else is a link."""
    if not isinstance(value, str) or not value:
        return None
    if value.startswith(UPLOAD_REF_PREFIX):
        upload_id = value.removeprefix(UPLOAD_REF_PREFIX)
        if UPLOAD_ID_PATTERN.fullmatch(upload_id):
            return Picture(label, upload_id=upload_id)
    return Picture(label, url=value)


def output_pictures(job: Job) -> list[Picture]:
    """The output: our stored copies, else RunComfy's URLs as links."""
    if job.output_media is not None:
        return [Picture(f"Output {n}", upload_id=m.id) for n, m in enumerate(job.output_media, 1)]
    return [Picture(f"Output {n}", url=u) for n, u in enumerate(job.output_images or (), 1)]


def parameters(job: Job) -> list[tuple[str, Any]]:
    """The job's inputs other than its pictures, in the order they were sent."""
    return [(name, value) for name, value in job.input.items() if name not in PICTURE_FIELDS]


def timeline(job: Job) -> list[tuple[str, str]]:
    """(what, when as ISO-8601) for each step the job is known to have reached: created,
    submitted (RunComfy took it), running (seen running: a short run may end unseen), its end."""
    steps: list[tuple[str, float | None]] = [
        ("created", job.created_at),
        ("submitted", job.submitted_at),
        ("running", job.running_since),
        (job.status.value if job.status.is_final else "finished", job.finished_at),
    ]
    return [(what, iso(when) or "") for what, when in steps if when is not None]


def page_size(asked: str | None) -> int:
    """Rows per page: as the query asks, within 1..MAX_JOBS_PER_PAGE; else JOBS_PER_PAGE."""
    if asked is None or not asked.isdigit():
        return JOBS_PER_PAGE
    return max(1, min(MAX_JOBS_PER_PAGE, int(asked)))


def prompt_excerpt(job: Job) -> str:
    """The prompt's start, for a row of the list."""
    prompt = str(job.input.get("prompt") or "")
    if len(prompt) <= PROMPT_EXCERPT_CHARS:
        return prompt
    return prompt[: PROMPT_EXCERPT_CHARS - 1].rstrip() + "…"


@dataclass(frozen=True)
class Bar:
    """One day of the spend chart, in the SVG's units."""

    day: str
    usd: float
    x: float
    y: float
    width: float
    height: float


CHART_WIDTH = 720
CHART_HEIGHT = 200


def spend_bars(days: list[dict[str, Any]]) -> list[Bar]:
    """A bar per day, heights relative to the day that spent most (all flat when none did)."""
    if not days:
        return []
    most = max(float(d["cost_usd"]) for d in days) or 1.0
    slot = CHART_WIDTH / len(days)
    bars = []
    for n, day in enumerate(days):
        usd = float(day["cost_usd"])
        height = round(CHART_HEIGHT * usd / most, 2)
        bars.append(
            Bar(
                day=day["date"],
                usd=usd,
                x=round(n * slot + slot * 0.1, 2),
                y=round(CHART_HEIGHT - height, 2),
                width=round(slot * 0.8, 2),
                height=height,
            )
        )
    return bars


# --- requests -----------------------------------------------------------------------------


def signed_in_client() -> Client | None:
    """The session's client if its key still works (not revoked, not rotated out)."""
    key_hash = session.get("key_hash")
    if not key_hash:
        return None
    client = ctx().clients.authenticate_hash(key_hash)
    if client is None or client.id != session.get("client_id"):
        return None
    return client


@bp.before_request
def _admit_request() -> BaseResponse | None:
    """Forms carry their CSRF token (else 400, nothing done); pages need a live session."""
    current_app.config.setdefault(
        "WTF_CSRF_SECRET_KEY", shared_secret(ctx().redis, CSRF_SECRET_KEY)
    )
    if request.endpoint == "console.static":
        return None
    if request.method == "POST":
        csrf.protect()
    if request.endpoint in OPEN_ENDPOINTS:
        return None
    client = signed_in_client()
    if client is None:
        had_session = bool(session.get("key_hash"))
        session.clear()
        session.renew_id = True  # type: ignore[attr-defined]  # a ConsoleSession
        if had_session:
            flash("You were signed out: the API key no longer works.")
        return redirect(url_for("console.sign_in"))
    g.client = client
    return None


@bp.after_request
def _protect_page(response: Response) -> Response:
    """A strict CSP, and pages that show a team's jobs are not kept by caches."""
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers.setdefault("Cache-Control", "no-store")
    return response


@bp.errorhandler(CSRFError)
def _csrf_refused(error: CSRFError) -> tuple[str, int]:
    return render_template(
        "console/error.html", title="Form refused", message=error.description
    ), 400


@bp.errorhandler(HTTPException)
def _http_error(error: HTTPException) -> tuple[str, int]:
    return render_template(
        "console/error.html", title=error.name, message=error.description
    ), error.code or 500


def client() -> Client:
    """The signed-in client of this request."""
    signed_in: Client = g.client
    return signed_in


def own_job(job_id: str) -> Job:
    """The signed-in client's job, or 404 (another client's job is not told apart)."""
    job = (
        ctx().store.get_for_client(client().id, job_id)
        if JOB_ID_PATTERN.fullmatch(job_id)
        else None
    )
    if job is None:
        raise NotFound(f"No job {job_id!r} for this client.")
    return job


@bp.get("/")
def home() -> BaseResponse:
    return redirect(url_for("console.jobs"))


@bp.route("/sign-in", methods=["GET", "POST"])
def sign_in() -> BaseResponse | tuple[str, int] | str:
    """The API key, checked, becomes a session holding its hash."""
    if request.method == "GET":
        return render_template("console/sign_in.html")
    api_key = request.form.get("api_key", "").strip()
    found = ctx().recent_keys.authenticate(ctx().clients, api_key) if api_key else None
    if found is None:
        return render_template(
            "console/sign_in.html", refused="That API key is not valid (unknown or revoked)."
        ), 401
    session.clear()
    session.renew_id = True  # type: ignore[attr-defined]  # a ConsoleSession: no fixation
    session["client_id"] = found.id
    session["key_hash"] = hash_api_key(api_key)
    return redirect(url_for("console.jobs"))


@bp.post("/sign-out")
def sign_out() -> BaseResponse:
    session.clear()
    return redirect(url_for("console.sign_in"))


@bp.get("/jobs")
def jobs() -> str:
    """The client's jobs, newest first, of one status or all, a page at a time."""
    status = request.args.get("status") or None
    if status is not None and status not in {s.value for s in Status}:
        status = None
    cursor = request.args.get("cursor") or None
    limit = page_size(request.args.get("limit"))
    try:
        page, next_cursor = ctx().store.list_for_client(
            client().id, status=status, limit=limit, cursor=cursor
        )
    except ValueError:  # a cursor this console did not give
        flash("That page position is not one this console gave; showing the newest jobs.")
        page, next_cursor = ctx().store.list_for_client(
            client().id, status=status, limit=limit, cursor=None
        )
    return render_template(
        "console/jobs.html",
        jobs=page,
        next_cursor=next_cursor,
        status=status,
        limit=None if limit == JOBS_PER_PAGE else limit,
        statuses=[s.value for s in Status],
        excerpt=prompt_excerpt,
        iso=iso,
    )


@bp.get("/jobs/<job_id>")
def job(job_id: str) -> str:
    """One job: its pictures, parameters, timeline, deliveries; cancel and redeliver."""
    found = own_job(job_id)
    pictures = [
        p
        for p in (
            input_picture("Input", found.input.get("image_url")),
            input_picture("Mask", found.input.get("mask_image_url")),
        )
        if p is not None
    ]
    return render_template(
        "console/job.html",
        job=found,
        image=pictures[0] if pictures else None,
        mask=pictures[1] if len(pictures) > 1 else None,
        outputs=output_pictures(found),
        parameters=parameters(found),
        timeline=timeline(found),
        deliveries=ctx().store.outbox.deliveries(found.id),
        iso=iso,
    )


@bp.post("/jobs/<job_id>/cancel")
def cancel(job_id: str) -> BaseResponse:
    try:
        ctx().commands.cancel(own_job(job_id))
        flash("Cancel requested.")
    except CommandRefused as exc:
        flash(f"Not cancelled: {exc}.")
    return redirect(url_for("console.job", job_id=job_id))


@bp.post("/jobs/<job_id>/redeliver")
def redeliver(job_id: str) -> BaseResponse:
    try:
        ctx().commands.redeliver(own_job(job_id))
        flash("The final event is on its way again.")
    except CommandRefused as exc:
        flash(f"Not redelivered: {exc}.")
    return redirect(url_for("console.job", job_id=job_id))


@bp.get("/pictures/<upload_id>")
def picture(upload_id: str) -> Response:
    """A picture the gateway keeps (an upload or a stored output) of the signed-in client."""
    upload = (
        ctx().uploads.get(client().id, upload_id)
        if UPLOAD_ID_PATTERN.fullmatch(upload_id)
        else None
    )
    if upload is None:
        raise NotFound(f"No picture {upload_id!r} for this client.")
    try:
        data = ctx().uploads.content(upload)
    except (MediaStoreError, OSError) as exc:
        current_app.logger.warning("console picture unavailable: %s", exc)
        data = None
    if data is None:
        raise NotFound(f"The bytes of picture {upload_id!r} are not available.")
    return current_app.response_class(
        data,
        mimetype=upload.content_type,
        headers={
            "Cache-Control": f"private, max-age={PICTURE_MAX_AGE_S}",
            "ETag": f'"{upload.sha256}"',
        },
    )


@bp.get("/usage")
def usage() -> str:
    """This month's spend per day as a chart, the totals, the limits and the budget."""
    now = time.time()
    first, last = usage_span(None, None, now)
    book = UsageBook(ctx().redis)
    used = book.usage(client().id, first, last)
    return render_template(
        "console/usage.html",
        first=first,
        last=last,
        days=used["days"],
        total=used["total"],
        bars=spend_bars(used["days"]),
        chart_width=CHART_WIDTH,
        chart_height=CHART_HEIGHT,
        limits=client().limits.to_dict(),
        budget=book.budget(client().id, client().limits, now),
    )
