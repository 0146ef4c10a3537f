"""/docs without the internet: Swagger UI's assets served by the app, at the version pinned in
pyproject.toml (the `flask-swagger-ui` distribution ships swagger-ui-dist's files)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from flask import Blueprint, Response, abort, send_from_directory

# Only the package's files are used (its blueprint is not): they are what /docs loads.
SWAGGER_UI_DIST = Path(str(files("flask_swagger_ui") / "dist"))
SWAGGER_UI_VERSION = (SWAGGER_UI_DIST / "VERSION").read_text().strip()
# The version in the path: a new release is a new URL, so a browser may keep these for long.
SWAGGER_UI_ASSETS_PATH = f"/docs/assets/{SWAGGER_UI_VERSION}/"
ASSET_MAX_AGE_S = 7 * 24 * 3600
SWAGGER_UI_ASSETS = frozenset(
    ("swagger-ui.css", "swagger-ui-bundle.js", "swagger-ui-standalone-preset.js")
)

bp = Blueprint("docs_assets", __name__)


@bp.get(SWAGGER_UI_ASSETS_PATH + "<name>")
def swagger_ui_asset(name: str) -> Response:
    """One of the files /docs loads (and no other file of the package)."""
    if name not in SWAGGER_UI_ASSETS:
        abort(404)
    return send_from_directory(SWAGGER_UI_DIST, name, max_age=ASSET_MAX_AGE_S)
