"""What the workflow tests share: a saga over ledger apps, the API, and patient waiting.

Every wait is bounded in count and time and polls real processes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiohttp

from deploy.process import SidecarProcess, loopback_session
from tests.support.audit import audit_lines
from tests.support.ledger import Ledger

API = "/_sidecar/v1"
WITHIN = 20.0  # seconds any awaited state gets
FAST_RETRY = {"attempts": 3, "backoff": {"base": "10ms", "max": "50ms"}, "per_try_timeout": "2s"}


def step(name: str, service: str, *, compensate: bool = True) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": name,
        "action": {"service": service, "method": "POST", "path": "/things",
                   "body": {"step": name}},
    }
    if compensate:
        doc["compensation"] = {"service": service, "method": "POST",
                               "path": f"/things/{{{{steps.{name}.response.id}}}}/undo",
                               "body": {"thing": f"{{{{steps.{name}.response.thing}}}}"}}
    return doc


def saga(*steps: dict[str, Any], name: str = "encounter") -> dict[str, Any]:
    return {"name": name, "steps": list(steps)}


def direct_services(ledgers: Iterable[Ledger], **extra: Any) -> dict[str, Any]:
    """Each ledger as a service outside the mesh (no far sidecar), with quick retries."""
    return {ledger.name: {"endpoints": [ledger.url], "mesh": False, "retry": FAST_RETRY,
                          "timeout": "5s", **extra}
            for ledger in ledgers}


def workflows(tmp_path: Path, **settings: Any) -> dict[str, Any]:
    return {"store": f"sqlite://{tmp_path}/wf.db", "redelivery": {"base": "50ms", "max": "200ms"},
            **settings}


async def call(sidecar: SidecarProcess, method: str, path: str, body: Any = None, *,
               headers: dict[str, str] | None = None, raw: bytes | None = None
               ) -> tuple[int, Any, dict[str, str]]:
    """One request to the sidecar's own API on its outbound port."""
    async with loopback_session() as session:
        async with session.request(
            method, sidecar.outbound_url + API + path, headers=headers,
            data=raw if raw is not None else (json.dumps(body) if body is not None else None),
        ) as response:
            text = await response.text()
            try:
                doc = json.loads(text)
            except ValueError:
                doc = text
            return response.status, doc, dict(response.headers)


async def admin(sidecar: SidecarProcess, path: str) -> Any:
    async with loopback_session() as session:
        async with session.get(sidecar.admin_url + path) as response:
            text = await response.text()
            return json.loads(text) if path.startswith("/admin") else text


async def until(check: Any, within: float = WITHIN, what: str = "the awaited state") -> Any:
    """Poll `check()` (sync or async) until it returns something truthy."""
    ends = time.monotonic() + within
    last = None
    while time.monotonic() < ends:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} did not come within {within:.0f}s (last: {last!r})")


async def saga_in(sidecar: SidecarProcess, id: str, *states: str) -> dict[str, Any]:
    async def look() -> dict[str, Any] | None:
        try:
            status, doc, _ = await call(sidecar, "GET", f"/sagas/{id}")
        except aiohttp.ClientError:
            return None
        return doc if status == 200 and doc["state"] in states else None

    return await until(look, what=f"saga in {states}")


audit_records = audit_lines  # one audit reader: tests.support.audit
