"""Which headers are forwarded: hop-by-hop ones and those `Connection` names are not."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from sidecar.http import headers as module
from sidecar.http.headers import forwardable


def test_forwardable_removes_hop_by_hop_and_connection_named() -> None:
    headers: CIMultiDict[str] = CIMultiDict([
        ("Connection", "keep-alive, X-Secret"), ("X-Secret", "1"), ("Keep-Alive", "5"),
        ("Transfer-Encoding", "chunked"), ("Upgrade", "h2c"), ("x-sidecar-debug", "1"),
        ("x-sidecar-timeout-ms", "100"), ("Authorization", "Bearer t"),
    ])
    out = forwardable(headers, keep=("x-sidecar-timeout-ms",))
    assert list(out.keys()) == ["x-sidecar-timeout-ms", "Authorization"]


@pytest.mark.parametrize("drop_sidecar", [True, False])
def test_forwardable_drops_look_alikes_of_the_sidecars_own_names(drop_sidecar: bool) -> None:
    headers: CIMultiDict[str] = CIMultiDict([
        ("x_source_service", "svc-c"), ("X_Service_Token", "t"), ("x-source_service", "svc-c"),
        ("x_sidecar_reason", "policy_denied"), ("X_SIDECAR_TIMEOUT_MS", "1"),
        ("x.source.service", "svc-c"), ("x-sidecar_attempts", "9"),
        # Not look-alikes: the app's own names, and the real ones (judged by other rules).
        ("x_request_id", "r"), ("x_source_services", "s"), ("my_header", "m"),
        ("x-source-service", "a"),
    ])
    out = forwardable(headers, drop_sidecar=drop_sidecar)
    assert list(out.keys()) == ["x_request_id", "x_source_services", "my_header",
                                "x-source-service"]


def test_the_names_remembered_are_bounded_and_later_names_still_judged() -> None:
    flood: CIMultiDict[str] = CIMultiDict((f"x-flood-{i}", "v") for i in range(5000))
    flood.add("X_Source_Service", "svc-c")  # a look-alike after the map is full
    flood.add("Keep-Alive", "timeout=5")
    out = forwardable(flood)
    assert len(module._NAMES) <= module._NAMES_KEPT
    assert len(out) == 5000
    assert "X_Source_Service" not in out and "Keep-Alive" not in out
