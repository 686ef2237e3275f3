"""Shared fixtures: a temporary mesh of real sidecar processes, torn down after each test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests.support.mesh import Mesh
from tests.support.raw import CannedUpstream
from tests.support.upstream import Upstream

# A real PostgreSQL server for the workflow store tests (`postgres_server`, `pg_database`).
pytest_plugins = ["tests.support.postgres"]


@pytest.fixture
async def make_mesh(tmp_path: Path) -> AsyncIterator[Callable[..., Mesh]]:
    meshes: list[Mesh] = []

    def build(services: list[str], **kwargs: object) -> Mesh:
        mesh = Mesh(tmp_path, services, **kwargs)  # type: ignore[arg-type]
        meshes.append(mesh)
        return mesh

    yield build
    for mesh in meshes:
        await mesh.stop()


@pytest.fixture
async def upstreams() -> AsyncIterator[Callable[..., Upstream]]:
    started: list[Upstream] = []

    def make(**kwargs: object) -> Upstream:
        upstream = Upstream(**kwargs)  # type: ignore[arg-type]
        started.append(upstream)
        return upstream

    yield make
    for upstream in started:
        await upstream.stop()


@pytest.fixture
async def canned() -> AsyncIterator[Callable[..., CannedUpstream]]:
    """Apps that answer hand-made bytes (`tests.support.raw.CannedUpstream`)."""
    started: list[CannedUpstream] = []

    def make(answer: Callable[[str, str], bytes]) -> CannedUpstream:
        upstream = CannedUpstream(answer)
        started.append(upstream)
        return upstream

    yield make
    for upstream in started:
        await upstream.stop()
