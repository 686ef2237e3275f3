"""SIGKILL the sidecar at each point of a saga, start it again: nothing lost, nothing twice.

The kill is deterministic: SIDECAR_CRASH_AT names the point (`sidecar/workflows/
crash.py`) and the sidecar SIGKILLs itself exactly there. The client does what
a client should after losing its connection: it sends its POST again with the
same Idempotency-Key, and gets the first saga back.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from tests.support.ledger import Ledger
from tests.support.mesh import Mesh
from tests.support.workflows import call, direct_services, saga, saga_in, step, workflows

pytestmark = pytest.mark.timeout(120)

THREE = saga(step("verify", "b"), step("claim", "c"), step("notify", "d"))
KEY = {"Idempotency-Key": "encounter-crash-1"}


async def crash_and_resume(make_mesh: Callable[..., Mesh], tmp_path: Path, store: str,
                           ledgers: list[Ledger], point: str, end: str) -> dict[str, object]:
    mesh = make_mesh(["a"])
    a = mesh.sidecar("a", workflows={**workflows(tmp_path), "store": store},
                     services=direct_services(ledgers))
    a.env["SIDECAR_CRASH_AT"] = point
    await a.start()
    try:
        await call(a, "POST", "/sagas", THREE, headers=KEY)
    except aiohttp.ClientError:
        pass  # killed before its answer went out
    assert await a.wait_exit(20) == -9  # SIGKILL, at the point
    del a.env["SIDECAR_CRASH_AT"]
    await a.start()
    status, first, _ = await call(a, "POST", "/sagas", THREE, headers=KEY)
    assert status == 200, first
    return await saga_in(a, str(first["id"]), end)


@pytest.mark.parametrize("point", ["before-action:claim", "after-action:claim"])
async def test_a_crash_around_a_step_resumes_and_applies_it_once(
        make_mesh: Callable[..., Mesh], tmp_path: Path, store_url: str,
        ledgers: list[Ledger], point: str) -> None:
    done = await crash_and_resume(make_mesh, tmp_path, store_url, ledgers, point, "completed")
    saga_id = done["id"]
    b, c, _ = ledgers
    assert b.journal == [
        ("b", "make", f"{saga_id}:verify:action"), ("c", "make", f"{saga_id}:claim:action"),
        ("d", "make", f"{saga_id}:notify:action")]
    claim = f"{saga_id}:claim:action"
    # After the app applied it, the step was sent again with its key and not applied again.
    assert c.received[claim] == (2 if point.startswith("after") else 1)
    assert b.received[f"{saga_id}:verify:action"] == 1


@pytest.mark.parametrize("point", ["after-compensation:claim", "before-compensation:verify"])
async def test_a_crash_during_compensation_resumes_and_undoes_each_step_once(
        make_mesh: Callable[..., Mesh], tmp_path: Path, ledgers: list[Ledger],
        point: str) -> None:
    ledgers[2].fail("/things", 422)
    done = await crash_and_resume(make_mesh, tmp_path, f"sqlite://{tmp_path}/wf.db", ledgers,
                                  point, "compensated")
    saga_id = done["id"]
    b, c, _ = ledgers
    assert b.journal == [
        ("b", "make", f"{saga_id}:verify:action"), ("c", "make", f"{saga_id}:claim:action"),
        ("c", "undo", f"{saga_id}:claim:compensation"),
        ("b", "undo", f"{saga_id}:verify:compensation")]
    undo = f"{saga_id}:claim:compensation"
    assert c.received[undo] == (2 if point == "after-compensation:claim" else 1)
