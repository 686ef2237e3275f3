"""Audit records of workflow calls name the instance and the step; others do not."""

from __future__ import annotations

import json
from pathlib import Path

from multidict import CIMultiDict

from sidecar.audit.layer import write_record
from sidecar.audit.log import AuditLog, verify_file
from sidecar.clock import FakeClock
from sidecar.stack import Body, Call, Reply


def a_call(**fields: object) -> Call:
    return Call(direction="outbound", method="POST", path="/claims", query="",
                headers=CIMultiDict(), body=Body.empty(), source="a", target="b",
                route="/claims", **fields)  # type: ignore[arg-type]


async def test_workflow_calls_carry_workflow_and_step_and_the_chain_holds(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, clock=FakeClock())
    await log.start()
    reply = Reply(status=201, headers=CIMultiDict())
    write_record(log, a_call(), reply)
    write_record(log, a_call(workflow="wf-1", step="claim"), reply)
    await log.close()
    plain, step = (json.loads(line) for line in path.read_text().splitlines())
    assert "workflow" not in plain and "step" not in plain
    assert (step["workflow"], step["step"]) == ("wf-1", "claim")
    assert step["prev_hash"] == plain["hash"]
    assert verify_file(path) == (True, None, "intact: 2 records")
