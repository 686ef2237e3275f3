"""Two replicas of one service share a PostgreSQL store: no step ever runs twice at once.

Both replicas are real sidecar processes with the same service name and one
real PostgreSQL database. Compensations that keep failing hand their saga
back to the store between tries, so both replicas' polls compete for it on
every round; the apps count every request per Idempotency-Key and how many
were ever in flight at once. Then one replica is SIGKILLed while an app holds
its step's answer, and the other takes the saga over at once.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from deploy.process import SidecarProcess
from tests.support.ledger import Ledger
from tests.support.mesh import Mesh
from tests.support.workflows import (
    audit_records,
    call,
    direct_services,
    saga,
    saga_in,
    step,
    until,
)

pytestmark = pytest.mark.timeout(120)
SAGAS = 12
NO_BREAKER = {"circuit_breaker": {"failure_threshold": 1000}}


async def replicas(mesh: Mesh, store: str, ledgers: list[Ledger]) -> list[SidecarProcess]:
    """Two sidecars named `a`, with files of their own, on one store."""
    out = []
    for replica in ("a1", "a2"):
        doc: dict[str, Any] = {
            "service": "a", "identity": mesh.keyring.identity("a"), "drain_timeout": "5s",
            "workflows": {"store": store, "redelivery": {"base": "20ms", "max": "60ms"}},
            "services": direct_services(ledgers, **NO_BREAKER),
        }
        process = SidecarProcess.in_dir(replica, doc, mesh.workdir)
        mesh.sidecars.append(process)
        out.append(await process.start())
    return out


async def test_two_replicas_never_run_one_step_twice(
        make_mesh: Callable[..., Mesh], pg_database: str, ledgers: list[Ledger]) -> None:
    b, c, d = ledgers
    d.fail("/things", 422)  # every saga compensates...
    c.fail("/things/", 503, times=4, each_key=True)  # ...and claim's undo fails 4 times
    pair = await replicas(make_mesh(["a"]), pg_database, ledgers)
    ids = []
    for n in range(SAGAS):
        status, made, _ = await call(pair[n % 2], "POST", "/sagas",
                                     saga(step("verify", "b"), step("claim", "c"),
                                          step("notify", "d")))
        assert status == 202
        ids.append(made["id"])
    for id in ids:
        done = await saga_in(pair[0], id, "compensated", "failed")
        assert done["state"] == "compensated", done
    for id in ids:
        undo = f"{id}:claim:compensation"
        # Four scripted failures and one success; never a second replica alongside.
        assert c.received[undo] == 5
        assert c.most_at_once[undo] == 1
        assert b.received[f"{id}:verify:compensation"] == 1
        for ledger, name in ((b, "verify"), (c, "claim"), (d, "notify")):
            assert ledger.received[f"{id}:{name}:action"] == 1
    # Both replicas worked: each sent steps of its own sagas.
    workers = [{r["workflow"] for r in audit_records(p) if r.get("step") == "claim"}
               for p in pair]
    assert workers[0] and workers[1]


async def test_a_killed_replica_s_saga_is_taken_over_at_once(
        make_mesh: Callable[..., Mesh], pg_database: str, ledgers: list[Ledger],
        tmp_path: Path) -> None:
    c = ledgers[1]
    c.hold("/things")  # the claim step is applied, and its answer held
    first, second = await replicas(make_mesh(["a"]), pg_database, ledgers)
    status, made, _ = await call(first, "POST", "/sagas",
                                 saga(step("verify", "b"), step("claim", "c"),
                                      step("notify", "d")))
    assert status == 202
    await until(c.held.is_set, what="the held claim step")
    first.signal(signal.SIGKILL)
    assert await first.wait_exit(10) == -9
    c.release()
    done = await saga_in(second, made["id"], "completed")
    claim = f"{made['id']}:claim:action"
    assert c.received[claim] == 2 and c.effects("make") == [claim]
    assert done["steps"][1]["attempts"] == 2
    assert [r["step"] for r in audit_records(second) if r.get("step")] == ["claim", "notify"]
