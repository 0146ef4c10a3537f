"""The Flask app factory of the emulator."""

from __future__ import annotations

import logging

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from emulator.api import upstream_api
from emulator.config import EmulatorConfig
from emulator.control import control_api
from emulator.faults import FaultControl
from emulator.images import make_sample_image, make_sample_mask
from emulator.media import media
from emulator.outputs import HeldInputs, InputFetcher, OutputRenderer, OutputStore
from emulator.payloads import error_response
from emulator.requests_state import RequestRegistry
from emulator.state import EXTENSION_KEY, EmulatorState
from emulator.stats import CallStats

# Every route but the submit, which reads up to the Model API's own limit (data_uris.py).
MAX_BODY_BYTES = 1024 * 1024
ACCESS_LOG = logging.getLogger("emulator.access")


def create_app(config: EmulatorConfig | None = None) -> Flask:
    """Build an emulator app with its own in-memory state."""
    emulator_config = config or EmulatorConfig()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    outputs = OutputStore()
    held_inputs = HeldInputs()
    app.extensions[EXTENSION_KEY] = EmulatorState(
        config=emulator_config,
        faults=FaultControl(emulator_config.faults),
        registry=RequestRegistry(),
        stats=CallStats(),
        outputs=outputs,
        held_inputs=held_inputs,
        renderer=OutputRenderer(InputFetcher(), held_inputs, outputs),
        sample_image_png=make_sample_image(),
        sample_mask_png=make_sample_mask(),
    )
    app.register_blueprint(upstream_api)
    app.register_blueprint(control_api)
    app.register_blueprint(media)
    app.register_error_handler(HTTPException, _http_error_as_json)
    app.after_request(_log_request)
    return app


def _log_request(response: Response) -> Response:
    ACCESS_LOG.info(
        '%s "%s %s" %s',
        request.remote_addr,
        request.method,
        request.full_path.rstrip("?"),
        response.status_code,
    )
    return response


def _http_error_as_json(exc: HTTPException) -> Response:
    code = exc.code or 500
    return error_response(code, code * 1000, exc.description or exc.name)
