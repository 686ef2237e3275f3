"""Layers that turn limits and failures into the sidecar's own answers."""

from __future__ import annotations

import logging

from sidecar.http import problem
from sidecar.reasons import FAILURE_REASONS
from sidecar.stack import (
    BodyStalled,
    BodyTooLarge,
    Call,
    Handler,
    Layer,
    Reply,
    RequestBodyError,
    UpstreamError,
)

log = logging.getLogger("sidecar")


def _too_large(limit: int) -> Reply:
    return problem.reply(
        "body_too_large",
        f"The request body is larger than this sidecar's limit of {limit} bytes "
        "(limits.max_request_body). Send a smaller body.",
    )


def check_target() -> Layer:
    """Refuses what a mesh call never is with 400 `bad_request`: CONNECT
    tunnels and the asterisk form (`OPTIONS *`). The sidecar is no open proxy."""

    async def check_target_layer(call: Call, next: Handler) -> Reply:
        if call.method == "CONNECT" or not call.path.startswith("/"):
            return problem.reply(
                "bad_request",
                "CONNECT and the asterisk form are not supported: address a service "
                "with an origin-form or absolute-form request.",
            )
        return await next(call)

    return check_target_layer


def check_headers(*, max_header_line: int) -> Layer:
    """Refuses a header line (`name: value`) longer than the limit with 431
    `headers_too_large`. (The count and very long values are refused while
    parsing, before a call exists.)"""

    async def check_headers_layer(call: Call, next: Handler) -> Reply:
        if call.longest_header_line > max_header_line:
            return problem.reply(
                "headers_too_large",
                f"A request header line is longer than this sidecar's limit of "
                f"{max_header_line} bytes (limits.max_header_line).",
            )
        return await next(call)

    return check_headers_layer


def check_body(*, max_request_body: int) -> Layer:
    """Refuses a body over the limit with 413 `body_too_large`: at once when
    Content-Length says so, or as soon as a streamed body passes it. A body
    that moves no byte for `limits.idle_timeout` is 408 `body_stalled`; one whose
    framing breaks mid-stream is 400 `bad_request`. (Once an answer has
    begun, a body that fails ends the call as a cut connection instead.)"""

    async def check_body_layer(call: Call, next: Handler) -> Reply:
        if call.body.length is not None and call.body.length > max_request_body:
            return _too_large(max_request_body)
        try:
            return await next(call)
        except BodyTooLarge:
            return _too_large(max_request_body)
        except BodyStalled as stalled:
            return problem.reply(
                "body_stalled",
                f"The request body stopped: no byte of it came for "
                f"{round(stalled.seconds * 1000)} ms (limits.idle_timeout). The connection "
                "is closed; send the body again without such a pause.",
            )
        except RequestBodyError:
            return problem.reply(
                "bad_request",
                "The request body is not well-formed (its chunked framing broke). "
                "The connection is closed.",
            )

    return check_body_layer


def answer_failures(*, who: str) -> Layer:
    """Turns an upstream failure that no inner layer answered into problem+json:
    503 `upstream_connect_failure`, 504 `upstream_timeout` or 502 `upstream_reset`,
    by the failure's kind (`reasons.FAILURE_REASONS`).

    `who` names the upstream in `detail` ("the app" inbound, the service outbound).
    """

    async def answer_failures_layer(call: Call, next: Handler) -> Reply:
        try:
            return await next(call)
        except UpstreamError as exc:
            reason = FAILURE_REASONS.get(exc.kind, "upstream_reset")
        except TimeoutError:
            reason = "upstream_timeout"
        name = who or call.target
        return problem.reply(reason, _FAILURE_DETAIL[reason].format(name=name))

    return answer_failures_layer


_FAILURE_DETAIL = {
    "upstream_connect_failure": "No endpoint of {name} could be reached. Check that it is "
                                "running and listening.",
    "upstream_timeout": "{name} did not answer within the call's time. Raise the service's "
                        "`timeout` or find why it is slow.",
    "upstream_reset": "{name} closed the connection before its response began.",
    "upstream_identity_mismatch": "The endpoint dialled for {name} showed a certificate that "
                                  "is not {name}'s (another service, another CA, or out of "
                                  "date): nothing was sent. Check the endpoint's address and "
                                  "its certificate.",
}


def answer_internal_errors() -> Layer:
    """The last resort, just inside audit and metrics: any exception that escapes
    the layers below becomes 500 `internal_error` problem+json, so audit and
    metrics see an answer for every call and only cancellation (the caller
    went away) passes through. The exception is logged by its type only: its
    message may quote the request.
    """

    async def answer_internal_errors_layer(call: Call, next: Handler) -> Reply:
        try:
            return await next(call)
        except Exception as exc:
            log.error("call failed inside the sidecar", extra={"error": type(exc).__name__})
            return problem.reply(
                "internal_error",
                "The sidecar failed on this request. Its log names the error; "
                "retrying may help.",
            )

    return answer_internal_errors_layer
