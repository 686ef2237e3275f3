"""Start and stop around the app: `sidecar wait`, `/readyz/outbound`, `POST /admin/shutdown`.

An app's entrypoint waits for its sidecar's outbound path (Istio's
holdApplicationUntilProxyStarts, Dapr's healthz/outbound), which never waits
for the app itself; a batch job stops its sidecar when it is done (Istio's
/quitquitquit) with the same drain as SIGTERM.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import aiohttp
import pytest

from deploy.process import Process, free_port
from tests.support.upstream import slow

pytestmark = pytest.mark.timeout(60)

WAIT = (sys.executable, "-m", "sidecar", "wait")


def waiter(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Process:
    """`sidecar wait ARGS` as a child process, its output in tmp_path."""
    return Process("wait", [*WAIT, *args], stdout_path=tmp_path / "wait.out",
                   stderr_path=tmp_path / "wait.err", env=env)


async def test_readyz_outbound_does_not_wait_for_the_app(make_mesh, tmp_path):
    mesh = make_mesh(["a"])
    # The app is down: /readyz says so, the outbound path is ready all the same.
    a = mesh.sidecar("a", inbound={"app": f"http://127.0.0.1:{free_port()}",
                                   "app_health_path": "/health"})
    await a.start()
    async with aiohttp.ClientSession() as session:
        async with session.get(a.admin_url + "/readyz") as response:
            assert response.status == 503
        async with session.get(a.admin_url + "/readyz/outbound") as response:
            assert (response.status, await response.json()) == (200, {"ready": True})
    done = waiter(tmp_path, "--admin", f"127.0.0.1:{a.admin}", "--timeout", "10s", "--",
                  sys.executable, "-c", "print('app started')")
    done.spawn()
    assert await done.wait_exit(20) == 0, done.logs()
    assert (tmp_path / "wait.out").read_text() == "app started\n"


async def test_wait_holds_until_the_sidecar_is_up(make_mesh, tmp_path):
    mesh = make_mesh(["a"])
    a = mesh.sidecar("a")
    a.write_config()
    # The admin address comes from the config named by SIDECAR_CONFIG, as for `run`.
    held = waiter(tmp_path, "--timeout", "30s", env={"SIDECAR_CONFIG": str(a.config_path)})
    held.spawn()
    await asyncio.sleep(1.0)
    assert held.running, held.logs()  # nothing listens yet: still waiting
    await a.start()
    assert await held.wait_exit(20) == 0, held.logs()


async def test_wait_gives_up_after_its_timeout_and_says_why(tmp_path):
    port = free_port()  # nothing listens there
    gave_up = waiter(tmp_path, "--admin", f"127.0.0.1:{port}", "--timeout", "1s", "--",
                     sys.executable, "-c", "print('must not run')")
    gave_up.spawn()
    assert await gave_up.wait_exit(20) == 1
    err = (tmp_path / "wait.err").read_text()
    assert "not ready within 1s" in err and f"127.0.0.1:{port}/readyz/outbound" in err
    assert (tmp_path / "wait.out").read_text() == ""


async def test_admin_shutdown_drains_like_sigterm(make_mesh, upstreams):
    mesh = make_mesh(["a", "b"])
    app_b = await upstreams(script=await slow(1.0)).start()
    b = mesh.sidecar("b", inbound={"app": app_b.url})
    await b.start()
    a = mesh.sidecar("a", services={"b": {"endpoints": [b.inbound_url]}})
    await a.start()
    async with aiohttp.ClientSession() as session:
        async def slow_call() -> tuple[int, bytes]:
            async with session.get(a.outbound_url + "/b/job") as response:
                return response.status, await response.read()

        in_flight = asyncio.ensure_future(slow_call())
        while not app_b.seen:  # the call has reached b's app
            await asyncio.sleep(0.02)
        async with session.get(b.admin_url + "/admin/shutdown") as response:
            assert response.status == 405  # a POST only
        async with session.post(b.admin_url + "/admin/shutdown") as response:
            assert (response.status, await response.json()) == (202, {"draining": True})
        status, body = await in_flight
        assert status == 200 and b'"slow": 1.0' in body
    assert await b.wait_exit(15) == 0
    assert '"msg":"draining"' in b.logs(chars=10**6)
