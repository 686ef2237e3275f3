"""Sagas through real sidecar processes to real apps that count their effects by key."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.ledger import Ledger
from tests.support.mesh import Mesh
from tests.support.workflows import (
    FAST_RETRY,
    admin,
    audit_records,
    call,
    direct_services,
    saga,
    saga_in,
    step,
    until,
    workflows,
)

pytestmark = pytest.mark.timeout(90)


THREE = saga(step("verify", "b"), step("claim", "c"), step("notify", "d"))


async def test_a_three_step_saga_across_three_meshed_apps_completes_in_one_trace(
        make_mesh: Callable[..., Mesh], ledgers: list[Ledger], tmp_path: Path) -> None:
    mesh = make_mesh(["a", "b", "c", "d"])
    far = []
    for ledger in ledgers:
        sidecar = mesh.sidecar(ledger.name, inbound={"app": ledger.url})
        far.append(await sidecar.start())
    a = await mesh.sidecar("a", workflows=workflows(tmp_path), services={
        s.name: {"endpoints": [s.inbound_url], "retry": FAST_RETRY} for s in far}).start()
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    status, done, _ = await call(a, "POST", "/sagas?wait=15s", THREE,
                                 headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01"})
    assert status == 200, done
    assert done["state"] == "completed"
    assert [(s["name"], s["status"], s["attempts"]) for s in done["steps"]] == [
        ("verify", "done", 1), ("claim", "done", 1), ("notify", "done", 1)]
    saga_id = done["id"]
    for ledger in ledgers:
        # Through the mesh: the far sidecar vouched for the caller, and the key is the step's.
        name = {"b": "verify", "c": "claim", "d": "notify"}[ledger.name]
        assert ledger.effects("make") == [f"{saga_id}:{name}:action"]
        assert ledger.sources == ["a"]
        # One trace: each step's context is a child within the caller's trace.
        assert trace in ledger.traceparents[0]
    records = await until(lambda: [r for r in audit_records(a) if r.get("step")],
                          what="audit records of the steps")
    assert [(r["workflow"], r["step"], r["target"], r["status"]) for r in records] == [
        (saga_id, "verify", "b", 201), (saga_id, "claim", "c", 201), (saga_id, "notify", "d", 201)]
    assert all(r["trace_id"] == trace for r in records)
    assert "body" not in str(records) and "P-1" not in str(records)


async def test_when_the_third_step_fails_the_first_two_are_compensated_in_reverse_once(
        make_mesh: Callable[..., Mesh], ledgers: list[Ledger], tmp_path: Path) -> None:
    b, _c, d = ledgers
    d.fail("/things", 422)  # refused at once: no retry, the saga compensates
    mesh = make_mesh(["a"])
    a = await mesh.sidecar("a", workflows=workflows(tmp_path),
                           services=direct_services(ledgers)).start()
    status, done, _ = await call(a, "POST", "/sagas?wait=15s", THREE)
    assert status == 200 and done["state"] == "compensated", done
    assert [(s["name"], s["status"]) for s in done["steps"]] == [
        ("verify", "compensated"), ("claim", "compensated"), ("notify", "failed")]
    assert done["steps"][2]["attempts"] == 1 and done["steps"][2]["last_reason"] == "status_422"
    saga_id = done["id"]
    # In reverse order, each exactly once; the failed step is not compensated.
    assert b.journal == [
        ("b", "make", f"{saga_id}:verify:action"), ("c", "make", f"{saga_id}:claim:action"),
        ("c", "undo", f"{saga_id}:claim:compensation"),
        ("b", "undo", f"{saga_id}:verify:compensation")]
    assert d.applied == [] and d.received[f"{saga_id}:notify:action"] == 1


async def test_a_step_that_fails_for_a_while_is_retried_with_the_same_key(
        make_mesh: Callable[..., Mesh], ledgers: list[Ledger], tmp_path: Path) -> None:
    d = ledgers[2]
    d.fail("/things", 500, times=2)  # the stack does not retry a 500; the engine does
    mesh = make_mesh(["a"])
    a = await mesh.sidecar("a", workflows=workflows(tmp_path),
                           services=direct_services(ledgers)).start()
    status, created, headers = await call(a, "POST", "/sagas", THREE)
    assert status == 202 and created["state"] == "running"
    assert headers["Location"] == f"/_sidecar/v1/sagas/{created['id']}"
    done = await saga_in(a, created["id"], "completed")
    assert done["steps"][2]["attempts"] == 3
    key = f"{created['id']}:notify:action"
    assert d.received[key] == 3 and d.effects("make") == [key]


async def test_an_idempotency_key_returns_the_first_saga(
        make_mesh: Callable[..., Mesh], ledgers: list[Ledger], tmp_path: Path) -> None:
    mesh = make_mesh(["a"])
    a = await mesh.sidecar("a", workflows=workflows(tmp_path),
                           services=direct_services(ledgers)).start()
    key = {"Idempotency-Key": "encounter-ENC-1"}
    status, first, _ = await call(a, "POST", "/sagas?wait=10s", THREE, headers=key)
    assert status == 200 and first["state"] == "completed"
    status, again, _ = await call(a, "POST", "/sagas", THREE, headers=key)
    assert status == 200 and again["id"] == first["id"] and again["state"] == "completed"
    assert all(len(ledger.applied) == 1 for ledger in ledgers)
    other = saga(step("verify", "b"))
    status, refused, _ = await call(a, "POST", "/sagas", other, headers=key)
    assert status == 400 and "Idempotency-Key" in refused["detail"]


async def test_finished_sagas_are_purged_after_the_retention_and_failed_ones_kept(
        make_mesh: Callable[..., Mesh], ledgers: list[Ledger], tmp_path: Path) -> None:
    b = ledgers[0]
    mesh = make_mesh(["a"])
    a = await mesh.sidecar("a", workflows=workflows(tmp_path, retention="1s",
                                                    give_up_after="100ms"),
                           services=direct_services(ledgers)).start()
    status, done, _ = await call(a, "POST", "/sagas?wait=10s", saga(step("verify", "b")))
    assert done["state"] == "completed"
    b.fail("/things/", 400)  # every undo refused: a person must act
    failing = saga(step("verify", "b"), step("claim", "c"), step("notify", "d"))
    ledgers[2].fail("/things", 422)
    status, failed, _ = await call(a, "POST", "/sagas?wait=10s", failing)
    assert failed["state"] == "failed" and failed["steps"][0]["last_reason"] == "status_400"

    async def purged() -> bool:
        return (await call(a, "GET", f"/sagas/{done['id']}"))[0] == 404

    await until(purged, what="the completed saga purged")
    status, kept, _ = await call(a, "GET", f"/sagas/{failed['id']}")
    assert status == 200 and kept["state"] == "failed"
    state = await admin(a, "/admin/workflows")
    assert state["sagas"]["failed"] == 1 and state["sagas"]["completed"] == 0
    metrics = await admin(a, "/metrics")
    assert 'sidecar_workflow_steps_total{outcome="compensation_failed"} 1.0' in metrics
    log = a.stdout_path.read_text()
    assert "a person must act" in log and failed["id"] in log
