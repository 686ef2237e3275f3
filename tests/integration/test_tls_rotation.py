"""Rotation under load: certificate files replaced on disk while calls are in flight.

The app holds every answer until the test lets go, so hundreds of calls sit
on their connections across the rotation; more keep coming all along. Not
one may fail: open connections finish on the old certificates, new ones
take the new. Then the expiry side: the gauge, the warning and `/readyz`.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
from collections import Counter
from collections.abc import Callable

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from deploy.process import CertRing, SidecarProcess
from tests.support import tls
from tests.support.mesh import Mesh
from tests.support.upstream import Upstream

pytestmark = pytest.mark.timeout(120)

IN_FLIGHT = 200
MORE_AT_MOST = 2000  # the steady trickle beside them is bounded in count ...
TRICKLE_WITHIN = 60.0  # ... and in time
# Room for every held call, and time: 200 handshakes at once queue up on 2 cores.
BIG_POOLS = {"bulkhead": {"max_concurrent": 1000, "max_pending": 1000}, "timeout": "60s",
             "connect_timeout": "10s", "retry": {"attempts": 1, "per_try_timeout": "60s"}}


class Held:
    """An app whose answers wait for `gate`; `arrived` counts the calls it holds."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.arrived = 0

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        self.arrived += 1
        if request.path.startswith("/held"):
            await self.gate.wait()
        return web.json_response({"ok": True})


async def reloads(process: SidecarProcess) -> int:
    return process.stdout_path.read_text().count('"msg":"certificates reloaded"')


async def until_reloaded(processes: list[SidecarProcess], before: dict[str, int]) -> None:
    for _ in range(200):
        counts = {p.name: await reloads(p) for p in processes}
        if all(counts[name] > before[name] for name in before):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not every sidecar reloaded its certificates: {counts}")


async def served_certificate(ring: CertRing, port: int, service: str) -> x509.Certificate:
    """The certificate a new TLS connection to `port` is shown now."""
    context = tls.client_context(ring, ring.cert_file("a"), ring.key_file("a"))
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context,
                                              server_hostname=service)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    with contextlib.suppress(ssl.SSLError, ConnectionError):
        await writer.wait_closed()
    return x509.load_der_x509_certificate(der)


class Load:
    """IN_FLIGHT held calls, then a trickle of quick ones until `stop`; every status counted."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.statuses: Counter[int | str] = Counter()
        self.stop = asyncio.Event()
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                             timeout=aiohttp.ClientTimeout(total=90))
        self.tasks: list[asyncio.Task[None]] = []

    async def one(self, path: str) -> None:
        try:
            async with self.session.get(self.url + path) as response:
                await response.read()
                self.statuses[response.status] += 1
        except aiohttp.ClientError as exc:
            self.statuses[type(exc).__name__] += 1

    async def trickle(self) -> None:
        loop = asyncio.get_running_loop()
        ends = loop.time() + TRICKLE_WITHIN
        for n in range(MORE_AT_MOST // 2):
            if self.stop.is_set() or loop.time() > ends:
                return
            await asyncio.gather(self.one(f"/quick/{n}"), self.one(f"/quick/{n}/2"))
            await asyncio.sleep(0.01)

    def start(self) -> None:
        self.tasks = [asyncio.ensure_future(self.one(f"/held/{n}")) for n in range(IN_FLIGHT)]
        self.tasks.append(asyncio.ensure_future(self.trickle()))

    async def finish(self, app: Held) -> Counter[int | str]:
        self.stop.set()
        app.gate.set()
        await asyncio.wait_for(asyncio.gather(*self.tasks), 60)
        await self.session.close()
        return self.statuses


async def under_load(make_mesh: Callable[..., Mesh], upstreams: Callable[..., Upstream],
                     ) -> tuple[CertRing, SidecarProcess, SidecarProcess, Held, Load]:
    """a -> b in strict mTLS, IN_FLIGHT calls held at b's app and the trickle under way."""
    mesh = make_mesh(["a", "b"], tls="strict")
    assert mesh.certs is not None
    app = Held()
    app_b = await upstreams(script=app).start()
    # b's call to its app takes its settings from `defaults`: the same room there.
    b = await mesh.sidecar("b", inbound={"app": app_b.url}, defaults=BIG_POOLS).start()
    a = await mesh.sidecar("a", services={"b": {"endpoints": [b.inbound_url],
                                                **BIG_POOLS}}).start()
    load = Load(f"{a.outbound_url}/b")
    load.start()
    for _ in range(400):
        if app.arrived >= IN_FLIGHT:
            return mesh.certs, a, b, app, load
        await asyncio.sleep(0.05)
    raise AssertionError(f"only {app.arrived} calls reached the app")


