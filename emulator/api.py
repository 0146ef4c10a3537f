"""The emulated RunComfy Model API: submit, status, result, cancel under /v1."""

from __future__ import annotations

import hmac
import json
import time
from typing import Any

from flask import Blueprint, Response, jsonify, request
from werkzeug.exceptions import RequestEntityTooLarge

from emulator.data_uris import MAX_REQUEST_BYTES, DecodedImage
from emulator.directives import DirectiveError, Directives, parse_directives
from emulator.faults import Faults
from emulator.input_schema import IMAGE_FIELDS, MODEL_ID, read_image_inputs, validate_model_input
from emulator.outputs import InputFetchError
from emulator.payloads import error_response, request_urls, result_body, status_body
from emulator.requests_state import EmulatedRequest, Failure, Phase, RequestPlan
from emulator.state import EmulatorState, current_state

SERVER_ERROR_STATUSES = (500, 502, 503)
PLANNED_FAILURE_MESSAGE = "emulated failure: the model raised an error during sampling"

upstream_api = Blueprint("upstream_api", __name__, url_prefix="/v1")

_CALL_KIND_BY_ENDPOINT = {
    "upstream_api.submit": "submit",
    "upstream_api.status": "status",
    "upstream_api.result": "result",
    "upstream_api.cancel": "cancel",
    "upstream_api.model_price": "price",
}
PRICING_NOTE = "emulated list price: per output image (set with the base_price_usd knob)"


@upstream_api.before_request
def count_and_authenticate() -> Response | None:
    """Count the call, then refuse it unless the bearer token is accepted."""
    state = current_state()
    kind = _CALL_KIND_BY_ENDPOINT.get(request.endpoint or "")
    if kind is not None:
        state.stats.record_call(kind)
    if not _token_accepted(state.config.token, request.headers.get("Authorization", "")):
        return _token_refused()
    if state.faults.current().account == "token_refused":  # revoked, or the account inactive
        return _token_refused()
    return None


@upstream_api.after_request
def count_response(response: Response) -> Response:
    """Count every /v1 answer by HTTP status; maybe send its body a byte at a time."""
    state = current_state()
    state.stats.record_response(response.status_code)
    knobs = state.faults.current()
    if state.faults.roll(knobs.rate_trickle):
        return _trickled(response, knobs.trickle_s)
    return response


def _trickled(response: Response, over_s: float) -> Response:
    """The same answer, its body sent a byte at a time over `over_s` after the headers: each
    byte well within any read timeout, the whole far past it."""
    body = response.get_data()
    pause_s = over_s / max(len(body), 1)

    def bytes_slowly() -> Any:
        for byte in body:
            yield bytes([byte])
            time.sleep(pause_s)

    trickled = Response(bytes_slowly(), status=response.status_code, headers=response.headers)
    trickled.headers["Content-Length"] = str(len(body))
    return trickled


@upstream_api.post("/models/<path:model_id>")
def submit(model_id: str) -> Response:
    """Validate the input and queue a request."""
    state = current_state()
    refused = _refused_before_the_model(state, model_id)
    if refused is not None:
        return refused
    knobs = state.faults.current()
    if knobs.account == "out_of_balance":  # checked before anything is queued: nothing is paid
        return error_response(402, 400002, "insufficient balance: top up the account to continue")
    # The Model API's own limit, over the app's 1 MiB. The server (emulator/server.py) has read
    # the whole body before the app runs, so a client whose body is refused hears the answer.
    request.max_content_length = MAX_REQUEST_BYTES
    try:
        body = json.loads(request.get_data())
    except RequestEntityTooLarge:
        return _invalid_input([_body_too_large_problem()])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return error_response(400, 400000, f"request body is not valid JSON: {exc}")
    problems = validate_model_input(body)
    if problems:
        return _invalid_input(problems)
    decoded_images, problems = read_image_inputs(body)
    if problems:
        return _invalid_input(problems)
    try:
        directives = parse_directives(body["prompt"])
    except DirectiveError as exc:
        return _invalid_input([{"loc": ["body", "prompt"], "msg": str(exc), "type": "value_error"}])
    if directives.submit_200_error:
        return error_response(200, 400001, "model not available for this account")
    if directives.submit_status == 429:
        return _too_many_requests(knobs)
    if directives.submit_status == 500:
        return _internal_error(500)
    if directives.submit_status == 503:  # as a load balancer sends it: with Retry-After
        return _internal_error(503, retry_after_s=knobs.retry_after_s)
    model_input = _held_model_input(state, body, decoded_images)
    plan = _plan(state, model_input, directives, knobs, _inputs_received(body, decoded_images))
    created = state.registry.create(plan, knobs.request_ttl_s)
    state.stats.record_submit(body["prompt"])
    if state.faults.roll(knobs.rate_5xx_after_accept):
        return _internal_error(state.faults.pick(SERVER_ERROR_STATUSES))
    if directives.submit_no_id:
        return jsonify({"status": "in_queue"})
    if directives.submit_status == 504:  # as a proxy answers when it gives up: not RunComfy's JSON
        page = "<html><body><h1>504 Gateway Time-out</h1></body></html>"
        return Response(page, status=504, mimetype="text/html")
    return jsonify(
        {"request_id": created.request_id, **request_urls(_base_url(state), created.request_id)}
    )


