"""Audit shipping: every record arrives at the example compliance-monitor, in order, chained.

The collector is the example app itself (`deploy.apps.compliance_monitor`),
run here so the test can read what it holds; it is down (its port closed)
for a while and the sidecar is restarted meanwhile, or killed right after a
batch was acknowledged and before its cursor moved.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from deploy.apps.common import AppSettings
from deploy.apps.compliance_monitor import AuditTrail, make_app
from deploy.process import SidecarProcess, free_port
from tests.support.ledger import Ledger
from tests.support.mesh import Mesh
from tests.support.workflows import FAST_RETRY, audit_records, direct_services, until, workflows

pytestmark = pytest.mark.timeout(90)
SHIP = {"service": "collector", "path": "/audit/records", "batch": 4, "interval": "100ms"}


class Collector:
    """compliance-monitor on a fixed port, stopped and started around one AuditTrail."""

    def __init__(self) -> None:
        self.trail = AuditTrail()
        self.port = free_port()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._runner = web.AppRunner(make_app(AppSettings(), self.trail), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    made = Collector()
    yield made
    await made.stop()


@pytest.fixture
async def ledger() -> AsyncIterator[Ledger]:
    made = await Ledger("b").start()
    yield made
    await made.stop()


def shipping_sidecar(mesh: Mesh, tmp_path: Path, ledger: Ledger,
                     collector: Collector) -> SidecarProcess:
    services = direct_services([ledger])
    services["collector"] = {"endpoints": [collector.url], "mesh": False, "retry": FAST_RETRY,
                             "circuit_breaker": {"recovery_timeout": "200ms"}}
    a = mesh.sidecar("a", workflows=workflows(tmp_path), services=services)
    a.config["audit"] = {"path": str(a.audit_path), "ship": SHIP}
    return a


async def traffic(a: SidecarProcess, count: int) -> None:
    async with aiohttp.ClientSession() as session:
        for n in range(count):
            async with session.get(f"{a.outbound_url}/b/things/{n}") as response:
                assert response.status == 201


async def traffic_until_killed(a: SidecarProcess, count: int) -> None:
    """`traffic`, for a sidecar set to kill itself after its first shipment: that
    comes 100 ms (`SHIP`'s interval) after the first record, so on a slow machine
    it may land while a later call is still in flight, which is then cut."""
    try:
        await traffic(a, count)
    except aiohttp.ClientConnectionError:
        pass


def is_shipping(record: dict[str, Any]) -> bool:
    return record["method"] == "POST" and record["route"] == "/audit/records"


async def all_arrived(a: SidecarProcess, collector: Collector) -> list[dict[str, Any]]:
    """Wait until every record but those of shipping itself is at the collector."""

    def arrived() -> bool:
        chain = collector.trail.chains.get("a")
        wanted = {r["hash"] for r in audit_records(a) if not is_shipping(r)}
        return chain is not None and wanted <= chain.hashes

    await until(arrived, what="every audit record at the collector")
    return list(collector.trail.chains["a"].records)


def assert_in_order_and_chained(a: SidecarProcess, collector: Collector,
                                received: list[dict[str, Any]]) -> None:
    # Exactly the file's records, in the file's order, from its first line.
    assert received == audit_records(a)[: len(received)]
    assert received[0]["prev_hash"] == "0" * 64
    summary = collector.trail.chains["a"].summary()
    assert summary["intact"], summary["problems"]


async def test_with_the_collector_down_and_a_restart_every_record_arrives_in_order(
        make_mesh: Callable[..., Mesh], tmp_path: Path, ledger: Ledger,
        collector: Collector) -> None:
    a = await shipping_sidecar(make_mesh(["a"]), tmp_path, ledger, collector).start()
    await traffic(a, 6)  # the collector is down: nothing can be taken yet
    assert await a.stop() == 0
    await a.start()
    await traffic(a, 5)
    assert "a" not in collector.trail.chains
    await collector.start()
    received = await all_arrived(a, collector)
    assert len([r for r in received if r["direction"] == "outbound" and r["target"] == "b"]) == 11
    assert_in_order_and_chained(a, collector, received)


async def test_a_batch_acknowledged_just_before_a_kill_is_sent_again_and_kept_once(
        make_mesh: Callable[..., Mesh], tmp_path: Path, ledger: Ledger,
        collector: Collector) -> None:
    await collector.start()
    a = shipping_sidecar(make_mesh(["a"]), tmp_path, ledger, collector)
    a.env["SIDECAR_CRASH_AT"] = "after-ship"
    await a.start()
    await traffic_until_killed(a, 3)
    assert await a.wait_exit(20) == -9  # the batch was taken; the cursor never moved
    del a.env["SIDECAR_CRASH_AT"]
    await a.start()
    await traffic(a, 3)
    received = await all_arrived(a, collector)
    chain = collector.trail.chains["a"]
    # The acknowledged batch came again after the restart and was kept once.
    assert chain.received > len(chain.hashes)
    assert_in_order_and_chained(a, collector, received)
