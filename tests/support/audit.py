"""The one way tests read a sidecar's audit log (it is appended in the background)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from deploy.process import SidecarProcess


def read_records(path: Path) -> list[dict[str, Any]]:
    """The file's whole lines as records (the last one may be half written as we
    read); none when the file does not exist yet."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().split("\n")[:-1] if line]


def audit_lines(process: SidecarProcess) -> list[dict[str, Any]]:
    """The records `process` has written so far."""
    return read_records(process.audit_path)


async def wait_for_audit(process: SidecarProcess, count: int) -> list[dict[str, Any]]:
    """The records, once there are at least `count` (within 10 s)."""
    for _ in range(200):
        lines = audit_lines(process)
        if len(lines) >= count:
            return lines
        await asyncio.sleep(0.05)
    raise AssertionError(f"{process.name} wrote fewer than {count} audit lines")