@upstream_api.get("/models/<path:model_id>")
def model_price(model_id: str) -> Response:
    """The model's list price, as RunComfy's own clients read it (per output image)."""
    state = current_state()
    refused = _refused_before_the_model(state, model_id)
    if refused is not None:
        return refused
    return jsonify(
        {
            "model_id": model_id,
            "base_price_usd": state.faults.current().base_price_usd,
            "price_unit": "output",
            "pricing_note": PRICING_NOTE,
        }
    )


@upstream_api.get("/requests/<request_id>/status")
def status(request_id: str) -> Response:
    """Report where the request is on its timeline."""
    state = current_state()
    found = _find_for_poll(state, request_id)
    if isinstance(found, Response):
        return found
    return jsonify(status_body(found, time.monotonic(), _base_url(state)))


@upstream_api.get("/requests/<request_id>/result")
def result(request_id: str) -> Response:
    """Report the outcome, rendering the output on the first read after the run ends."""
    state = current_state()
    found = _find_for_poll(state, request_id)
    if isinstance(found, Response):
        return found
    phase = found.phase(time.monotonic())
    if phase is Phase.DONE and not found.plan.bad_status:
        _settle(state, found)
    with_cost = (
        request.args.get("include_cost", "").lower() == "true"
        and state.faults.current().include_cost
    )
    return jsonify(result_body(found, phase, _base_url(state), with_cost=with_cost))


@upstream_api.post("/requests/<request_id>/cancel")
def cancel(request_id: str) -> Response:
    """Cancel while queued; later the answer is `not_cancellable` and the run completes."""
    state = current_state()
    fault = _transport_fault(state)
    if fault is not None:
        return fault
    found = state.registry.find(request_id, state.faults.current().request_ttl_s)
    if found is None:
        return _not_found()
    if found.plan.cancel_unavailable:
        return _internal_error(503, retry_after_s=state.faults.current().retry_after_s)
    outcome = state.registry.cancel(found)
    response = jsonify(
        {
            "request_id": found.request_id,
            "status": found.status_value(found.phase(time.monotonic())),
            "outcome": str(outcome),
        }
    )
    response.status_code = 202
    return response


def _token_accepted(expected_token: str | None, authorization: str) -> bool:
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return False
    return expected_token is None or hmac.compare_digest(token, expected_token)


def _base_url(state: EmulatorState) -> str:
    return (state.config.public_url or request.host_url).rstrip("/")


def _refused_before_the_model(state: EmulatorState, model_id: str) -> Response | None:
    """What a model route answers before it looks at the request: a transport fault, or an
    unknown model id."""
    fault = _transport_fault(state)
    if fault is not None:
        return fault
    return _unknown_model(model_id) if model_id != MODEL_ID else None


def _transport_fault(state: EmulatorState) -> Response | None:
    """Apply the global knobs: maybe delay, then maybe answer 429, 5xx or 200-with-error."""
    knobs = state.faults.current()
    if state.faults.roll(knobs.rate_slow):
        time.sleep(knobs.slow_s)
    if state.faults.roll(knobs.rate_429):
        return _too_many_requests(knobs)
    if state.faults.roll(knobs.rate_5xx):
        return _internal_error(state.faults.pick(SERVER_ERROR_STATUSES))
    if state.faults.roll(knobs.rate_200_error):
        return error_response(200, 500001, "internal error, please retry later")
    return None


def _find_for_poll(state: EmulatorState, request_id: str) -> EmulatedRequest | Response:
    fault = _transport_fault(state)
    if fault is not None:
        return fault
    found = state.registry.find(request_id, state.faults.current().request_ttl_s)
    if found is None:
        return _not_found()
    planned_fault = state.registry.take_poll_fault(found)
    if planned_fault == 429:
        return _too_many_requests(state.faults.current())
    if planned_fault is not None:
        return _internal_error(planned_fault)
    return found


