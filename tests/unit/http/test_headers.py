"""Which headers are forwarded: hop-by-hop ones and those `Connection` names are not."""

from __future__ import annotations

from multidict import CIMultiDict

from sidecar.http.headers import forwardable


def test_forwardable_removes_hop_by_hop_and_connection_named() -> None:
    headers: CIMultiDict[str] = CIMultiDict([
        ("Connection", "keep-alive, X-Secret"), ("X-Secret", "1"), ("Keep-Alive", "5"),
        ("Transfer-Encoding", "chunked"), ("Upgrade", "h2c"), ("x-sidecar-debug", "1"),
        ("x-sidecar-timeout-ms", "100"), ("Authorization", "Bearer t"),
    ])
    out = forwardable(headers, keep=("x-sidecar-timeout-ms",))
    assert list(out.keys()) == ["x-sidecar-timeout-ms", "Authorization"]
