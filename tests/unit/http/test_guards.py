"""The guards: upstream failures answered, request bodies bounded."""

from __future__ import annotations

import pytest

from sidecar.http import guards
from sidecar.stack import Body, BodyStalled, BodyTooLarge, MalformedBody, UpstreamError
from tests.support.calls import Next, make_call


@pytest.mark.parametrize(("kind", "status", "reason"), [
    ("connect-failure", 503, "upstream_connect_failure"),
    ("reset", 502, "upstream_reset"),
    ("timeout", 504, "upstream_timeout"),
])
async def test_answer_failures_maps_upstream_errors(kind: str, status: int, reason: str) -> None:
    layer = guards.answer_failures(who="the app")
    reply = await layer(make_call("/x"), Next(UpstreamError(kind, sent=False)))
    assert (reply.status, reply.reason) == (status, reason)
    assert reply.headers["x-sidecar-reason"] == reason


async def test_check_body_refuses_by_length_and_while_streaming() -> None:
    layer = guards.check_body(max_request_body=10)
    downstream = Next()
    big = make_call("/x", method="POST")
    big.body = Body(data=b"x" * 11)
    assert (await layer(big, downstream)).status == 413
    assert downstream.calls == []
    streaming = make_call("/x", method="POST")
    reply = await layer(streaming, Next(BodyTooLarge()))
    assert reply.status == 413 and reply.reason == "body_too_large"
    broken = await layer(make_call("/x", method="POST"), Next(MalformedBody()))
    assert broken.status == 400 and broken.reason == "bad_request"
    stalled = await layer(make_call("/x", method="POST"), Next(BodyStalled(60)))
    assert stalled.status == 408 and stalled.reason == "body_stalled"
    assert b"60000 ms" in stalled.body  # type: ignore[operator]
