"""Unauthenticated image routes: rendered outputs and the offline sample inputs."""

from __future__ import annotations

from flask import Blueprint, Response

from emulator.payloads import error_response
from emulator.state import current_state

media = Blueprint("media", __name__)


@media.get("/outputs/<name>")
def output_image(name: str) -> Response:
    """Serve a rendered output image until the `output_ttl_s` knob says it is deleted."""
    state = current_state()
    stored = state.outputs.get(name, state.faults.current().output_ttl_s)
    if stored is None:
        return error_response(404, 404002, "output not found or expired")
    return Response(stored.body, content_type=stored.content_type)


@media.get("/outputs/gone/<name>")
def gone_output_image(name: str) -> Response:
    """An output named by `[emulator:output-gone]`: deleted before anyone fetched it."""
    return error_response(404, 404002, "output not found or expired")


@media.get("/samples/image.png")
def sample_image() -> Response:
    """Serve the built-in sample input picture."""
    return Response(current_state().sample_image_png, content_type="image/png")


@media.get("/samples/mask.png")
def sample_mask() -> Response:
    """Serve the built-in sample mask (white = repaint)."""
    return Response(current_state().sample_mask_png, content_type="image/png")
