"""The /_sidecar/v1/ API's refusals: problem+json naming the field, and nothing stored."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from deploy.process import SidecarProcess
from tests.support.ledger import Ledger
from tests.support.mesh import Mesh
from tests.support.workflows import admin, call, direct_services, saga, step, workflows

pytestmark = pytest.mark.timeout(90)

NOTHING = {"sagas": {"running": 0, "completed": 0, "compensating": 0, "compensated": 0,
                     "failed": 0},
           "fanouts": {"running": 0, "delivered": 0, "dead": 0},
           "dead_letters": 0, "oldest_running": None, "running_here": 0}


async def sidecar_with(make_mesh: Callable[..., Mesh], tmp_path: Path, ledger: Ledger
                       ) -> SidecarProcess:
    mesh = make_mesh(["a"])
    return await mesh.sidecar("a", workflows=workflows(tmp_path, max_steps=3),
                              limits={"max_request_body": "2KiB"},
                              services=direct_services([ledger])).start()


def problem_of(doc: dict[str, object], status: int, reason: str) -> str:
    assert doc["status"] == status and doc["reason"] == reason, doc
    return str(doc["detail"])


async def test_bad_definitions_name_each_field_and_store_nothing(
        make_mesh: Callable[..., Mesh], tmp_path: Path) -> None:
    ledger = await Ledger("b").start()
    try:
        a = await sidecar_with(make_mesh, tmp_path, ledger)
        bad = saga(step("verify", "b"), {"name": "claim", "action": {
            "service": "b", "path": "claims", "method": "FETCH"},
            "compensation": {"service": "b", "path": "/c/{{steps.later.response.id}}"}})
        status, doc, headers = await call(a, "POST", "/sagas", bad)
        assert status == 400 and headers["Content-Type"] == "application/problem+json"
        assert headers["x-sidecar-reason"] == "bad_request"
        detail = problem_of(doc, 400, "bad_request")
        assert doc["errors"] == [
            "steps[1].action.method: must be an HTTP method such as POST or PUT",
            "steps[1].action.path: must be a path that begins with / (at most 2048 characters)",
            "steps[1].compensation.path: a template names a step that does not come before it",
        ]
        assert all(error in detail for error in doc["errors"])
        # A service this sidecar does not know: 404 no_route, and it is not named back.
        unknown = saga(step("verify", "payer-gateway"))
        status, doc, _ = await call(a, "POST", "/sagas", unknown)
        assert "steps[0].action.service" in problem_of(doc, 404, "no_route")
        assert "payer-gateway" not in str(doc)
        # Over workflows.max_steps, over the body limit, not JSON, a bad wait.
        four = saga(*(step(name, "b") for name in ("one", "two", "three", "four")))
        status, doc, _ = await call(a, "POST", "/sagas", four)
        assert "at most 3 steps (workflows.max_steps)" in problem_of(doc, 400, "bad_request")
        big = saga(step("verify", "b"))
        big["steps"][0]["action"]["body"] = {"note": "x" * 4096}
        status, doc, _ = await call(a, "POST", "/sagas", big)
        assert status == 413 and doc["reason"] == "body_too_large"
        status, doc, _ = await call(a, "POST", "/sagas", raw=b"{not json")
        assert doc["errors"] == ["(body): must be JSON"]
        status, doc, _ = await call(a, "POST", "/sagas?wait=soon", saga(step("verify", "b")))
        assert doc["errors"] == ["wait: must be a duration such as 5s or 500ms"]
        status, doc, _ = await call(a, "POST", "/fanout", {"targets": ["b", "nobody"],
                                                           "path": "/events"})
        assert "targets[1]" in problem_of(doc, 404, "no_route")
        # Nothing of any of it was stored, and no app was called.
        assert await admin(a, "/admin/workflows") == NOTHING
        assert ledger.received == {}
    finally:
        await ledger.stop()


async def test_unknown_resources_methods_and_ids(make_mesh: Callable[..., Mesh],
                                                 tmp_path: Path) -> None:
    ledger = await Ledger("b").start()
    try:
        a = await sidecar_with(make_mesh, tmp_path, ledger)
        status, doc, _ = await call(a, "GET", "/sagas/0123456789abcdef")
        assert problem_of(doc, 404, "not_found").startswith("No saga has this id")
        status, doc, headers = await call(a, "DELETE", "/sagas")
        assert status == 405 and headers["Allow"] == "POST"
        status, doc, _ = await call(a, "GET", "/workflows")
        assert status == 404 and doc["reason"] == "not_found"
        status, doc, _ = await call(a, "POST", "/dead-letters/nope/redrive")
        assert status == 404 and doc["reason"] == "not_found"
        status, doc, _ = await call(a, "GET", "/dead-letters")
        assert (status, doc) == (200, {"dead_letters": []})
        # Only the sidecar's own host forms reach the API: Host: b is a call to b.
        async with aiohttp.ClientSession() as session:
            async with session.post(a.outbound_url + "/_sidecar/v1/sagas", data=b"{}",
                                    headers={"Host": "b"}) as response:
                assert response.status == 201
        assert ledger.received == {"": 1}
    finally:
        await ledger.stop()


async def test_without_a_workflows_section_the_api_does_not_exist(
        make_mesh: Callable[..., Mesh]) -> None:
    mesh = make_mesh(["a"])
    a = await mesh.sidecar("a").start()
    status, doc, _ = await call(a, "POST", "/sagas", saga(step("verify", "b")))
    assert status == 404 and doc["reason"] == "no_route"
    async with aiohttp.ClientSession() as session:
        async with session.get(a.admin_url + "/admin/workflows") as response:
            assert response.status == 404
        async with session.get(a.admin_url + "/metrics") as response:
            assert "sidecar_workflow_steps" not in await response.text()


async def test_a_second_sidecar_on_one_sqlite_store_refuses_to_start(
        make_mesh: Callable[..., Mesh], tmp_path: Path) -> None:
    mesh = make_mesh(["a"])
    store = workflows(tmp_path)
    await mesh.sidecar("a", workflows=store).start()
    second = SidecarProcess.in_dir("a-again", {**mesh.sidecars[0].config,
                                               "workflows": store}, tmp_path)
    second.config.pop("listen", None)
    second.config.pop("audit", None)
    mesh.sidecars.append(second)
    second.write_config()
    second.spawn()
    assert await second.wait_exit(20) == 2
    assert "workflow store could not be opened" in second.stdout_path.read_text()
    assert "another process uses the workflow store" in second.stdout_path.read_text()
