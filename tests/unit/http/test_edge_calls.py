"""How the edge reads a request into a `Call`."""

from __future__ import annotations

import warnings

import pytest
from aiohttp.test_utils import make_mocked_request

from sidecar.http import edge


@pytest.mark.parametrize(("target", "host"), [("http://b.example:8080/claims/1", "b.example:8080"),
                                               ("/claims/1", None)])
def test_the_request_target_is_read_without_a_deprecated_api(target: str,
                                                              host: str | None) -> None:
    """The absolute form names the target; reading it warns of nothing (aiohttp's
    `Request.message` did, on every call)."""
    request = make_mocked_request("GET", target, headers={"Host": "elsewhere"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call = edge.to_call(request, "outbound", body_limit=1024)
    assert (call.path, call.absolute_host) == ("/claims/1", host)