def _body_too_large_problem() -> dict[str, Any]:
    return {
        "loc": ["body"],
        "msg": f"request body is over {MAX_REQUEST_BYTES} bytes (64 MiB)",
        "type": "value_error",
    }


def _held_model_input(
    state: EmulatorState, body: dict[str, Any], decoded_images: dict[str, DecodedImage]
) -> dict[str, Any]:
    """The body with each data URI swapped for a reference to its held, decoded bytes."""
    return {
        **body,
        **{name: state.held_inputs.hold(image.body) for name, image in decoded_images.items()},
    }


def _inputs_received(
    body: dict[str, Any], decoded_images: dict[str, DecodedImage]
) -> dict[str, dict[str, Any]]:
    return {
        name: decoded_images[name].received()
        if name in decoded_images
        else {"kind": "url", "url": body[name]}
        for name in IMAGE_FIELDS
    }


def _plan(
    state: EmulatorState,
    model_input: dict[str, Any],
    directives: Directives,
    knobs: Faults,
    inputs_received: dict[str, dict[str, Any]],
) -> RequestPlan:
    """Decide at submit time everything about how this request will play out."""
    planned_failure = None
    if directives.fail or state.faults.roll(knobs.rate_fail):
        shape = directives.error_shape or state.registry.next_error_shape(knobs.error_shape)
        planned_failure = Failure("model_error", PLANNED_FAILURE_MESSAGE, shape)
    return RequestPlan(
        model_input=model_input,
        queue_s=knobs.queue_s if directives.queue_s is None else directives.queue_s,
        run_s=(knobs.run_s if directives.run_s is None else directives.run_s)
        + state.faults.extra_s(
            knobs.run_spread_s if directives.run_spread_s is None else directives.run_spread_s
        ),
        queue_start_position=knobs.queue_start_position,
        output_style=directives.output_style
        or state.registry.next_output_style(knobs.output_style),
        error_shape=directives.error_shape,
        planned_failure=planned_failure,
        bad_status=directives.bad_status,
        no_status=directives.no_status,
        queued_word=directives.queued_word or knobs.queued_word,
        running_word=directives.running_word or knobs.running_word,
        no_output=directives.no_output,
        poll_500_count=directives.poll_500_count,
        poll_429_count=directives.poll_429_count,
        cancel_unavailable=directives.cancel_unavailable,
        output_host=directives.output_host,
        output_gone=directives.output_gone,
        price_usd=knobs.base_price_usd,
        inputs_received=inputs_received,
    )


def _settle(state: EmulatorState, emulated: EmulatedRequest) -> None:
    """Fix the final outcome of a finished request once, fetching inputs outside any lock."""
    with emulated.settle_lock:
        if emulated.settled:
            return
        plan = emulated.plan
        if plan.planned_failure is not None or plan.no_output:
            state.registry.settle(emulated, output_name=None, failure=plan.planned_failure)
            return
        try:
            output_name = state.renderer.render(
                plan.model_input, state.faults.current().output_ttl_s
            )
        except InputFetchError as exc:
            shape = plan.error_shape or state.registry.next_error_shape(
                state.faults.current().error_shape
            )
            failure = Failure("input_error", str(exc), shape)
            state.registry.settle(emulated, output_name=None, failure=failure)
            return
        state.registry.settle(emulated, output_name=output_name, failure=None)


def _invalid_input(problems: list[dict[str, Any]]) -> Response:
    return error_response(422, 422001, "invalid input", detail=problems)


def _too_many_requests(knobs: Faults) -> Response:
    headers = _retry_after_header(knobs.retry_after_s)
    return error_response(429, 429001, "too many requests", headers=headers)


def _internal_error(http_status: int, retry_after_s: int | None = None) -> Response:
    headers = _retry_after_header(retry_after_s)
    return error_response(http_status, 500001, "internal error", headers=headers)


def _retry_after_header(seconds: int | None) -> dict[str, str]:
    return {} if seconds is None else {"Retry-After": str(seconds)}


def _token_refused() -> Response:
    return error_response(401, 400004, "token missing, revoked or account inactive")


def _unknown_model(model_id: str) -> Response:
    return error_response(400, 400001, f"model {model_id!r} not found or not available")


def _not_found() -> Response:
    return error_response(404, 404001, "request not found or expired")
