"""Numbers from outside that do not fit, through one real outbound sidecar.

A `Retry-After` of hundreds or thousands of digits from an upstream, an
`x-sidecar-timeout-ms` as long from the app, a `Content-Length` beyond any
integer type: each is judged without converting it whole, and none is a 500.
"""

from __future__ import annotations

import pytest
from aiohttp import web

from tests.integration.test_core import wait_for_audit
from tests.support.hostile import exchange, request

pytestmark = pytest.mark.timeout(60)


async def busy(request: web.Request) -> web.StreamResponse:
    """503 with a `Retry-After` of `?digits=` nines."""
    return web.Response(status=503, headers={"Retry-After": "9" * int(request.query["digits"])})


async def test_numbers_too_long_to_convert_are_judged_not_crashed(make_mesh, upstreams):
    mesh = make_mesh(["a"])
    app = await upstreams(script=busy).start()
    echo = await upstreams().start()
    a = mesh.sidecar("a", services={
        "busy": {"endpoints": [app.url], "mesh": False},
        "echo": {"endpoints": [echo.url], "mesh": False},
    })
    await a.start()
    calls = 0

    # An endless Retry-After forbids the retry: the 503 goes back after one attempt.
    for digits in (400, 5000):
        answer = await exchange(a.outbound, request(f"/busy/x?digits={digits}".encode(), []))
        calls += 1
        assert answer.status == 503 and answer.reason is None, (digits, answer.body)
        assert answer.headers["x-sidecar-attempts"] == "1"
    assert len(app.seen) == 2

    # An x-sidecar-timeout-ms that long is no valid ask: ignored, and not passed on.
    for value in (b"9" * 11, b"9" * 5000):
        answer = await exchange(a.outbound, request(b"/echo/x", [(b"x-sidecar-timeout-ms", value)]))
        calls += 1
        assert answer.status == 200, answer.body
    assert all("x-sidecar-timeout-ms" not in seen.headers for seen in echo.seen)

    # A Content-Length beyond 64 bits is malformed HTTP.
    for length in (b"1" + b"0" * 30, b"18446744073709551616", b"9" * 5000):
        answer = await exchange(a.outbound, request(b"/echo/x", [(b"Content-Length", length)],
                                                    method=b"POST"))
        calls += 1
        assert (answer.status, answer.reason) == (400, "bad_request"), length[:30]
    assert len(echo.seen) == 2

    records = await wait_for_audit(a, calls)
    assert [r["status"] for r in records] == [503, 503, 200, 200, 400, 400, 400]
