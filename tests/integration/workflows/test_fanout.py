"""Fan-out: every target at least once, a target that is down later, dead letters redriven."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from deploy.process import free_ports
from tests.support.ledger import Ledger
from tests.support.mesh import Mesh
from tests.support.workflows import admin, call, direct_services, until, workflows

pytestmark = pytest.mark.timeout(90)
QUICK_BREAKER = {"circuit_breaker": {"failure_threshold": 5, "recovery_timeout": "200ms"}}
EVENT = {"targets": ["b", "c", "d", "e"], "method": "POST", "path": "/events",
         "body": {"kind": "claim-submitted", "claim": "CLM-1"}}


@pytest.fixture
async def ledgers() -> AsyncIterator[list[Ledger]]:
    """b, c and d up; e has a port but is down until the test starts it."""
    ports = free_ports(4)
    made = [Ledger(name, port=port) for name, port in zip("bcde", ports, strict=True)]
    for ledger in made[:3]:
        await ledger.start()
    yield made
    for ledger in made:
        await ledger.stop()


async def targets_of(a: object, id: str) -> dict[str, dict[str, object]]:
    status, doc, _ = await call(a, "GET", f"/fanout/{id}")  # type: ignore[arg-type]
    assert status == 200
    return doc["targets"]


async def test_three_are_delivered_at_once_and_the_fourth_when_it_returns(
        make_mesh: Callable[..., Mesh], tmp_path: Path, ledgers: list[Ledger]) -> None:
    mesh = make_mesh(["a"])
    a = await mesh.sidecar("a", workflows=workflows(tmp_path),
                           services=direct_services(ledgers, **QUICK_BREAKER)).start()
    status, made, _ = await call(a, "POST", "/fanout", EVENT,
                                 headers={"Idempotency-Key": "event-1"})
    assert status == 202
    fanout = made["id"]

    async def three_delivered() -> dict[str, dict[str, object]] | None:
        targets = await targets_of(a, fanout)
        done = [name for name, t in targets.items() if t["status"] == "delivered"]
        return targets if sorted(done) == ["b", "c", "d"] else None

    targets = await until(three_delivered, what="b, c and d delivered")
    assert targets["e"]["status"] == "pending"  # e is down; it holds nobody up
    assert all(targets[name]["attempts"] == 1 for name in "bcd")
    await ledgers[3].start()
    await until(lambda: ledgers[3].applied, what="e's delivery")
    final = await until(lambda: _all_delivered(a, fanout), what="all delivered")
    assert final["e"]["attempts"] > 1
    for ledger in ledgers:
        # At least once at the wire; once in effect, by the delivery's own key.
        assert ledger.effects("make") == [f"{fanout}:{ledger.name}"]
    # The same key again: the first fan-out, nothing sent again.
    status, again, _ = await call(a, "POST", "/fanout", EVENT,
                                  headers={"Idempotency-Key": "event-1"})
    assert status == 200 and again["id"] == fanout
    assert all(len(ledger.applied) == 1 for ledger in ledgers)


async def _all_delivered(a: object, id: str) -> dict[str, dict[str, object]] | None:
    targets = await targets_of(a, id)
    return targets if all(t["status"] == "delivered" for t in targets.values()) else None


async def test_a_target_down_past_the_policy_becomes_a_dead_letter_that_redrives(
        make_mesh: Callable[..., Mesh], tmp_path: Path, ledgers: list[Ledger]) -> None:
    mesh = make_mesh(["a"])
    a = await mesh.sidecar("a", workflows=workflows(tmp_path, give_up_after="1s"),
                           services=direct_services(ledgers, **QUICK_BREAKER)).start()
    status, made, _ = await call(a, "POST", "/fanout", EVENT)
    fanout = made["id"]

    async def one_dead() -> list[dict[str, object]]:
        return (await call(a, "GET", "/dead-letters"))[1]["dead_letters"]

    letters = await until(one_dead, what="a dead letter")
    assert len(letters) == 1
    letter = letters[0]
    assert (letter["fanout"], letter["target"]) == (fanout, "e")
    assert letter["last_reason"] in ("upstream_connect_failure", "circuit_open")
    assert (await targets_of(a, fanout))["e"]["status"] == "dead"
    metrics = await admin(a, "/metrics")
    assert "sidecar_dead_letters 1.0" in metrics
    assert 'sidecar_deliveries_total{outcome="dead",peer="e"} 1.0' in metrics
    assert 'sidecar_deliveries_total{outcome="delivered",peer="b"} 1.0' in metrics
    state = await admin(a, "/admin/workflows")
    assert state["fanouts"]["dead"] == 1 and state["dead_letters"] == 1

    await ledgers[3].start()
    status, redriven, _ = await call(a, "POST", f"/dead-letters/{letter['id']}/redrive")
    assert (status, redriven) == (202, {"id": letter["id"], "status": "pending"})
    await until(lambda: _all_delivered(a, fanout), what="the redriven delivery")
    assert ledgers[3].effects("make") == [f"{fanout}:e"]
    assert (await call(a, "GET", "/dead-letters"))[1] == {"dead_letters": []}
    assert (await admin(a, "/admin/workflows"))["fanouts"]["delivered"] == 1
