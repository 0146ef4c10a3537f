"""Control endpoints under /_emulator/ for tests and benchmarks (no auth)."""

from __future__ import annotations

import time

from flask import Blueprint, Response, jsonify, request

from emulator.faults import FaultKnobError
from emulator.payloads import error_response
from emulator.state import current_state

control_api = Blueprint("control_api", __name__, url_prefix="/_emulator")


@control_api.get("/health")
def health() -> Response:
    """Answer 200 once the emulator is serving."""
    return jsonify({"ok": True})


@control_api.get("/faults")
def show_faults() -> Response:
    """Return the knobs in force."""
    return jsonify(current_state().faults.current().as_json())


@control_api.post("/faults")
def update_faults() -> Response:
    """Merge a JSON object of knobs into the current ones; an unknown knob is a 400."""
    changes = request.get_json(silent=True)
    if not isinstance(changes, dict):
        return error_response(400, 400000, "body must be a JSON object of fault knobs")
    try:
        updated = current_state().faults.update(changes)
    except FaultKnobError as exc:
        return error_response(400, 400000, str(exc))
    return jsonify(updated.as_json())


@control_api.post("/reset")
def reset() -> Response:
    """Restore the startup knobs and clear the stats (requests are kept)."""
    state = current_state()
    restored = state.faults.reset()
    state.stats.reset()
    return jsonify(restored.as_json())


@control_api.get("/stats")
def stats() -> Response:
    """Return call and response counts, created requests, and live requests by state."""
    state = current_state()
    snapshot = state.stats.snapshot()
    snapshot["requests"] = state.registry.count_by_state(state.faults.current().request_ttl_s)
    return jsonify(snapshot)


@control_api.get("/requests/<request_id>")
def show_request(request_id: str) -> Response:
    """What the emulator received for one request: its prompt and, per image field, the URL or
    the data URI's type, size and SHA-256 (so a test can prove which bytes arrived)."""
    state = current_state()
    found = state.registry.find(request_id, state.faults.current().request_ttl_s)
    if found is None:
        return error_response(404, 404001, "request not found or expired")
    return jsonify(
        {
            "request_id": found.request_id,
            "status": found.result_status(found.phase(time.monotonic())),
            "prompt": found.plan.model_input["prompt"],
            "inputs": found.plan.inputs_received,
        }
    )
