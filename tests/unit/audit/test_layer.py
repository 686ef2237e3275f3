"""The audit layer: one record per decision, with the templated route and the trace id."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from multidict import CIMultiDict

from sidecar.audit.layer import record_decision, trace_id
from sidecar.audit.log import AuditLog
from sidecar.clock import FakeClock
from sidecar.reasons import relayed
from sidecar.stack import Call, Reply
from tests.support.calls import Next, make_call


async def test_audit_records_decision_with_templated_route(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", clock=FakeClock())
    await log.start()
    layer = record_decision(log=log, clock=FakeClock())
    c = make_call("/patients/078-05-1120")
    c.target, c.route, c.source = "b", "/patients/{id}", "a"
    c.headers["traceparent"] = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    denied = Reply(status=403, headers=CIMultiDict(), reason="policy_denied", made_here=True)
    await layer(c, Next(denied))
    await log.close()
    record = json.loads((tmp_path / "audit.jsonl").read_text())
    assert record["decision"] == "denied" and record["reason"] == "policy_denied"
    assert record["route"] == "/patients/{id}" and record["trace_id"] == "ab" * 16
    assert "078-05-1120" not in (tmp_path / "audit.jsonl").read_text()


def test_trace_id_is_always_set() -> None:
    assert len(trace_id(make_call("/x"))) == 32


async def test_audit_records_a_call_whose_caller_went_away(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", clock=FakeClock())
    await log.start()
    layer = record_decision(log=log, clock=FakeClock())

    async def never(c: Call) -> Reply:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    task = asyncio.ensure_future(layer(make_call("/x", direction="inbound"), never))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await log.close()
    record = json.loads((tmp_path / "audit.jsonl").read_text())
    assert record["status"] == 499 and record["direction"] == "inbound"


async def test_audit_reason_is_a_table_code_or_null(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", clock=FakeClock())
    await log.start()
    layer = record_decision(log=log, clock=FakeClock())
    for reason in ("MRN-998877 ssn 123-45-6789", "upstream_timeout"):
        await layer(make_call("/x"), Next(Reply(status=503, headers=CIMultiDict(), reason=reason)))
    await log.close()
    text = (tmp_path / "audit.jsonl").read_text()
    assert [json.loads(line)["reason"] for line in text.splitlines()] == [None,
                                                                         "upstream_timeout"]
    assert "MRN-998877" not in text


def test_only_a_mesh_target_relays_and_only_table_codes() -> None:
    assert relayed("policy_denied", mesh=True) == "policy_denied"
    assert relayed("policy_denied", mesh=False) is None
    assert relayed("MRN-998877 ssn 123-45-6789", mesh=True) is None
    assert relayed(None, mesh=True) is None