async def test_certificates_replaced_under_load_fail_no_call(make_mesh, upstreams):
    ring, a, b, app, load = await under_load(make_mesh, upstreams)
    before = {p.name: await reloads(p) for p in (a, b)}
    new_b, _ = ring.issue("b", days=30)
    ring.issue("a", days=30)
    await until_reloaded([a, b], before)
    # A new connection is shown the new certificate; the held calls are still on the old ones.
    served = await served_certificate(ring, b.inbound, "b")
    assert served.serial_number == x509.load_pem_x509_certificate(
        new_b.read_bytes()).serial_number
    assert not any(task.done() for task in load.tasks[:IN_FLIGHT])
    await asyncio.sleep(0.5)  # the trickle goes on over new connections meanwhile
    statuses = await load.finish(app)
    assert set(statuses) == {200}, statuses
    assert statuses[200] > IN_FLIGHT


async def test_a_ca_rotation_old_and_new_then_new_only_fails_no_call(make_mesh, upstreams):
    ring, a, b, app, load = await under_load(make_mesh, upstreams)
    sidecars = [a, b]

    async def step(change: Callable[[], object]) -> None:
        before = {p.name: await reloads(p) for p in sidecars}
        change()
        await until_reloaded(sidecars, before)
        await asyncio.sleep(0.3)  # calls on new connections in each state

    old_ca = x509.load_pem_x509_certificate(ring.ca_file.read_bytes())
    await step(ring.begin_ca_rotation)  # 1: trust old and new
    await step(lambda: [ring.issue(s, ca_dir=ring.next_ca_dir) for s in ("a", "b")])  # 2
    await step(ring.finish_ca_rotation)  # 3: trust the new CA only
    served = await served_certificate(ring, b.inbound, "b")
    assert served.issuer != old_ca.subject
    statuses = await load.finish(app)
    assert set(statuses) == {200}, statuses


def expiry(text: str) -> dict[str, float]:
    for family in text_string_to_metric_families(text):
        if family.name == "sidecar_certificate_expiry_seconds":
            return {s.labels["kind"]: s.value for s in family.samples}
    return {}


async def test_an_expired_certificate_is_not_ready_until_new_files_arrive(make_mesh, upstreams):
    mesh = make_mesh(["a", "b"], tls="strict")
    ring = mesh.certs
    assert ring is not None
    ring.issue("b", days=1, now=tls.days_ago(3))
    app_b = await upstreams().start()
    b = await mesh.sidecar("b", inbound={"app": app_b.url}).start()  # starts, not ready
    async with aiohttp.ClientSession() as session:
        async with session.get(b.admin_url + "/readyz") as response:
            assert response.status == 503
            reasons = (await response.json())["reasons"]
            assert any(r.startswith("tls.cert_file: the certificate expired at ") for r in reasons)
        async with session.get(b.admin_url + "/metrics") as response:
            left = expiry(await response.text())
        assert left["certificate"] < -86400 and left["ca"] > 0
        ring.issue("b", days=10)  # under expiry_warning (30d): ready, with a warning
        for _ in range(200):
            async with session.get(b.admin_url + "/readyz") as response:
                if response.status == 200:
                    break
            await asyncio.sleep(0.05)
        assert response.status == 200
        async with session.get(b.admin_url + "/metrics") as response:
            assert 9 * 86400 < expiry(await response.text())["certificate"] <= 10 * 86400
    log = b.stdout_path.read_text()
    assert '"msg":"the certificate expires soon: issue a new one and replace the files"' in log
    assert "BEGIN" not in log


async def test_sighup_reads_the_certificate_files_at_once(make_mesh, upstreams):
    mesh = make_mesh(["b"], tls="strict")
    app_b = await upstreams().start()
    b = await mesh.sidecar("b", inbound={"app": app_b.url}).start()
    before = await reloads(b)
    b.signal(signal.SIGHUP)  # nothing changed on disk: only the signal reloads
    await until_reloaded([b], {b.name: before})
