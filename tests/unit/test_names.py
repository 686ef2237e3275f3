"""The shared vocabularies: service names."""

from __future__ import annotations

import pytest

from sidecar.names import is_service_name


@pytest.mark.parametrize("name", ["a", "billing-engine", "Billing-Engine", "x1", "a" * 63])
def test_service_names(name: str) -> None:
    assert is_service_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "", "-a", "a-", "a_b", "a.b", "a" * 64, "../a", "a\n", "\u212a",  # KELVIN SIGN lowers to k
        None, 7,
    ],
)
def test_not_service_names(name: object) -> None:
    assert not is_service_name(name)
