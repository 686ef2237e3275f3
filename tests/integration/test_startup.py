"""What a sidecar says about itself when it starts: the event loop it runs on."""

from __future__ import annotations

import json

import pytest

from deploy.process import SidecarProcess


def started_line(process: SidecarProcess) -> dict[str, object]:
    paths = [process.stdout_path, process.stderr_path]
    for path in paths:
        if path is None or not path.exists():
            continue
        for line in path.read_text().splitlines():
            if '"sidecar started"' in line:
                return json.loads(line)
    raise AssertionError("no start-up log line")


@pytest.mark.parametrize(("setting", "loop"), [(None, "uvloop"), ("0", "asyncio")])
async def test_start_up_log_names_the_event_loop(make_mesh, setting, loop):
    mesh = make_mesh(["a"])
    a = mesh.sidecar("a")
    if setting is not None:
        a.env["SIDECAR_UVLOOP"] = setting
    await a.start()
    assert started_line(a)["event_loop"] == loop
